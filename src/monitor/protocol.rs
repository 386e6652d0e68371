//! The monitor's control protocol: the prost types built from
//! `proto/monitor.proto`, its framing (u32 big-endian length, then one
//! message), and the mapping between the wire status and `status.json`.

use prost::Message;

use super::{ContainerState, MonitorStatus};

/// Generated from proto/monitor.proto by build.rs.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/berth.monitor.v1.rs"));
}

/// Largest frame either side accepts; real messages are a few hundred bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// One message as a frame.
pub fn encode_frame(message: &impl Message) -> Vec<u8> {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    message.encode_raw(&mut out);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("bad message: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// The length announced by a frame header, checked against MAX_FRAME.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Takes one complete frame's body off the front of `buf`, if there is one.
pub fn take_frame(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, FrameError> {
    let Some(header) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = frame_len(*header)?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = buf[4..4 + len].to_vec();
    buf.drain(..4 + len);
    Ok(Some(body))
}

impl From<&MonitorStatus> for pb::ContainerStatus {
    fn from(s: &MonitorStatus) -> pb::ContainerStatus {
        let state = match s.state {
            ContainerState::Created => pb::ContainerState::Created,
            ContainerState::Running => pb::ContainerState::Running,
            ContainerState::Exited => pb::ContainerState::Exited,
            ContainerState::Unknown => pb::ContainerState::Unspecified,
        };
        pb::ContainerStatus {
            protocol: s.protocol,
            monitor_pid: s.monitor_pid,
            init_pid: s.init_pid,
            state: state as i32,
            created_at: s.created_at,
            started_at: s.started_at,
            finished_at: s.finished_at,
            exit_code: s.exit_code,
            signal: s.signal,
            oom_killed: s.oom_killed,
            reason: s.reason.clone(),
            message: s.message.clone(),
        }
    }
}

impl TryFrom<pb::ContainerStatus> for MonitorStatus {
    type Error = String;

    fn try_from(s: pb::ContainerStatus) -> Result<MonitorStatus, String> {
        let state = match pb::ContainerState::try_from(s.state) {
            Ok(pb::ContainerState::Created) => ContainerState::Created,
            Ok(pb::ContainerState::Running) => ContainerState::Running,
            Ok(pb::ContainerState::Exited) => ContainerState::Exited,
            _ => return Err(format!("unknown container state {}", s.state)),
        };
        Ok(MonitorStatus {
            protocol: s.protocol,
            monitor_pid: s.monitor_pid,
            init_pid: s.init_pid,
            state,
            created_at: s.created_at,
            started_at: s.started_at,
            finished_at: s.finished_at,
            exit_code: s.exit_code,
            signal: s.signal,
            oom_killed: s.oom_killed,
            reason: s.reason,
            message: s.message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_all_bytes() {
        let request = pb::Request {
            kind: Some(pb::request::Kind::Kill(pb::KillRequest {
                signal: 9,
                all: true,
            })),
        };
        let frame = encode_frame(&request);
        let mut buf = frame[..3].to_vec();
        assert!(take_frame(&mut buf).expect("partial").is_none());
        buf.extend_from_slice(&frame[3..]);
        buf.extend_from_slice(&frame);
        let body = take_frame(&mut buf).expect("frame").expect("complete");
        assert_eq!(
            pb::Request::decode(body.as_slice()).expect("decode"),
            request
        );
        assert_eq!(buf, frame, "the second frame stays");
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut buf = u32::MAX.to_be_bytes().to_vec();
        assert!(matches!(take_frame(&mut buf), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn an_unknown_request_kind_decodes_as_none() {
        // Field 99 (a request kind of a newer berthd), length-delimited, empty.
        let body = [0x9a, 0x06, 0x00];
        let request = pb::Request::decode(&body[..]).expect("decode");
        assert!(request.kind.is_none());
    }

    #[test]
    fn status_maps_both_ways() {
        let mut status = MonitorStatus::new(42);
        status.state = ContainerState::Running;
        status.exit_code = 137;
        status.reason = "Error".into();
        let wire = pb::ContainerStatus::from(&status);
        assert_eq!(MonitorStatus::try_from(wire), Ok(status));
    }
}
