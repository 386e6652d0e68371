//! Which cgroup hierarchy the host has: v2 unified, or v1 controllers under
//! `/sys/fs/cgroup` (possibly beside an empty v2 mount, as on this VM).

use std::path::Path;

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Detects the hierarchy mounted at `root` (normally `/sys/fs/cgroup`).
pub fn detect(root: &Path) -> std::io::Result<CgroupVersion> {
    let fs = statfs(root).map_err(std::io::Error::from)?;
    if fs.filesystem_type() == CGROUP2_SUPER_MAGIC {
        Ok(CgroupVersion::V2)
    } else if root.join("memory").is_dir() || root.join("cpu").is_dir() {
        Ok(CgroupVersion::V1)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no cgroup v1 controllers or v2 mount at {}", root.display()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_no_cgroup_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(detect(dir.path()).is_err());
    }

    #[test]
    fn the_host_has_a_cgroup_hierarchy() {
        assert!(detect(Path::new("/sys/fs/cgroup")).is_ok());
    }
}
