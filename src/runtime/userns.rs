//! Pod user namespaces: the id mapping CRI asks for, checked as CRI
//! requires, and id-mapped mounts (a detached copy of a mount whose file
//! owners are seen through the pod's mapping, attached where it belongs).

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::RuntimeError;
use super::pod::{IdMapping, NamespaceMode, NamespaceOptions};

/// The checked mapping of a pod's user namespace: one range each for uids
/// and gids, both starting at container id 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub uids: IdMapping,
    pub gids: IdMapping,
}

impl IdMap {
    /// The line for `/proc/PID/uid_map`.
    pub fn uid_map(&self) -> String {
        map_line(&self.uids)
    }

    /// The line for `/proc/PID/gid_map`.
    pub fn gid_map(&self) -> String {
        map_line(&self.gids)
    }
}

fn map_line(m: &IdMapping) -> String {
    format!("{} {} {}\n", m.container_id, m.host_id, m.length)
}

/// The pod's user namespace, if it asks for its own: mode POD with exactly
/// one uid and one gid range that maps container id 0 (as CRI says a runtime
/// must refuse anything else), and no host namespace beside it.
pub fn requested(ns: &NamespaceOptions) -> Result<Option<IdMap>, RuntimeError> {
    let invalid = |m: String| Err(RuntimeError::InvalidArgument(m));
    let Some(user) = &ns.user else {
        return Ok(None);
    };
    match user.mode {
        NamespaceMode::Node => return Ok(None),
        NamespaceMode::Container | NamespaceMode::Target => {
            return invalid(format!(
                "user namespace mode {:?} is not supported: a pod uses the node's or its own (POD)",
                user.mode
            ));
        }
        NamespaceMode::Pod => {}
    }
    let one = |list: &[IdMapping], what: &str| -> Result<IdMapping, RuntimeError> {
        let [m] = list else {
            return Err(RuntimeError::InvalidArgument(format!(
                "user namespace needs exactly one {what} mapping, got {}",
                list.len()
            )));
        };
        if m.container_id != 0 {
            return Err(RuntimeError::InvalidArgument(format!(
                "user namespace {what} mapping starts at container id {}: container id 0 must be mapped",
                m.container_id
            )));
        }
        if m.length == 0 || m.host_id.checked_add(m.length - 1).is_none() {
            return Err(RuntimeError::InvalidArgument(format!(
                "user namespace {what} mapping of {} ids from host id {} is out of range",
                m.length, m.host_id
            )));
        }
        Ok(*m)
    };
    let map = IdMap {
        uids: one(&user.uids, "uid")?,
        gids: one(&user.gids, "gid")?,
    };
    for (kind, mode) in [("network", ns.network), ("pid", ns.pid), ("ipc", ns.ipc)] {
        if mode == NamespaceMode::Node {
            return invalid(format!(
                "a pod with its own user namespace cannot use the node's {kind} namespace"
            ));
        }
    }
    Ok(Some(map))
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

/// A detached copy of the mount at `source` (with its submounts when
/// `recursive`), its owners seen through the mapping of `userns`. Needs
/// CAP_SYS_ADMIN over the source's filesystem: call it before entering the
/// user namespace.
pub fn idmapped_tree(
    source: &Path,
    recursive: bool,
    userns: BorrowedFd<'_>,
) -> std::io::Result<OwnedFd> {
    let path = c_path(source)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: nix lacks open_tree; path is a valid C string living across the call.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // Only the top mount is mapped: submounts may be of filesystems that
    // cannot be (proc, sysfs), and keep their own owners, as runc's "idmap".
    // SAFETY: nix lacks mount_setattr; "" is a valid C string and attr a
    // valid mount_attr of the size passed, both living across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}

/// Attaches a detached tree from [`idmapped_tree`] at `target`.
pub fn attach(tree: &OwnedFd, target: &Path) -> std::io::Result<()> {
    let to = c_path(target)?;
    // SAFETY: nix lacks move_mount; both strings are valid C strings and the
    // descriptor is ours, all living across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::pod::UserNamespaceOptions;

    fn options(mode: NamespaceMode, uids: Vec<IdMapping>) -> NamespaceOptions {
        NamespaceOptions {
            user: Some(UserNamespaceOptions {
                mode,
                gids: uids.clone(),
                uids,
            }),
            ..Default::default()
        }
    }

    fn range(container_id: u32, host_id: u32, length: u32) -> IdMapping {
        IdMapping {
            container_id,
            host_id,
            length,
        }
    }

    #[test]
    fn a_pod_mapping_is_one_range_from_container_root() {
        let ok = requested(&options(NamespaceMode::Pod, vec![range(0, 1000, 100000)]))
            .expect("valid")
            .expect("a user namespace");
        assert_eq!(ok.uid_map(), "0 1000 100000\n");
        assert_eq!(ok.gid_map(), "0 1000 100000\n");
        assert_eq!(requested(&NamespaceOptions::default()).expect("none"), None);
        assert_eq!(
            requested(&options(NamespaceMode::Node, vec![])).expect("node"),
            None
        );
    }

    #[test]
    fn what_cri_forbids_is_refused() {
        let refused =
            |o: NamespaceOptions| matches!(requested(&o), Err(RuntimeError::InvalidArgument(_)));
        assert!(refused(options(
            NamespaceMode::Pod,
            vec![range(0, 1000, 100000), range(0, 2000, 100000)]
        )));
        assert!(refused(options(
            NamespaceMode::Pod,
            vec![range(1, 1000, 100000)]
        )));
        assert!(refused(options(NamespaceMode::Pod, vec![])));
        assert!(refused(options(
            NamespaceMode::Pod,
            vec![range(0, u32::MAX, 2)]
        )));
        assert!(refused(options(NamespaceMode::Container, vec![])));
        assert!(refused(options(NamespaceMode::Target, vec![])));
        let mut host_net = options(NamespaceMode::Pod, vec![range(0, 1000, 65536)]);
        host_net.network = NamespaceMode::Node;
        assert!(refused(host_net));
    }
}
