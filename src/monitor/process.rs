//! The spec's `process` applied to the calling process, shared by the
//! container init and the exec helper: rlimits, oom_score_adj, user and
//! groups, capabilities, no_new_privs, umask, cwd; then the PATH lookup and
//! execve, whose failure comes back as the text kubelet shows.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use nix::sys::stat::{Mode, umask};
use nix::unistd::{AccessFlags, Gid, Uid, access, execve, setgroups, setresgid, setresuid};
use oci_spec::runtime::{PosixRlimitType, Process};

use super::caps::CapSets;
use super::{Step, StepError};

/// PATH when the container's environment has none (as runc and Docker use).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Unblocks every signal: the monitor blocks some, and a blocked mask
/// survives exec.
pub(crate) fn unblock_signals() -> Result<(), StepError> {
    // Rust ignores SIGPIPE at start, and an ignored signal stays ignored
    // across exec: `yes | head` in a container would never end.
    // SAFETY: restoring the default disposition installs no handler code.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    }
    .step(|| "reset SIGPIPE".into())?;
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .step(|| "reset the signal mask".into())
}

fn resource(typ: PosixRlimitType) -> Resource {
    match typ {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

/// The limits to set given the current hard limit: raising a hard limit
/// needs CAP_SYS_RESOURCE, which root may lack, so never go above it.
fn clamp_rlimit(soft: u64, hard: u64, current_hard: u64) -> (u64, u64) {
    let hard = hard.min(current_hard);
    (soft.min(hard), hard)
}

pub(crate) fn set_rlimits(process: &Process) -> Result<(), StepError> {
    for limit in process.rlimits().iter().flatten() {
        let res = resource(limit.typ());
        let (_, current_hard) = getrlimit(res).step(|| format!("getrlimit {:?}", limit.typ()))?;
        let (soft, hard) = clamp_rlimit(limit.soft(), limit.hard(), current_hard);
        setrlimit(res, soft, hard).step(|| format!("setrlimit {:?} {soft} {hard}", limit.typ()))?;
    }
    Ok(())
}

/// Writes oom_score_adj. Lowering it needs CAP_SYS_RESOURCE; without it the
/// value stays at least the current one.
pub(crate) fn set_oom_score_adj(adj: Option<i32>) -> Result<(), StepError> {
    let Some(adj) = adj else {
        return Ok(());
    };
    let path = "/proc/self/oom_score_adj";
    let write = |value: i32| {
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(value.to_string().as_bytes()))
    };
    match write(adj) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
            let current: i32 = fs::read_to_string(path)
                .step(|| format!("read {path}"))?
                .trim()
                .parse()
                .map_err(|_| StepError::msg(format!("read {path}"), "not a number"))?;
            write(adj.max(current)).step(|| format!("write {} to {path}", adj.max(current)))
        }
        Err(e) => Err(e).step(|| format!("write {adj} to {path}")),
    }
}

/// Groups, gid, uid and capabilities, in the order that keeps the needed
/// privileges until the end: bounding set first (needs CAP_SETPCAP), keep
/// permitted capabilities across the uid change, then set the final sets.
/// Without `capabilities` in the spec the process keeps what it has.
pub(crate) fn set_identity(process: &Process) -> Result<(), StepError> {
    let caps = process
        .capabilities()
        .as_ref()
        .map(CapSets::from_spec)
        .transpose()?;
    if let Some(caps) = &caps {
        caps.apply_bounding()?;
    }
    nix::sys::prctl::set_keepcaps(true).step(|| "set keep-caps".into())?;
    let user = process.user();
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|&g| Gid::from_raw(g))
        .collect();
    setgroups(&groups).step(|| format!("setgroups {:?}", user.additional_gids()))?;
    let gid = Gid::from_raw(user.gid());
    setresgid(gid, gid, gid).step(|| format!("setgid {gid}"))?;
    let uid = Uid::from_raw(user.uid());
    setresuid(uid, uid, uid).step(|| format!("setuid {uid}"))?;
    nix::sys::prctl::set_keepcaps(false).step(|| "clear keep-caps".into())?;
    if let Some(caps) = &caps {
        caps.apply()?;
    }
    Ok(())
}

/// Right after joining a user namespace: become its root (the host id its
/// container id 0 maps to), keeping every capability in it. An unmapped host
/// root could create no file where the pod's ids apply.
pub(crate) fn become_userns_root() -> Result<(), StepError> {
    setgroups(&[]).step(|| "setgroups in the user namespace".into())?;
    let root = Gid::from_raw(0);
    setresgid(root, root, root).step(|| "setgid 0 in the user namespace".into())?;
    let root = Uid::from_raw(0);
    setresuid(root, root, root).step(|| "setuid 0 in the user namespace".into())
}

pub(crate) fn set_no_new_privs(process: &Process) -> Result<(), StepError> {
    if process.no_new_privileges() == Some(true) {
        nix::sys::prctl::set_no_new_privs().step(|| "set no_new_privs".into())?;
    }
    Ok(())
}

/// The spec's umask, 0022 if it names none.
pub(crate) fn set_umask(process: &Process) {
    let mask = process.user().umask().unwrap_or(0o022);
    umask(Mode::from_bits_truncate(mask as libc::mode_t));
}

pub(crate) fn chdir(process: &Process) -> Result<(), StepError> {
    let cwd = process.cwd();
    let cwd = if cwd.as_os_str().is_empty() {
        Path::new("/")
    } else {
        cwd.as_path()
    };
    nix::unistd::chdir(cwd).step(|| format!("chdir to {}", cwd.display()))
}

/// Marks every descriptor from 3 up close-on-exec, so nothing of the
/// monitor's or berthd's reaches the container process.
pub(crate) fn cloexec_above_stdio() -> Result<(), StepError> {
    // SAFETY: close_range only changes flags of descriptors; no memory involved.
    let rc = unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).step(|| "close_range".into());
    }
    Ok(())
}

/// Looks `name` up like Go's exec.LookPath in the container's PATH.
pub(crate) fn resolve(name: &str, env: &[String]) -> Result<PathBuf, String> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(name);
        let is_file = fs::metadata(&candidate).is_ok_and(|m| m.is_file());
        if is_file && access(&candidate, AccessFlags::X_OK).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "exec: {name:?}: executable file not found in $PATH"
    ))
}

fn cstrings(items: &[String], what: &str) -> Result<Vec<CString>, String> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| format!("exec: {what} {s:?} contains NUL")))
        .collect()
}

/// Executes `args` with `env`; returns only on failure, with the message.
pub(crate) fn exec(args: &[String], env: &[String]) -> String {
    let Some(name) = args.first() else {
        return "exec: process.args is empty".into();
    };
    let path = match resolve(name, env) {
        Ok(path) => path,
        Err(msg) => return msg,
    };
    let prepared = (|| {
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("exec: {name:?} contains NUL"))?;
        Ok::<_, String>((cpath, cstrings(args, "argument")?, cstrings(env, "env")?))
    })();
    let (cpath, cargs, cenv) = match prepared {
        Ok(p) => p,
        Err(msg) => return msg,
    };
    let err: Result<Infallible, Errno> = execve(&cpath, &cargs, &cenv);
    match err {
        Err(e) => format!("exec {}: {}", path.display(), e.desc().to_lowercase()),
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimits_never_exceed_the_current_hard_limit() {
        assert_eq!(clamp_rlimit(1024, 4096, 1_048_576), (1024, 4096));
        assert_eq!(
            clamp_rlimit(2_000_000, 2_000_000, 1_048_576),
            (1_048_576, 1_048_576)
        );
        assert_eq!(
            clamp_rlimit(u64::MAX, u64::MAX, u64::MAX),
            (u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn lookup_uses_the_containers_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("tool");
        fs::write(&exe, b"#!/bin/sh\n").expect("write");
        fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        fs::write(dir.path().join("data"), b"x").expect("write");
        let env = vec![format!("PATH=/nonexistent:{}", dir.path().display())];
        assert_eq!(resolve("tool", &env), Ok(exe));
        assert_eq!(
            resolve("data", &env),
            Err("exec: \"data\": executable file not found in $PATH".into())
        );
        assert_eq!(resolve("/bin/x", &env), Ok(PathBuf::from("/bin/x")));
    }

    #[test]
    fn exec_reports_what_kubelet_shows() {
        let msg = exec(
            &["no-such-binary-berth".into()],
            &["PATH=/nonexistent".into()],
        );
        assert_eq!(
            msg,
            "exec: \"no-such-binary-berth\": executable file not found in $PATH"
        );
        let msg = exec(&["/nonexistent/x".into()], &[]);
        assert_eq!(msg, "exec /nonexistent/x: no such file or directory");
        assert_eq!(exec(&[], &[]), "exec: process.args is empty");
    }
}
