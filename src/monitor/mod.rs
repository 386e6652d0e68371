//! The per-container monitor: `berthd monitor --bundle DIR` creates the
//! container (init set up fully, waiting for start), holds its stdio (and
//! shares it with attached clients), writes the CRI log, reaps it and records
//! its exit; plus the `exec-in` helper and the berthd-side client that drives
//! both.
//!
//! A bundle directory holds what berthd writes (`config.json`, an OCI runtime
//! spec whose root is already mounted, and `monitor.json`) and what the monitor
//! writes (`status.json`, `monitor.sock`, `monitor.log`).

mod attach;
pub(crate) mod caps;
pub mod client;
mod exec;
mod exec_frame;
mod exec_stream;
mod init;
pub mod log;
mod memory;
mod process;
pub mod protocol;
mod rootfs;
mod session;
mod supervisor;
mod sync;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{ExecOutput, MonitorConnection, exec_sync, kill_launched, launch, read_status};
pub use exec::exec_in;
pub use memory::release_code_pages;
pub use session::{
    AttachInput, AttachOutput, AttachStreams, ExecInput, ExecOutputStream, ExecProcess,
    ExecStreams, OutputChunk, StreamingExec, exec_stream,
};

use crate::store::StoreError;

/// Version of the control protocol this monitor speaks (proto/monitor.proto).
pub const PROTOCOL_VERSION: u32 = 2;
/// The first protocol version with Attach.
pub const ATTACH_PROTOCOL_VERSION: u32 = 2;
/// The OCI runtime spec berthd writes into the bundle.
pub const CONFIG_FILE: &str = "config.json";
/// The monitor's own settings ([`MonitorConfig`]), written by berthd.
pub const MONITOR_CONFIG_FILE: &str = "monitor.json";
/// The container's status ([`MonitorStatus`]), written by the monitor.
pub const STATUS_FILE: &str = "status.json";
/// The monitor's control socket.
pub const SOCKET_FILE: &str = "monitor.sock";
/// Where the monitor writes its own errors (it has no terminal).
pub const MONITOR_LOG_FILE: &str = "monitor.log";

/// Reasons recorded in [`MonitorStatus::reason`], as kubelet expects them.
pub const REASON_COMPLETED: &str = "Completed";
pub const REASON_ERROR: &str = "Error";
pub const REASON_OOM_KILLED: &str = "OOMKilled";
pub const REASON_START_ERROR: &str = "StartError";

/// Exit code recorded when the process could not be executed.
pub const START_ERROR_EXIT_CODE: i32 = 128;

/// `monitor.json`: what the monitor needs beyond the OCI spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub id: String,
    /// Absolute path of the CRI log file; its directory is created if missing.
    pub log_path: PathBuf,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdin_once: bool,
    #[serde(default)]
    pub tty: bool,
    /// `cgroup.procs` files to put the init into: one per cgroup v1
    /// controller, or one for v2.
    #[serde(default)]
    pub cgroup_procs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    /// Never written by a monitor: berthd's view of a container whose
    /// monitor died without recording an exit ([`MonitorStatus::lost`]).
    Unknown,
}

/// `status.json`, and the status in every protocol response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorStatus {
    pub protocol: u32,
    pub monitor_pid: i32,
    pub init_pid: i32,
    pub state: ContainerState,
    /// Unix nanoseconds; 0 if not yet.
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    /// The exit code; 128+N when killed by signal N; 128 for a start error.
    pub exit_code: i32,
    /// The signal that killed the process, 0 if none.
    pub signal: i32,
    pub oom_killed: bool,
    /// "", "Completed", "Error", "OOMKilled" or "StartError".
    pub reason: String,
    pub message: String,
}

impl MonitorStatus {
    /// A status for a container whose monitor is gone without a record.
    pub fn lost(message: &str) -> MonitorStatus {
        let mut status = MonitorStatus::new(0);
        status.state = ContainerState::Unknown;
        status.reason = "Unknown".into();
        status.message = message.into();
        status
    }

    fn new(monitor_pid: i32) -> MonitorStatus {
        MonitorStatus {
            protocol: PROTOCOL_VERSION,
            monitor_pid,
            init_pid: 0,
            state: ContainerState::Created,
            created_at: 0,
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            signal: 0,
            oom_killed: false,
            reason: String::new(),
            message: String::new(),
        }
    }
}

/// Errors of the berthd-side API.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot run {exe}: {source}")]
    Spawn { exe: PathBuf, source: io::Error },
    #[error("cannot create container in {bundle}: {message}")]
    Create { bundle: PathBuf, message: String },
    #[error("cannot connect to the monitor at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("monitor connection of {bundle}: {source}")]
    Io { bundle: PathBuf, source: io::Error },
    #[error("monitor of {bundle} broke the protocol: {reason}")]
    Protocol { bundle: PathBuf, reason: String },
    #[error("monitor of {bundle} refused {request}: {error}")]
    Refused {
        bundle: PathBuf,
        request: &'static str,
        error: String,
    },
    #[error("cannot read the container status: {0}")]
    Status(#[from] StoreError),
    #[error("command did not finish within {0:?}")]
    Timeout(Duration),
    #[error("cannot start command in container: {0}")]
    ExecStart(String),
}

/// An OS error with the step that failed: the error type of the monitor, the
/// container init and the exec helper, whose messages end up in status.json
/// or on the launcher's stderr.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub(crate) struct StepError {
    step: String,
    source: io::Error,
}

impl StepError {
    /// An error that is no OS error, e.g. invalid spec content.
    fn msg(step: impl Into<String>, reason: impl Into<String>) -> StepError {
        StepError {
            step: step.into(),
            source: io::Error::other(reason.into()),
        }
    }
}

/// Adds the failing step to a syscall or I/O result.
trait Step<T> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T, StepError>;
}

impl<T, E: Into<io::Error>> Step<T> for Result<T, E> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T, StepError> {
        self.map_err(|e| StepError {
            step: step(),
            source: e.into(),
        })
    }
}

/// Runs the monitor for `bundle`: forks, and in this process waits until the
/// container is created (Ok) or failed (Err with the reason). The forked
/// monitor lives on detached. Must run before any thread exists.
pub fn run(bundle: &Path) -> Result<(), MonitorError> {
    supervisor::launch(bundle)
}

/// The control socket's address for `bundle`. A path too long for a unix
/// socket address goes through /proc/self/fd of the open bundle directory,
/// which must stay open while the address is in use.
pub(crate) fn socket_path(bundle: &Path) -> Result<(PathBuf, Option<std::fs::File>), StepError> {
    let path = bundle.join(SOCKET_FILE);
    // sun_path holds 108 bytes with the terminating NUL.
    if path.as_os_str().len() < 100 {
        return Ok((path, None));
    }
    let dir = std::fs::File::open(bundle).step(|| format!("open {}", bundle.display()))?;
    let short = PathBuf::from(format!(
        "/proc/self/fd/{}/{SOCKET_FILE}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ));
    Ok((short, Some(dir)))
}

/// Unix nanoseconds now.
fn now_nanos() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// Reads a JSON file of the bundle.
fn read_bundle_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StepError> {
    crate::store::read_json(path).map_err(|e| StepError::msg("bundle", e.to_string()))
}

/// The directories of the container's cgroups (parents of its `cgroup.procs`).
fn cgroup_dirs(config: &MonitorConfig) -> Vec<PathBuf> {
    config
        .cgroup_procs
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_json_round_trips_with_defaults() {
        let config: MonitorConfig =
            serde_json::from_str(r#"{"id":"c1","log_path":"/var/log/pods/x/0.log"}"#)
                .expect("parse");
        assert!(!config.tty && !config.stdin && config.cgroup_procs.is_empty());
        let json = serde_json::to_string(&config).expect("serialize");
        let back: MonitorConfig = serde_json::from_str(&json).expect("reparse");
        assert_eq!(back, config);
    }

    #[test]
    fn status_json_uses_lowercase_states() {
        let mut status = MonitorStatus::new(7);
        status.state = ContainerState::Exited;
        let json = serde_json::to_value(&status).expect("serialize");
        assert_eq!(json["state"], "exited");
        assert_eq!(json["protocol"], PROTOCOL_VERSION);
    }
}
