//! The framing between berthd and a streaming `berthd exec-in` (exec with
//! stdin, a terminal, or separate live output): on the helper's stdin berthd
//! sends input, its end and terminal sizes; on the helper's stdout come the
//! command's stdout and stderr. Each frame is a kind byte, a u32 big-endian
//! length and the payload. The helper's own stderr keeps only its own errors.

/// berthd to helper: bytes for the command's stdin.
pub(crate) const STDIN: u8 = 0;
/// berthd to helper: the command's stdin ends.
pub(crate) const STDIN_CLOSE: u8 = 1;
/// berthd to helper: terminal size, u16 width then u16 height (big-endian).
pub(crate) const RESIZE: u8 = 2;
/// Helper to berthd: the command's stdout (all output with a terminal).
pub(crate) const STDOUT: u8 = 3;
/// Helper to berthd: the command's stderr.
pub(crate) const STDERR: u8 = 4;

/// Largest payload either side accepts.
pub(crate) const MAX_PAYLOAD: usize = 1024 * 1024;
/// Largest payload either side sends.
pub(crate) const CHUNK: usize = 32 * 1024;

/// The environment variable that puts `exec-in` in streaming mode; its
/// value is [`MODE_PIPES`] or [`MODE_TTY`].
pub(crate) const MODE_ENV: &str = "BERTH_EXEC_STREAM";
pub(crate) const MODE_PIPES: &str = "pipes";
pub(crate) const MODE_TTY: &str = "tty";
/// Set to "1" when the command gets stdin from berthd.
pub(crate) const STDIN_ENV: &str = "BERTH_EXEC_STDIN";

/// Appends one frame to `out`.
pub(crate) fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(payload);
}

/// A RESIZE payload.
pub(crate) fn resize_payload(width: u16, height: u16) -> [u8; 4] {
    let [w0, w1] = width.to_be_bytes();
    let [h0, h1] = height.to_be_bytes();
    [w0, w1, h0, h1]
}

/// Width and height of a RESIZE payload.
pub(crate) fn parse_resize(payload: &[u8]) -> Option<(u16, u16)> {
    match payload {
        [w0, w1, h0, h1] => Some((
            u16::from_be_bytes([*w0, *w1]),
            u16::from_be_bytes([*h0, *h1]),
        )),
        _ => None,
    }
}

/// Takes one complete frame off the front of `buf`.
pub(crate) fn take(buf: &mut Vec<u8>) -> Result<Option<(u8, Vec<u8>)>, String> {
    let Some(head) = buf.first_chunk::<5>() else {
        return Ok(None);
    };
    let kind = head[0];
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(format!("frame of {len} bytes is larger than {MAX_PAYLOAD}"));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let payload = buf[5..5 + len].to_vec();
    buf.drain(..5 + len);
    Ok(Some((kind, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let mut wire = Vec::new();
        encode(STDOUT, b"hello", &mut wire);
        encode(RESIZE, &resize_payload(80, 24), &mut wire);
        encode(STDIN_CLOSE, &[], &mut wire);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.push(byte);
            while let Some(frame) = take(&mut buf).expect("frame") {
                got.push(frame);
            }
        }
        assert_eq!(got[0], (STDOUT, b"hello".to_vec()));
        assert_eq!(parse_resize(&got[1].1), Some((80, 24)));
        assert_eq!(got[2], (STDIN_CLOSE, Vec::new()));
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut buf = vec![STDIN, 0xff, 0xff, 0xff, 0xff];
        assert!(take(&mut buf).is_err());
    }
}
