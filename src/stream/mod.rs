//! The streaming server of exec, attach and port-forward. The CRI RPCs
//! Exec, Attach and PortForward only prepare a session and answer a URL with
//! a single-use token; the client (kubelet, crictl) opens that URL and
//! upgrades the connection to SPDY/3.1 or WebSocket, and the session runs on
//! it: remotecommand for exec and attach, portforward.k8s.io for ports.

mod portforward;
mod remotecommand;
mod server;
pub mod spdy;
mod spdy_conn;
mod tokens;
pub mod websocket;

pub use server::StreamServer;
pub use tokens::TokenError;

/// An Exec to serve: the CRI request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// An Attach to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// A PortForward to serve; the ports a client may ask for come with each
/// connection, the request's list is advisory (as in kubelet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardRequest {
    pub pod_id: String,
    pub ports: Vec<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The request is malformed (the CRI InvalidArgument).
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("streaming TLS: {0}")]
    Tls(String),
}

/// When a streaming connection last carried anything either way, for its
/// idle timeout.
pub(crate) struct Activity {
    start: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            start: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn idle_for(&self) -> std::time::Duration {
        let now = self.start.elapsed().as_millis() as u64;
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        std::time::Duration::from_millis(now.saturating_sub(last))
    }
}

/// The rules kubelet's streaming server applies to exec and attach streams.
fn check_streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<(), StreamError> {
    if tty && stderr {
        return Err(StreamError::InvalidArgument(
            "tty and stderr cannot both be true: a terminal has one output".to_string(),
        ));
    }
    if !stdin && !stdout && !stderr {
        return Err(StreamError::InvalidArgument(
            "one of stdin, stdout and stderr must be true".to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_checked_as_kubelet_checks_them() {
        assert!(check_streams(true, true, true, false).is_ok());
        assert!(check_streams(false, false, true, true).is_ok());
        assert!(check_streams(true, true, true, true).is_err());
        assert!(check_streams(false, false, false, false).is_err());
    }
}
