//! A pod's namespaces without a pause process: a dedicated thread unshares
//! them, sets the hostname, brings loopback up and applies sysctls inside,
//! then bind-mounts its `/proc/thread-self/ns/*` files onto pin files, which
//! keep the namespaces alive after the thread is gone.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

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
}

/// The namespaces a pod can own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceKind {
    Net,
    Ipc,
    Uts,
}

impl NamespaceKind {
    pub fn name(self) -> &'static str {
        match self {
            NamespaceKind::Net => "net",
            NamespaceKind::Ipc => "ipc",
            NamespaceKind::Uts => "uts",
        }
    }

    fn clone_flag(self) -> CloneFlags {
        match self {
            NamespaceKind::Net => CloneFlags::CLONE_NEWNET,
            NamespaceKind::Ipc => CloneFlags::CLONE_NEWIPC,
            NamespaceKind::Uts => CloneFlags::CLONE_NEWUTS,
        }
    }
}

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
#[derive(Debug, Clone)]
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
    let flags = setup
        .kinds
        .iter()
        .fold(CloneFlags::empty(), |f, k| f | k.clone_flag());
    // Only this thread moves: namespaces are per task, and the thread ends here.
    unshare(flags).map_err(NamespaceError::Unshare)?;
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
    for kind in &setup.kinds {
        let pin = dir.join(kind.name());
        let pin_err = |source| NamespaceError::Pin {
            path: pin.clone(),
            source,
        };
        fs::File::create(&pin).map_err(pin_err)?;
        let source = format!("/proc/thread-self/ns/{}", kind.name());
        mount(
            Some(source.as_str()),
            &pin,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| pin_err(e.into()))?;
    }
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
