//! The monitor's side of attach: per-client state (which streams, output not
//! yet taken), the AttachFrame encoding of output, and terminal resizing.
//! The monitor never blocks on a client: output waits in a bounded queue.

use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::log::Stream;
use super::protocol::{self, pb};

/// Output an attached client may leave untaken before it is disconnected.
pub(crate) const MAX_OUTPUT_PENDING: usize = 4 * 1024 * 1024;
/// Input held for a container that does not read its stdin; beyond it the
/// monitor stops reading from attached clients.
pub(crate) const MAX_STDIN_PENDING: usize = 256 * 1024;

/// An attached client.
#[derive(Debug)]
pub(crate) struct Attached {
    pub(crate) stdin: bool,
    stdout: bool,
    stderr: bool,
    /// The container has a terminal: all output is stdout.
    tty: bool,
    /// This client's input has ended.
    pub(crate) stdin_closed: bool,
    /// Encoded frames not yet written to the client.
    pub(crate) out: Vec<u8>,
}

impl Attached {
    pub(crate) fn new(request: &pb::AttachRequest, tty: bool) -> Attached {
        Attached {
            stdin: request.stdin,
            stdout: request.stdout,
            stderr: request.stderr,
            tty,
            stdin_closed: false,
            out: Vec::new(),
        }
    }

    pub(crate) fn wants(&self, stream: Stream) -> bool {
        match stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr && !self.tty,
        }
    }

    /// Queues an encoded frame; false when the client is too far behind.
    pub(crate) fn queue(&mut self, frame: &[u8]) -> bool {
        if self.out.len() + frame.len() > MAX_OUTPUT_PENDING {
            return false;
        }
        self.out.extend_from_slice(frame);
        true
    }

    /// Writes what the (non-blocking) client takes now.
    pub(crate) fn flush(&mut self, stream: &mut UnixStream) -> std::io::Result<()> {
        while !self.out.is_empty() {
            match stream.write(&self.out) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The container has exited: the last output goes out, waiting at most
    /// a second for a slow client.
    pub(crate) fn flush_before_close(&mut self, stream: &mut UnixStream) {
        if self.out.is_empty() {
            return;
        }
        if stream.set_nonblocking(false).is_ok()
            && stream
                .set_write_timeout(Some(Duration::from_secs(1)))
                .is_ok()
        {
            let _ = stream.write_all(&self.out);
        }
        self.out.clear();
    }
}

/// One chunk of output as the frame attached clients read.
pub(crate) fn output_frame(stream: Stream, data: &[u8]) -> Vec<u8> {
    let kind = match stream {
        Stream::Stdout => pb::attach_frame::Kind::Stdout(data.to_vec()),
        Stream::Stderr => pb::attach_frame::Kind::Stderr(data.to_vec()),
    };
    protocol::encode_frame(&pb::AttachFrame { kind: Some(kind) })
}

/// Sets the size of the terminal whose master (or a dup of it) is `pty`.
pub(crate) fn set_terminal_size(pty: &OwnedFd, width: u32, height: u32) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: u16::try_from(height).unwrap_or(u16::MAX),
        ws_col: u16::try_from(width).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which lives
    // across the call; nix has no wrapper for it.
    let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_terminal_has_no_stderr() {
        let request = pb::AttachRequest {
            stdin: true,
            stdout: true,
            stderr: true,
        };
        assert!(Attached::new(&request, false).wants(Stream::Stderr));
        assert!(!Attached::new(&request, true).wants(Stream::Stderr));
        assert!(Attached::new(&request, true).wants(Stream::Stdout));
    }

    #[test]
    fn a_client_that_takes_nothing_is_given_up() {
        let mut attached = Attached::new(&pb::AttachRequest::default(), false);
        let frame = vec![0u8; 1024 * 1024];
        for _ in 0..4 {
            assert!(attached.queue(&frame));
        }
        assert!(!attached.queue(&frame));
    }

    #[test]
    fn output_frames_decode() {
        let mut frame = output_frame(Stream::Stderr, b"oops\n");
        let body = protocol::take_frame(&mut frame)
            .expect("frame")
            .expect("complete");
        let decoded = pb::AttachFrame::decode(body.as_slice()).expect("decode");
        assert_eq!(
            decoded.kind,
            Some(pb::attach_frame::Kind::Stderr(b"oops\n".to_vec()))
        );
    }

    #[test]
    fn pending_output_goes_out_when_the_client_reads() {
        let (mut ours, mut theirs) = UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("non-blocking");
        let mut attached = Attached::new(&pb::AttachRequest::default(), false);
        assert!(attached.queue(b"abc"));
        attached.flush(&mut ours).expect("flush");
        assert!(attached.out.is_empty());
        let mut buf = [0u8; 3];
        std::io::Read::read_exact(&mut theirs, &mut buf).expect("read");
        assert_eq!(&buf, b"abc");
    }
}
