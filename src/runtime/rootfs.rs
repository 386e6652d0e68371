//! Mounts berth makes on the host for pods and containers: the container's
//! overlayfs rootfs (image layers below, its own writable layer on top) and
//! the pod's shared `/dev/shm`.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::RuntimeError;

fn mount_err(what: &str, target: &Path, e: nix::Error) -> RuntimeError {
    RuntimeError::Io {
        what: format!("mount {what} at {}", target.display()),
        source: e.into(),
    }
}

/// Mounts `layers` (bottom first) under a writable layer kept in `layer_dir`
/// at `target`. Not `nosuid`: setuid binaries of the image must work.
pub fn mount_overlay(
    layers: &[PathBuf],
    layer_dir: &Path,
    target: &Path,
) -> Result<(), RuntimeError> {
    let upper = layer_dir.join("upper");
    let work = layer_dir.join("work");
    for dir in [&upper, &work, &target.to_path_buf()] {
        fs::create_dir_all(dir).map_err(|source| RuntimeError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
    }
    let mut lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|l| l.display().to_string())
        .collect();
    if lower.is_empty() {
        // An image without layers still needs one lower dir.
        let empty = layer_dir.join("empty");
        fs::create_dir_all(&empty).map_err(|source| RuntimeError::Io {
            what: format!("create {}", empty.display()),
            source,
        })?;
        lower.push(empty.display().to_string());
    }
    // volatile: the writable layer dies with its container and a reboot ends
    // every container, so no syncfs on unmount (the slow part of removal).
    let options = format!(
        "lowerdir={},upperdir={},workdir={},volatile",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| mount_err("overlay rootfs", target, e))
}

/// The pod's `/dev/shm`, shared by its containers as the IPC namespace is.
pub fn mount_shm(target: &Path) -> Result<(), RuntimeError> {
    fs::create_dir_all(target).map_err(|source| RuntimeError::Io {
        what: format!("create {}", target.display()),
        source,
    })?;
    mount(
        Some("shm"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(|e| mount_err("pod shm", target, e))
}

/// Unmounts `target` if it is a mount point; anything else is fine.
pub fn unmount(target: &Path) {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => tracing::warn!(target = %target.display(), error = %e, "cannot unmount"),
    }
}
