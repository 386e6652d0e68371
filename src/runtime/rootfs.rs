//! Mounts berth makes on the host for pods and containers: the container's
//! overlayfs rootfs (image layers below, its own writable layer on top) and
//! the pod's shared `/dev/shm`. In a pod with its own user namespace the
//! image layers are id-mapped through it (overlayfs itself cannot be).

use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::RuntimeError;
use super::userns::IdMap;

fn mount_err(what: &str, target: &Path, e: nix::Error) -> RuntimeError {
    RuntimeError::Io {
        what: format!("mount {what} at {}", target.display()),
        source: e.into(),
    }
}

/// Mounts `layers` (bottom first) under a writable layer kept in `layer_dir`
/// at `target`. Not `nosuid`: setuid binaries of the image must work.
///
/// With `userns` (the pod's pinned user namespace and its mapping) each
/// layer is an id-mapped detached copy, passed to overlayfs as
/// `/proc/self/fd/N` (overlayfs takes private clones of its layers; recent
/// kernels, 6.18 here, accept detached ones): the image's root files belong to the
/// container's root inside, and to the mapped host ids as the host sees the
/// rootfs. The writable layer is not mapped: what the container writes lands
/// with its host ids, in a top directory owned by the container's root.
pub fn mount_overlay(
    layers: &[PathBuf],
    layer_dir: &Path,
    target: &Path,
    userns: Option<(&Path, &IdMap)>,
) -> Result<(), RuntimeError> {
    let upper = layer_dir.join("upper");
    let work = layer_dir.join("work");
    for dir in [&upper, &work, &target.to_path_buf()] {
        fs::create_dir_all(dir).map_err(|source| RuntimeError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
    }
    let mut lower: Vec<PathBuf> = layers.iter().rev().cloned().collect();
    if lower.is_empty() {
        // An image without layers still needs one lower dir.
        let empty = layer_dir.join("empty");
        fs::create_dir_all(&empty).map_err(|source| RuntimeError::Io {
            what: format!("create {}", empty.display()),
            source,
        })?;
        lower.push(empty);
    }
    // Held open until the overlay has taken its clones of them.
    let mut mapped = Vec::new();
    if let Some((ns_path, map)) = userns {
        let io = |what: String| move |source| RuntimeError::Io { what, source };
        let ns = fs::File::open(ns_path).map_err(io(format!("open {}", ns_path.display())))?;
        for layer in &lower {
            let tree = super::userns::idmapped_tree(layer, false, ns.as_fd())
                .map_err(io(format!("id-map layer {}", layer.display())))?;
            mapped.push(tree);
        }
        lower = mapped
            .iter()
            .map(|fd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
            .collect();
        std::os::unix::fs::chown(&upper, Some(map.uids.host_id), Some(map.gids.host_id))
            .map_err(io(format!("chown {}", upper.display())))?;
    }
    let lower: Vec<String> = lower.iter().map(|l| l.display().to_string()).collect();
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
