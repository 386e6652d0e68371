//! A pod's namespaces without a pause process: a dedicated thread unshares
//! them, sets the hostname, brings loopback up and applies sysctls inside,
//! then bind-mounts its `/proc/thread-self/ns/*` files onto pin files, which
//! keep the namespaces alive after the thread is gone.
//!
//! A pod with its own user namespace needs a process instead: only a
//! single-threaded process may unshare a user namespace, and its other
//! namespaces must be made inside it so that it owns them. berthd starts
//! `berthd pod-userns` (hidden), writes the new namespace's id maps, lets
//! it make the rest as the namespace's root, and pins them from `/proc/PID/ns`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

use super::userns::IdMap;

/// What `berthd pod-userns` says once its user namespace exists.
const UNSHARED: &str = "unshared";
/// What berthd answers once the id maps are written.
const MAPPED: &str = "mapped";
/// What `berthd pod-userns` says once the other namespaces are set up.
const READY: &str = "ready";

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("cannot create the pod's namespaces: {0}")]
    Unshare(nix::Error),
    #[error("cannot set hostname {hostname:?}: {source}")]
    Hostname {
        hostname: String,
        source: nix::Error,
    },
    #[error("cannot bring loopback up in the pod's network namespace: {0}")]
    Loopback(std::io::Error),
    #[error("sysctl {name}: {message}")]
    Sysctl { name: String, message: String },
    #[error("cannot pin namespace at {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("namespace thread failed")]
    Thread,
    #[error("cannot become root of the pod's user namespace: {0}")]
    Identity(nix::Error),
    #[error("cannot write the id maps of the pod's user namespace: {0}")]
    IdMap(std::io::Error),
    #[error("pod user namespace helper: {0}")]
    Helper(String),
}

/// The namespaces a pod can own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceKind {
    Net,
    Ipc,
    Uts,
    User,
}

impl NamespaceKind {
    pub fn name(self) -> &'static str {
        match self {
            NamespaceKind::Net => "net",
            NamespaceKind::Ipc => "ipc",
            NamespaceKind::Uts => "uts",
            NamespaceKind::User => "user",
        }
    }

    fn clone_flag(self) -> CloneFlags {
        match self {
            NamespaceKind::Net => CloneFlags::CLONE_NEWNET,
            NamespaceKind::Ipc => CloneFlags::CLONE_NEWIPC,
            NamespaceKind::Uts => CloneFlags::CLONE_NEWUTS,
            NamespaceKind::User => CloneFlags::CLONE_NEWUSER,
        }
    }
}

/// Every kind a pod may have pinned; the user namespace last, since it
/// owns the others.
pub const ALL_KINDS: [NamespaceKind; 4] = [
    NamespaceKind::Net,
    NamespaceKind::Ipc,
    NamespaceKind::Uts,
    NamespaceKind::User,
];

/// Which sysctls are namespaced, and so may be set per pod; by namespace.
pub fn sysctl_namespace(name: &str) -> Option<NamespaceKind> {
    const IPC: [&str; 7] = [
        "kernel.shmmax",
        "kernel.shmall",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
    ];
    if IPC.contains(&name) || name == "kernel.sem" || name.starts_with("fs.mqueue.") {
        Some(NamespaceKind::Ipc)
    } else if name.starts_with("net.") {
        Some(NamespaceKind::Net)
    } else if name == "kernel.hostname" || name == "kernel.domainname" {
        Some(NamespaceKind::Uts)
    } else {
        None
    }
}

/// What to set up in new namespaces.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NamespaceSetup {
    pub kinds: Vec<NamespaceKind>,
    pub hostname: String,
    /// Only sysctls of the namespaces in `kinds`; checked by the caller.
    pub sysctls: BTreeMap<String, String>,
}

/// Creates the namespaces on a thread of their own and pins each as
/// `<dir>/<kind>`. On error nothing stays pinned.
pub fn create_pinned(dir: &Path, setup: NamespaceSetup) -> Result<(), NamespaceError> {
    fs::create_dir_all(dir).map_err(|source| NamespaceError::Pin {
        path: dir.to_path_buf(),
        source,
    })?;
    let dir = dir.to_path_buf();
    let pins_dir = dir.clone();
    let kinds = setup.kinds.clone();
    let result = std::thread::Builder::new()
        .name("berth-netns".to_string())
        .spawn(move || set_up_in_thread(&pins_dir, &setup))
        .map_err(|_| NamespaceError::Thread)?
        .join()
        .map_err(|_| NamespaceError::Thread)?;
    if result.is_err() {
        remove_pins(&dir, &kinds);
    }
    result
}

fn set_up_in_thread(dir: &Path, setup: &NamespaceSetup) -> Result<(), NamespaceError> {
    // Only this thread moves: namespaces are per task, and the thread ends here.
    unshare(clone_flags(&setup.kinds)).map_err(NamespaceError::Unshare)?;
    configure(setup)?;
    for kind in &setup.kinds {
        pin(
            &format!("/proc/thread-self/ns/{}", kind.name()),
            &dir.join(kind.name()),
        )?;
    }
    Ok(())
}

fn clone_flags(kinds: &[NamespaceKind]) -> CloneFlags {
    kinds
        .iter()
        .fold(CloneFlags::empty(), |f, k| f | k.clone_flag())
}

/// Hostname, loopback and sysctls of the caller's new namespaces.
fn configure(setup: &NamespaceSetup) -> Result<(), NamespaceError> {
    if setup.kinds.contains(&NamespaceKind::Uts) && !setup.hostname.is_empty() {
        nix::unistd::sethostname(&setup.hostname).map_err(|source| NamespaceError::Hostname {
            hostname: setup.hostname.clone(),
            source,
        })?;
    }
    if setup.kinds.contains(&NamespaceKind::Net) {
        loopback_up().map_err(NamespaceError::Loopback)?;
    }
    for (name, value) in &setup.sysctls {
        // /proc/sys shows the namespaces of the task that opens it: this thread's.
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        fs::write(&path, value).map_err(|e| NamespaceError::Sysctl {
            name: name.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

/// Bind-mounts the namespace file `source` onto a new file at `pin`.
fn pin(source: &str, pin: &Path) -> Result<(), NamespaceError> {
    let pin_err = |source| NamespaceError::Pin {
        path: pin.to_path_buf(),
        source,
    };
    fs::File::create(pin).map_err(pin_err)?;
    mount(
        Some(source),
        pin,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| pin_err(e.into()))
}

/// Creates a user namespace mapped by `map` and, inside it, the namespaces
/// of `setup`; pins them all (the user namespace as `<dir>/user`). `exe` is
/// berthd's own executable. On error nothing stays pinned.
pub fn create_pinned_in_userns(
    dir: &Path,
    setup: &NamespaceSetup,
    map: &IdMap,
    exe: &Path,
) -> Result<(), NamespaceError> {
    fs::create_dir_all(dir).map_err(|source| NamespaceError::Pin {
        path: dir.to_path_buf(),
        source,
    })?;
    let setup_json =
        serde_json::to_string(setup).map_err(|e| NamespaceError::Helper(e.to_string()))?;
    let mut child = Command::new(exe)
        .args(["pod-userns", "--setup", &setup_json])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NamespaceError::Helper(format!("start {}: {e}", exe.display())))?;
    let result = drive_helper(&mut child, dir, setup, map);
    if result.is_err() {
        let _ = child.kill();
    }
    // Its stdin closed, the helper exits: the pins hold the namespaces now.
    drop(child.stdin.take());
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let status = child.wait();
    let result = result.and_then(|()| match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(NamespaceError::Helper(s.to_string())),
        Err(e) => Err(NamespaceError::Helper(format!("wait: {e}"))),
    });
    if let Err(e) = result {
        let mut kinds = setup.kinds.clone();
        kinds.push(NamespaceKind::User);
        remove_pins(dir, &kinds);
        // The helper's own words say more than a closed pipe.
        let said = stderr.trim();
        return Err(if said.is_empty() {
            e
        } else {
            NamespaceError::Helper(format!("{e}; it said: {said}"))
        });
    }
    Ok(())
}

/// berthd's side of the helper's protocol, up to every namespace pinned.
fn drive_helper(
    child: &mut Child,
    dir: &Path,
    setup: &NamespaceSetup,
    map: &IdMap,
) -> Result<(), NamespaceError> {
    let pid = child.id();
    let mut stdout = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| NamespaceError::Helper("no stdout".to_string()))?,
    );
    let mut expect = |word: &str| -> Result<(), NamespaceError> {
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| NamespaceError::Helper(format!("read: {e}")))?;
        if line.trim_end() == word {
            Ok(())
        } else {
            Err(NamespaceError::Helper(format!(
                "expected {word:?}, got {:?}",
                line.trim_end()
            )))
        }
    };
    expect(UNSHARED)?;
    // Written by a privileged process, the maps may name any host ids, and
    // setgroups stays allowed inside.
    fs::write(format!("/proc/{pid}/uid_map"), map.uid_map()).map_err(NamespaceError::IdMap)?;
    fs::write(format!("/proc/{pid}/gid_map"), map.gid_map()).map_err(NamespaceError::IdMap)?;
    let stdin = child
        .stdin
        .as_mut()
        .ok_or_else(|| NamespaceError::Helper("no stdin".to_string()))?;
    writeln!(stdin, "{MAPPED}").map_err(|e| NamespaceError::Helper(format!("write: {e}")))?;
    expect(READY)?;
    for kind in std::iter::once(&NamespaceKind::User).chain(&setup.kinds) {
        pin(
            &format!("/proc/{pid}/ns/{}", kind.name()),
            &dir.join(kind.name()),
        )?;
    }
    Ok(())
}

/// The hidden `berthd pod-userns --setup JSON` mode; returns the exit code.
/// Runs before any thread exists: unsharing a user namespace needs that.
pub fn run_userns_helper(setup: &str) -> i32 {
    match userns_helper(setup) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn userns_helper(setup: &str) -> Result<(), NamespaceError> {
    let setup: NamespaceSetup =
        serde_json::from_str(setup).map_err(|e| NamespaceError::Helper(format!("setup: {e}")))?;
    let io = |e: std::io::Error| NamespaceError::Helper(e.to_string());
    unshare(CloneFlags::CLONE_NEWUSER).map_err(NamespaceError::Unshare)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{UNSHARED}")
        .and_then(|()| out.flush())
        .map_err(io)?;
    let mut input = std::io::stdin().lock();
    let mut line = String::new();
    input.read_line(&mut line).map_err(io)?;
    if line.trim_end() != MAPPED {
        return Err(NamespaceError::Helper(format!(
            "expected {MAPPED:?}, got {:?}",
            line.trim_end()
        )));
    }
    // As the namespace's root (a host id of the pod's range), not as an
    // unmapped host root: IPC sysctls are writable only by that root.
    setgroups(&[]).map_err(NamespaceError::Identity)?;
    setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(NamespaceError::Identity)?;
    setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(NamespaceError::Identity)?;
    unshare(clone_flags(&setup.kinds)).map_err(NamespaceError::Unshare)?;
    configure(&setup)?;
    writeln!(out, "{READY}")
        .and_then(|()| out.flush())
        .map_err(io)?;
    // berthd closes stdin once the namespaces are pinned.
    let _ = input.read_to_end(&mut Vec::new());
    Ok(())
}

/// Sets IFF_UP on `lo` of the calling thread's network namespace.
fn loopback_up() -> std::io::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own, on a socket we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the flags member is the active one after SIOCGIFFLAGS.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own, on a socket we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Unpins namespaces; missing pins are fine (removal is repeatable).
pub fn remove_pins(dir: &Path, kinds: &[NamespaceKind]) {
    for kind in kinds {
        let pin = dir.join(kind.name());
        if let Err(e) = umount2(&pin, MntFlags::MNT_DETACH)
            && e != nix::Error::EINVAL
            && e != nix::Error::ENOENT
        {
            tracing::warn!(pin = %pin.display(), error = %e, "cannot unpin namespace");
        }
        let _ = fs::remove_file(&pin);
    }
    let _ = fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_are_sorted_by_namespace() {
        assert_eq!(
            sysctl_namespace("net.ipv4.ip_forward"),
            Some(NamespaceKind::Net)
        );
        assert_eq!(
            sysctl_namespace("kernel.shm_rmid_forced"),
            Some(NamespaceKind::Ipc)
        );
        assert_eq!(
            sysctl_namespace("fs.mqueue.msg_max"),
            Some(NamespaceKind::Ipc)
        );
        assert_eq!(
            sysctl_namespace("kernel.domainname"),
            Some(NamespaceKind::Uts)
        );
        assert_eq!(sysctl_namespace("vm.swappiness"), None);
        assert_eq!(sysctl_namespace("kernel.pid_max"), None);
    }

    #[test]
    fn pinned_namespaces_are_new_and_carry_the_setup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pins = dir.path().join("pod");
        create_pinned(
            &pins,
            NamespaceSetup {
                kinds: vec![NamespaceKind::Net, NamespaceKind::Uts, NamespaceKind::Ipc],
                hostname: "pod-host".to_string(),
                sysctls: [("kernel.shm_rmid_forced".to_string(), "1".to_string())].into(),
            },
        )
        .expect("create namespaces");
        let host_net = fs::read_link("/proc/self/ns/net").expect("host net ns");
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", pins.join("net").display()))
            .arg(format!("--uts={}", pins.join("uts").display()))
            .arg(format!("--ipc={}", pins.join("ipc").display()))
            .args(["sh", "-c", "readlink /proc/self/ns/net; hostname; cat /proc/sys/kernel/shm_rmid_forced; cat /sys/class/net/lo/operstate 2>/dev/null; ip -o link show lo"])
            .output()
            .expect("nsenter");
        let text = String::from_utf8_lossy(&out.stdout);
        remove_pins(
            &pins,
            &[NamespaceKind::Net, NamespaceKind::Uts, NamespaceKind::Ipc],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = text.lines();
        assert_ne!(lines.next().map(std::path::PathBuf::from), Some(host_net));
        assert_eq!(lines.next(), Some("pod-host"));
        assert_eq!(lines.next(), Some("1"));
        assert!(text.contains("UP"), "loopback is up: {text}");
        assert!(!pins.exists(), "pins removed");
    }
}
