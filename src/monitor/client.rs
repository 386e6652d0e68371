//! berthd's side of the monitor, for async (tokio) code: launch a monitor
//! and wait until its container is created, talk to it over its control
//! socket, learn of the exit from the connection closing, read status.json
//! when the monitor is gone, and run ExecSync through `berthd exec-in`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Command;

use super::exec::{ERROR_PREFIX, EXIT_CANNOT_EXEC, EXIT_NOT_FOUND, EXIT_SETUP, EXIT_TIMEOUT};
use super::protocol::{self, pb};
pub use super::{ContainerState, MonitorConfig, MonitorError, MonitorStatus};

/// Most output kept per stream of an ExecSync; the rest is read and dropped.
pub const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// Runs `exe monitor --bundle BUNDLE` and waits until the container is
/// created (its init waits for Start) or creating it failed. The monitor
/// lives on detached from berthd. Blocking (it waits for the container's
/// setup): call it through `tokio::task::spawn_blocking`.
pub fn launch(exe: &Path, bundle: &Path) -> Result<(), MonitorError> {
    let output = std::process::Command::new(exe)
        .arg("monitor")
        .arg("--bundle")
        .arg(bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| MonitorError::Spawn {
            exe: exe.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        tracing::debug!(bundle = %bundle.display(), "container created");
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stderr);
    let text = text.trim();
    let text = text.strip_prefix("berthd: ").unwrap_or(text);
    let prefix = format!("cannot create container in {}: ", bundle.display());
    let message = text.strip_prefix(prefix.as_str()).unwrap_or(text);
    let message = if message.is_empty() {
        format!("monitor exited with {}", output.status)
    } else {
        message.to_string()
    };
    tracing::debug!(bundle = %bundle.display(), error = %message, "container not created");
    Err(MonitorError::Create {
        bundle: bundle.to_path_buf(),
        message,
    })
}

/// Kills every process still running `monitor --bundle BUNDLE`: the
/// launcher, the monitor and an init that has not exec'd yet all carry that
/// command line. For a creation that was cut short or failed half-way.
pub fn kill_launched(bundle: &Path) {
    crate::procs::kill_with_args(&[
        b"monitor",
        b"--bundle",
        bundle.as_os_str().as_encoded_bytes(),
    ]);
}

/// The container's status.json: works whether or not its monitor still runs.
/// Blocking, but one small file.
pub fn read_status(bundle: &Path) -> Result<MonitorStatus, MonitorError> {
    Ok(crate::store::read_json(&bundle.join(super::STATUS_FILE))?)
}

/// One connection to a container's monitor. Requests are answered in order;
/// several connections may be open at once. Keep one open and call
/// [`MonitorConnection::wait_closed`] to learn of the container's exit.
#[derive(Debug)]
pub struct MonitorConnection {
    bundle: PathBuf,
    stream: UnixStream,
    hello: pb::Hello,
}

impl MonitorConnection {
    /// Connects and reads the monitor's Hello.
    pub async fn connect(bundle: &Path) -> Result<MonitorConnection, MonitorError> {
        let (path, _dir) = super::socket_path(bundle).map_err(|e| MonitorError::Connect {
            path: bundle.join(super::SOCKET_FILE),
            source: std::io::Error::other(e.to_string()),
        })?;
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|source| MonitorError::Connect {
                path: bundle.join(super::SOCKET_FILE),
                source,
            })?;
        let mut conn = MonitorConnection {
            bundle: bundle.to_path_buf(),
            stream,
            hello: pb::Hello::default(),
        };
        let body = conn.read_frame().await?;
        conn.hello =
            pb::Hello::decode(body.as_slice()).map_err(|e| conn.protocol(e.to_string()))?;
        if conn.hello.protocol_version == 0 {
            return Err(conn.protocol("hello without a protocol version".into()));
        }
        Ok(conn)
    }

    /// The protocol version the monitor speaks (1 or newer).
    pub fn protocol_version(&self) -> u32 {
        self.hello.protocol_version
    }

    pub fn monitor_pid(&self) -> i32 {
        self.hello.monitor_pid
    }

    /// Host pid of the container's init.
    pub fn init_pid(&self) -> i32 {
        self.hello.init_pid
    }

    /// Releases the created container; returns once it runs. A failed exec
    /// (e.g. executable not found) is `Refused` with the exec error, and the
    /// container is then exited with reason StartError.
    pub async fn start(&mut self) -> Result<MonitorStatus, MonitorError> {
        self.call(pb::request::Kind::Start(pb::StartRequest {}), "start")
            .await
    }

    /// Sends `signal` to the init, or with `all` to every process of the
    /// container's cgroups.
    pub async fn kill(&mut self, signal: i32, all: bool) -> Result<MonitorStatus, MonitorError> {
        self.call(
            pb::request::Kind::Kill(pb::KillRequest { signal, all }),
            "kill",
        )
        .await
    }

    /// Reopens the log file after kubelet renamed it; returns once the new
    /// file exists.
    pub async fn reopen_log(&mut self) -> Result<MonitorStatus, MonitorError> {
        self.call(
            pb::request::Kind::ReopenLog(pb::ReopenLogRequest {}),
            "reopen_log",
        )
        .await
    }

    pub async fn status(&mut self) -> Result<MonitorStatus, MonitorError> {
        self.call(pb::request::Kind::Status(pb::StatusRequest {}), "status")
            .await
    }

    /// Returns when the monitor closes the connection: the container has
    /// exited and status.json holds its exit (or the monitor died; tell the
    /// two apart with [`read_status`]).
    pub async fn wait_closed(mut self) {
        let mut buf = [0u8; 512];
        loop {
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    pub(super) async fn call(
        &mut self,
        kind: pb::request::Kind,
        request: &'static str,
    ) -> Result<MonitorStatus, MonitorError> {
        let frame = protocol::encode_frame(&pb::Request { kind: Some(kind) });
        self.stream
            .write_all(&frame)
            .await
            .map_err(|source| self.io(source))?;
        let body = self.read_frame().await?;
        let response =
            pb::Response::decode(body.as_slice()).map_err(|e| self.protocol(e.to_string()))?;
        if !response.ok {
            return Err(MonitorError::Refused {
                bundle: self.bundle.clone(),
                request,
                error: response.error,
            });
        }
        let status = response
            .status
            .ok_or_else(|| self.protocol("response without status".into()))?;
        MonitorStatus::try_from(status).map_err(|e| self.protocol(e))
    }

    async fn read_frame(&mut self) -> Result<Vec<u8>, MonitorError> {
        let mut header = [0u8; 4];
        self.stream
            .read_exact(&mut header)
            .await
            .map_err(|source| self.io(source))?;
        let len = protocol::frame_len(header).map_err(|e| self.protocol(e.to_string()))?;
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|source| self.io(source))?;
        Ok(body)
    }

    fn io(&self, source: std::io::Error) -> MonitorError {
        MonitorError::Io {
            bundle: self.bundle.clone(),
            source,
        }
    }

    fn protocol(&self, reason: String) -> MonitorError {
        MonitorError::Protocol {
            bundle: self.bundle.clone(),
            reason,
        }
    }
}

impl MonitorConnection {
    pub(super) fn bundle(&self) -> &Path {
        &self.bundle
    }

    /// The connection's parts, for a session that takes it over (attach).
    pub(super) fn into_parts(self) -> (PathBuf, UnixStream) {
        (self.bundle, self.stream)
    }
}

/// What an ExecSync produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command's exit code; 128+N when killed by signal N.
    pub exit_code: i32,
}

/// Runs `args` inside the container whose init is `init_pid` through
/// `exe exec-in`, collecting at most [`EXEC_OUTPUT_LIMIT`] bytes per stream.
/// At `timeout` the command is killed and the result is `Timeout`.
pub async fn exec_sync(
    exe: &Path,
    bundle: &Path,
    init_pid: i32,
    args: &[String],
    timeout: Option<Duration>,
) -> Result<ExecOutput, MonitorError> {
    if args.is_empty() {
        return Err(MonitorError::ExecStart("no command given".into()));
    }
    let mut cmd = Command::new(exe);
    cmd.arg("exec-in")
        .arg("--bundle")
        .arg(bundle)
        .arg("--init-pid")
        .arg(init_pid.to_string());
    if let Some(t) = timeout {
        cmd.arg("--timeout-ms")
            .arg(t.as_millis().max(1).to_string());
    }
    cmd.arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| MonitorError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let run = async {
        let (out, err, status) =
            tokio::join!(read_capped(stdout), read_capped(stderr), child.wait());
        (out, err, status)
    };
    // The helper kills the command at `timeout` itself; this is the backstop
    // for a helper that hangs (its command dies with it by PDEATHSIG).
    let (stdout, stderr, status) = match timeout {
        None => run.await,
        Some(t) => match tokio::time::timeout(t + Duration::from_secs(2), run).await {
            Ok(done) => done,
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(MonitorError::Timeout(t));
            }
        },
    };
    let status = status.map_err(|source| MonitorError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
    let exit_code = match status.code() {
        Some(code) => code,
        None => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0),
    };
    if let Some(message) = helper_error(exit_code, &stderr) {
        if exit_code == EXIT_TIMEOUT {
            return Err(MonitorError::Timeout(timeout.unwrap_or_default()));
        }
        return Err(MonitorError::ExecStart(message));
    }
    Ok(ExecOutput {
        stdout,
        stderr,
        exit_code,
    })
}

/// The helper's own failure message, if the exit was one of its own.
pub(super) fn helper_error(exit_code: i32, stderr: &[u8]) -> Option<String> {
    let own = [EXIT_TIMEOUT, EXIT_SETUP, EXIT_CANNOT_EXEC, EXIT_NOT_FOUND].contains(&exit_code);
    let text = std::str::from_utf8(stderr).ok()?;
    let message = text.strip_prefix(ERROR_PREFIX).filter(|_| own)?;
    Some(message.trim_end().to_string())
}

async fn read_capped(reader: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(mut reader) = reader else {
        return out;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                let keep = n.min(EXEC_OUTPUT_LIMIT - out.len());
                out.extend_from_slice(&buf[..keep]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_helpers_own_failures_are_errors() {
        let err = b"berthd exec-in: exec: \"nope\": executable file not found in $PATH\n";
        assert_eq!(
            helper_error(127, err).as_deref(),
            Some("exec: \"nope\": executable file not found in $PATH")
        );
        // The command's own 127, e.g. from a shell.
        assert_eq!(helper_error(127, b"sh: nope: not found\n"), None);
        // A command that prints the prefix but exits 0 is the command's output.
        assert_eq!(helper_error(0, err), None);
    }

    #[tokio::test]
    async fn read_capped_keeps_the_first_bytes_and_drains_the_rest() {
        let data = vec![7u8; EXEC_OUTPUT_LIMIT + 1000];
        let out = read_capped(Some(&data[..])).await;
        assert_eq!(out.len(), EXEC_OUTPUT_LIMIT);
    }
}
