//! The infra process of a pod that shares one PID namespace: berth's own tiny
//! PID 1 (`berthd pod-infra`, hidden), not an image. It reaps orphans and
//! lives until killed; its PID namespace is pinned like the pod's others.
//!
//! `berthd pod-infra` runs with CLONE_NEWPID unshared by its launcher, so its
//! first child is PID 1 of the new namespace; it prints that child's pid and
//! exits, and the child is reparented away from berthd.
//!
//! In a pod with its own user namespace the infra runs as that namespace's
//! root (never as host root, which owns the host's files), chrooted into an
//! empty directory with no capabilities: the pod's containers share its PID
//! namespace and could otherwise reach the host's "/" through its
//! /proc/PID/root.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{ForkResult, Pid, fork, setsid};

use super::RuntimeError;

/// The hidden subcommand: fork PID 1 of the new namespace, print its pid.
/// With `root`, first chroot there and drop every capability.
pub fn run(root: Option<&Path>) -> i32 {
    // Opened before a chroot hides it.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    if let Some(root) = root
        && let Err(e) = jail(root)
    {
        eprintln!("berthd pod-infra: {e}");
        return 1;
    }
    // SAFETY: this process is single-threaded (no async runtime exists yet),
    // so the child may run any code after fork.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{child}");
            let _ = out.flush();
            0
        }
        Ok(ForkResult::Child) => pid1(null.ok()),
        Err(e) => {
            eprintln!("berthd pod-infra: fork: {e}");
            1
        }
    }
}

fn jail(root: &Path) -> Result<(), String> {
    nix::unistd::chroot(root).map_err(|e| format!("chroot {}: {e}", root.display()))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    // Not even the pod's root may trace it without CAP_SYS_PTRACE.
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("set non-dumpable: {e}"))?;
    crate::monitor::caps::drop_all().map_err(|e| e.to_string())
}

/// PID 1 of the pod: no stdio, own session, reap every child, exit on
/// SIGTERM or SIGINT (SIGKILL needs no handling).
fn pid1(null: Option<std::fs::File>) -> ! {
    // Let go of the launcher's pipes: it reads stdout until every copy closes.
    if let Some(null) = null {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
    let _ = setsid();
    let mut wanted = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        wanted.add(s);
    }
    let _ = wanted.thread_block();
    crate::monitor::release_code_pages();
    loop {
        match wanted.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(_) => {}
        }
    }
}

/// Where the infra of a pod with its own user namespace lives.
pub struct Jail {
    /// The pod's pinned user namespace.
    pub userns: PathBuf,
    /// An empty directory for its root, made here, removed with the pod's.
    pub root: PathBuf,
}

/// Starts the infra process of a pod in the pod's cgroups and pins its PID
/// namespace at `pin`. With a `jail`, the infra joins the
/// pod's user namespace as its root before the PID namespace is made, so
/// that the user namespace owns it (the pod's containers can mount their
/// /proc only then), and jails itself. Returns its pid.
pub fn start(
    exe: &Path,
    cgroup_procs: &[PathBuf],
    pin: &Path,
    jail: Option<&Jail>,
) -> Result<i32, RuntimeError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| RuntimeError::Io { what, source }
    };
    // Opened here, written in the child: the infra is born in the pod's
    // cgroups, so a crash before its pin leaves nothing outside them.
    let procs: Vec<std::fs::File> = cgroup_procs
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p))
        .collect::<Result<_, _>>()
        .map_err(io("open the pod's cgroups"))?;
    let mut command = Command::new(exe);
    command
        .arg("pod-infra")
        .arg("--pin")
        .arg(pin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let userns = match jail {
        Some(jail) => {
            std::fs::create_dir_all(&jail.root).map_err(io("create the infra's root"))?;
            command.arg("--root").arg(&jail.root);
            Some(std::fs::File::open(&jail.userns).map_err(io("open the pod's user namespace"))?)
        }
        None => None,
    };
    // SAFETY: write, setns, setgroups, setres[ug]id and unshare are plain
    // syscalls that allocate nothing; the forked child is single-threaded, as
    // joining a user namespace needs. "0" moves the writing process, before
    // it becomes the user namespace's root, which may not write there.
    unsafe {
        command.pre_exec(move || {
            for f in &procs {
                nix::unistd::write(f, b"0").map_err(std::io::Error::from)?;
            }
            if let Some(ns) = &userns {
                nix::sched::setns(ns, CloneFlags::CLONE_NEWUSER)?;
                // Its root keeps its capabilities across exec, for the chroot.
                nix::unistd::setgroups(&[])?;
                let (uid, gid) = (nix::unistd::Uid::from_raw(0), nix::unistd::Gid::from_raw(0));
                nix::unistd::setresgid(gid, gid, gid)?;
                nix::unistd::setresuid(uid, uid, uid)?;
            }
            unshare(CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from)
        });
    }
    let out = command
        .output()
        .map_err(io("start the pod infra process"))?;
    if !out.status.success() {
        return Err(RuntimeError::Io {
            what: "start the pod infra process".to_string(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| RuntimeError::Io {
            what: "read the pod infra pid".to_string(),
            source: std::io::Error::other("no pid printed"),
        })?;
    let pinned = (|| {
        std::fs::File::create(pin).map_err(io("create the pid namespace pin"))?;
        nix::mount::mount(
            Some(Path::new(&format!("/proc/{pid}/ns/pid"))),
            pin,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| RuntimeError::Io {
            what: "pin the pod's pid namespace".to_string(),
            source: e.into(),
        })
    })();
    if let Err(e) = pinned {
        // Ours since a moment ago, so its pid cannot have been reused: kill it.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        stop(pid, pin);
        return Err(e);
    }
    Ok(pid)
}

/// Kills the infra process, and with it every process of the pod's PID
/// namespace, if `pin` still names that process's namespace (so a reused pid
/// is never killed). Repeatable.
pub fn stop(pid: i32, pin: &Path) {
    let same = match (
        std::fs::metadata(pin),
        std::fs::metadata(format!("/proc/{pid}/ns/pid")),
    ) {
        (Ok(a), Ok(b)) => {
            use std::os::unix::fs::MetadataExt;
            a.ino() == b.ino() && a.dev() == b.dev()
        }
        _ => false,
    };
    if same {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        // It is not our child: wait for /proc to forget it, briefly.
        let began = std::time::Instant::now();
        for _ in 0..200 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie nobody has reaped yet is as good as gone.
            if stat.is_empty()
                || stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, r)| r.starts_with('Z'))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        tracing::debug!(pid, waited = ?began.elapsed(), "pod infra killed");
    }
    unpin(pin);
}

/// Unmounts and removes the pid namespace pin; repeatable.
fn unpin(pin: &Path) {
    if let Err(e) = nix::mount::umount2(pin, nix::mount::MntFlags::MNT_DETACH)
        && e != nix::Error::EINVAL
        && e != nix::Error::ENOENT
    {
        tracing::warn!(pin = %pin.display(), error = %e, "cannot unpin the pid namespace");
    }
    let _ = std::fs::remove_file(pin);
}

/// Kills the infra process of a pod whose record is lost, found by its
/// `--pin` argument (it kills its namespace's processes with it), and
/// removes the pin, which a start cut short may have mounted already.
pub fn remove_unrecorded(pin: &Path) {
    crate::procs::kill_with_args(&[b"pod-infra", b"--pin", pin.as_os_str().as_encoded_bytes()]);
    unpin(pin);
}
