//! `berthd exec-in`: runs one command inside a running container (ExecSync).
//! It joins the container's cgroups and namespaces (mount last), forks so the
//! child is inside the pid namespace, gives the child the container process's
//! user, groups, capabilities, rlimits and environment, and exits with the
//! child's exit code. Its own failures go to stderr behind [`ERROR_PREFIX`].
//! For a streaming Exec it relays the command's stdio ([`exec_stream`]).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, getppid, pipe2};
use oci_spec::runtime::{Process, Spec};

use super::exec_stream::{self, StreamMode, StreamStdio};
use super::init::{load_seccomp, seccomp_program};
use super::{MonitorConfig, Step, StepError, process};
use crate::runtime::seccomp::Program;

/// Starts every line exec-in writes about its own failure.
pub(crate) const ERROR_PREFIX: &str = "berthd exec-in: ";
/// Exit codes of exec-in's own failures (with a message behind ERROR_PREFIX).
pub(crate) const EXIT_TIMEOUT: i32 = 124;
pub(crate) const EXIT_SETUP: i32 = 125;
pub(crate) const EXIT_CANNOT_EXEC: i32 = 126;
pub(crate) const EXIT_NOT_FOUND: i32 = 127;

/// Namespaces joined, in order: user first, since it owns the others; mount
/// last, since it changes what paths mean.
const NAMESPACES: [(&str, CloneFlags); 7] = [
    ("user", CloneFlags::CLONE_NEWUSER),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

struct Failure {
    code: i32,
    message: String,
}

impl From<StepError> for Failure {
    fn from(e: StepError) -> Failure {
        Failure {
            code: EXIT_SETUP,
            message: e.to_string(),
        }
    }
}

/// The `exec-in` subcommand; returns the exit code. Must run before any
/// thread exists (setns of a mount namespace needs a single thread).
pub fn exec_in(bundle: &Path, init_pid: i32, timeout_ms: Option<u64>, args: &[String]) -> i32 {
    match run(
        bundle,
        init_pid,
        timeout_ms.map(Duration::from_millis),
        args,
    ) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("{ERROR_PREFIX}{}", failure.message);
            failure.code
        }
    }
}

fn run(
    bundle: &Path,
    init_pid: i32,
    timeout: Option<Duration>,
    args: &[String],
) -> Result<i32, Failure> {
    if init_pid <= 0 {
        return Err(StepError::msg("exec-in", format!("invalid init pid {init_pid}")).into());
    }
    let spec: Spec = super::read_bundle_json(&bundle.join(super::CONFIG_FILE))?;
    let config: MonitorConfig = super::read_bundle_json(&bundle.join(super::MONITOR_CONFIG_FILE))?;
    let process = spec.process().clone().unwrap_or_default();
    // The container's seccomp filter, read while the bundle is in sight.
    let seccomp = seccomp_program(&spec, Some(bundle))?;
    let mode = StreamMode::from_env();
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    // SIGPIPE too: a command that closes its stdin must not kill the relay.
    // The child unblocks every signal before exec.
    let mut blocked = chld;
    blocked.add(Signal::SIGPIPE);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).step(|| "block signals".into())?;
    let signals = SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC).step(|| "signalfd".into())?;
    // Open them all while /proc is still the host's.
    let mut namespaces = Vec::new();
    for (name, flag) in NAMESPACES {
        let theirs = format!("/proc/{init_pid}/ns/{name}");
        let ours = if name == "pid" {
            "/proc/self/ns/pid_for_children".to_string()
        } else {
            format!("/proc/self/ns/{name}")
        };
        let file = File::open(&theirs).step(|| format!("open {theirs}"))?;
        let same = match (file.metadata(), std::fs::metadata(&ours)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same {
            namespaces.push((file, flag, theirs));
        }
    }
    let me = getpid();
    for procs in &config.cgroup_procs {
        std::fs::write(procs, me.to_string())
            .step(|| format!("join cgroup {}", procs.display()))?;
    }
    // Host root still (the command inherits them): in a user namespace
    // raising a hard limit is refused, and /proc/self/oom_score_adj belongs
    // to an unmapped root.
    process::set_rlimits(&process)?;
    process::set_oom_score_adj(process.oom_score_adj())?;
    for (file, flag, path) in &namespaces {
        setns(file.as_fd(), *flag).step(|| format!("join {path}"))?;
        if *flag == CloneFlags::CLONE_NEWUSER {
            process::become_userns_root()?;
        }
    }
    // A parent outside the child's pid namespace shows as pid 0 to it.
    let joined_pid_ns = namespaces
        .iter()
        .any(|(_, flag, _)| *flag == CloneFlags::CLONE_NEWPID);
    let parent = if joined_pid_ns { Pid::from_raw(0) } else { me };
    drop(namespaces);
    // Streaming stdio; in the container's mount namespace now, so a terminal
    // comes from its own devpts.
    let stdio = mode.map(StreamStdio::open).transpose()?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).step(|| "pipe".into())?;
    // SAFETY: exec-in runs before any other thread exists.
    match unsafe { fork() }.step(|| "fork".into())? {
        ForkResult::Child => {
            drop(err_r);
            let message = match stdio.map(StreamStdio::install).transpose() {
                Ok(_) => exec_child(&process, args, parent, seccomp.as_ref()),
                Err(e) => e.to_string(),
            };
            let code = if message.contains("executable file not found") {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXEC
            };
            let _ = nix::unistd::write(&err_w, message.as_bytes());
            std::process::exit(code)
        }
        ForkResult::Parent { child } => {
            drop(err_w);
            let Some(stdio) = stdio else {
                return wait_child(child, &signals, &File::from(err_r), timeout);
            };
            let (code, message) = exec_stream::relay(stdio, child, &signals, &File::from(err_r))?;
            if !message.is_empty() {
                return Err(Failure {
                    code,
                    message: String::from_utf8_lossy(&message).into_owned(),
                });
            }
            Ok(code)
        }
    }
}

/// The child: becomes the container's process and execs; returns the error.
/// `parent` is the parent's pid as the child sees it. The seccomp filter is
/// loaded as the init loads it: last, or before the capability drop when
/// no_new_privs is off.
fn exec_child(
    process: &Process,
    args: &[String],
    parent: Pid,
    seccomp: Option<&Program>,
) -> String {
    let setup = || -> Result<(), StepError> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set pdeathsig".into())?;
        if getppid() != parent {
            return Err(StepError::msg("exec-in", "parent exited"));
        }
        process::unblock_signals()?;
        process::set_no_new_privs(process)?;
        let seccomp_last = process.no_new_privileges() == Some(true);
        if !seccomp_last {
            load_seccomp(seccomp)?;
        }
        process::set_identity(process)?;
        // A change of credentials clears the parent-death signal.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).step(|| "set pdeathsig".into())?;
        process::chdir(process)?;
        process::set_umask(process);
        process::cloexec_above_stdio()?;
        if seccomp_last {
            load_seccomp(seccomp)?;
        }
        Ok(())
    };
    if let Err(e) = setup() {
        return e.to_string();
    }
    let env = process.env().as_deref().unwrap_or_default();
    process::exec(args, env)
}

/// Waits for the child (and its exec report); kills it at the deadline.
fn wait_child(
    child: Pid,
    signals: &SignalFd,
    errors: &File,
    timeout: Option<Duration>,
) -> Result<i32, Failure> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut message = Vec::new();
    let mut errors_open = true;
    let mut status = None;
    while status.is_none() || errors_open {
        let wait = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let _ = kill(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    return Err(Failure {
                        code: EXIT_TIMEOUT,
                        message: format!(
                            "timed out after {} ms",
                            timeout.unwrap_or_default().as_millis()
                        ),
                    });
                }
                PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32 + 1)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let (sig_ready, err_ready) = {
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            if errors_open {
                fds.push(PollFd::new(errors.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, wait) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(StepError {
                        step: "poll".into(),
                        source: e.into(),
                    }
                    .into());
                }
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if err_ready {
            let mut buf = [0u8; 4096];
            match nix::unistd::read(errors, &mut buf) {
                Ok(0) => errors_open = false,
                Ok(n) => message.extend_from_slice(&buf[..n]),
                Err(Errno::EINTR) => {}
                Err(_) => errors_open = false,
            }
        }
        if sig_ready {
            let _ = signals.read_signal();
        }
        if status.is_none() {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => status = Some(code),
                Ok(WaitStatus::Signaled(_, signal, _)) => status = Some(128 + signal as i32),
                Ok(_) => {}
                Err(e) => {
                    return Err(StepError {
                        step: "wait for the command".into(),
                        source: e.into(),
                    }
                    .into());
                }
            }
        }
    }
    let code = status.unwrap_or(EXIT_SETUP);
    if !message.is_empty() {
        return Err(Failure {
            code,
            message: String::from_utf8_lossy(&message).into_owned(),
        });
    }
    Ok(code)
}
