//! Devices of a container: nodes the request passes in (or every host device
//! for a privileged one) and the device cgroup that allows exactly those plus
//! the standard set, denying the rest: v1's devices controller, or v2's eBPF
//! filter (`device_filter.rs`).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::RuntimeError;
use super::cgroup::{CgroupError, CgroupVersion, Cgroups};
use super::container::Device;
use super::device_filter;

/// One device node: its spec entry and its cgroup allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    pub container_path: String,
    pub kind: char,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub access: String,
}

impl DeviceNode {
    pub fn spec(&self) -> Value {
        json!({
            "path": self.container_path, "type": self.kind.to_string(),
            "major": self.major, "minor": self.minor,
            "fileMode": self.mode & 0o7777, "uid": self.uid, "gid": self.gid,
        })
    }
}

/// The device at `host_path` (symlinks followed), as `container_path`.
pub fn node(
    host_path: &Path,
    container_path: &str,
    access: &str,
) -> Result<DeviceNode, RuntimeError> {
    let meta = fs::metadata(host_path).map_err(|source| RuntimeError::Io {
        what: format!("device {}", host_path.display()),
        source,
    })?;
    let kind = if meta.file_type().is_char_device() {
        'c'
    } else if meta.file_type().is_block_device() {
        'b'
    } else {
        return Err(RuntimeError::InvalidArgument(format!(
            "{} is not a device node",
            host_path.display()
        )));
    };
    if access.is_empty() || !access.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(RuntimeError::InvalidArgument(format!(
            "device {} permissions {access:?} must be letters of \"rwm\"",
            host_path.display()
        )));
    }
    let rdev = meta.rdev();
    Ok(DeviceNode {
        container_path: container_path.to_string(),
        kind,
        major: nix::sys::stat::major(rdev),
        minor: nix::sys::stat::minor(rdev),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        access: access.to_string(),
    })
}

/// The requested devices.
pub fn requested(devices: &[Device]) -> Result<Vec<DeviceNode>, RuntimeError> {
    devices
        .iter()
        .map(|d| {
            let access = if d.permissions.is_empty() {
                "rwm"
            } else {
                &d.permissions
            };
            node(Path::new(&d.host_path), &d.container_path, access)
        })
        .collect()
}

/// Every device node under the host's /dev, for privileged containers,
/// without the per-container filesystems that are mounted anew.
pub fn host_devices() -> Vec<DeviceNode> {
    const SKIP: [&str; 5] = ["pts", "shm", "mqueue", "fd", "console"];
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from("/dev")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if dir == Path::new("/dev") && SKIP.iter().any(|s| entry.file_name() == *s) {
                continue;
            }
            if ft.is_dir() {
                stack.push(path);
            } else if (ft.is_char_device() || ft.is_block_device())
                && let Ok(n) = node(&path, &path.display().to_string(), "rwm")
            {
                out.push(n);
            }
        }
    }
    out
}

/// One allow rule of the device cgroup: a type (`c`, `b`, or `a` for both),
/// numbers (`None` for any) and access letters of "rwm".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    pub kind: char,
    pub major: Option<u64>,
    pub minor: Option<u64>,
    pub access: String,
}

impl DeviceRule {
    /// The rule as `devices.allow` takes it: `c 1:3 rwm`.
    fn v1(&self) -> String {
        let number = |n: Option<u64>| n.map_or("*".to_string(), |n| n.to_string());
        format!(
            "{} {}:{} {}",
            self.kind,
            number(self.major),
            number(self.minor),
            self.access
        )
    }
}

/// Standard devices every container may use (as runc allows them): mknod of
/// any node, null, zero, full, random, urandom, tty, console, ptmx, pts.
pub fn default_rules() -> Vec<DeviceRule> {
    let rule = |kind, major, minor, access: &str| DeviceRule {
        kind,
        major,
        minor,
        access: access.to_string(),
    };
    let mut rules = vec![rule('c', None, None, "m"), rule('b', None, None, "m")];
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
    ] {
        rules.push(rule('c', Some(major), Some(minor), "rwm"));
    }
    rules.push(rule('c', Some(136), None, "rwm"));
    rules
}

/// Restricts the devices of the cgroup `rel`: all allowed when privileged,
/// else the standard set and `nodes`. cgroup v1 takes the rules in its
/// devices controller; v2 takes them as an eBPF filter.
pub fn restrict(
    cgroups: &Cgroups,
    rel: &str,
    privileged: bool,
    nodes: &[DeviceNode],
) -> Result<(), CgroupError> {
    let mut rules = default_rules();
    rules.extend(nodes.iter().map(|n| DeviceRule {
        kind: n.kind,
        major: Some(n.major),
        minor: Some(n.minor),
        access: n.access.clone(),
    }));
    if cgroups.version == CgroupVersion::V2 {
        let Some(dir) = cgroups.controller_dir("", rel) else {
            return Ok(());
        };
        if privileged {
            // No filter of its own; any an ancestor has still applies.
            return Ok(());
        }
        return Ok(device_filter::attach(&dir, &rules)?);
    }
    let Some(dir) = cgroups.controller_dir("devices", rel) else {
        return Ok(());
    };
    let write = |file: &str, rule: &str| {
        let path = dir.join(file);
        fs::write(&path, rule).map_err(|source| CgroupError::Io { path, source })
    };
    if privileged {
        return write("devices.allow", "a");
    }
    write("devices.deny", "a")?;
    for rule in &rules {
        write("devices.allow", &rule.v1())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_null_is_a_char_device_and_a_file_is_not() {
        let n = node(Path::new("/dev/null"), "/dev/mynull", "rw").expect("/dev/null");
        assert_eq!((n.kind, n.major, n.minor), ('c', 1, 3));
        assert!(node(Path::new("/etc/hostname"), "/x", "rw").is_err());
        assert!(node(Path::new("/dev/null"), "/x", "rwx").is_err());
    }

    #[test]
    fn rules_read_as_v1_writes_them() {
        let v1: Vec<String> = default_rules().iter().map(DeviceRule::v1).collect();
        assert_eq!(v1[0], "c *:* m");
        assert!(v1.contains(&"c 1:3 rwm".to_string()));
        assert_eq!(v1.last().map(String::as_str), Some("c 136:* rwm"));
    }

    #[test]
    fn host_devices_include_null_but_not_pts() {
        let all = host_devices();
        assert!(all.iter().any(|d| d.container_path == "/dev/null"));
        assert!(
            !all.iter()
                .any(|d| d.container_path.starts_with("/dev/pts/"))
        );
    }
}
