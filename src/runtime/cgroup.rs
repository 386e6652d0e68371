//! cgroups with the cgroupfs driver: which hierarchy the host has (v2
//! unified, or v1 controllers under `/sys/fs/cgroup`, possibly beside an empty
//! v2 mount as on this VM), and creating and removing the cgroup of a pod or
//! container in every hierarchy.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v1 controllers or v2 mount at {0}")]
    NoHierarchy(PathBuf),
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup path {0:?} must be relative without '..'")]
    BadPath(String),
    #[error(transparent)]
    DeviceFilter(#[from] super::device_filter::DeviceFilterError),
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

/// The host's cgroup hierarchies: one directory for v2, one per mounted
/// controller for v1.
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub version: CgroupVersion,
    hierarchies: Vec<PathBuf>,
}

impl Cgroups {
    pub fn discover(root: &Path) -> Result<Cgroups, CgroupError> {
        let version = detect(root).map_err(|_| CgroupError::NoHierarchy(root.to_path_buf()))?;
        let hierarchies = match version {
            CgroupVersion::V2 => vec![root.to_path_buf()],
            CgroupVersion::V1 => {
                let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
                    CgroupError::Io {
                        path: PathBuf::from("/proc/self/mountinfo"),
                        source,
                    }
                })?;
                let mut found: Vec<PathBuf> = mountinfo
                    .lines()
                    .filter_map(|line| {
                        let (left, right) = line.split_once(" - ")?;
                        let fstype = right.split(' ').next()?;
                        let point = PathBuf::from(left.split(' ').nth(4)?);
                        (fstype == "cgroup" && point.starts_with(root)).then_some(point)
                    })
                    .collect();
                found.sort();
                found.dedup();
                found
            }
        };
        if hierarchies.is_empty() {
            return Err(CgroupError::NoHierarchy(root.to_path_buf()));
        }
        Ok(Cgroups {
            version,
            hierarchies,
        })
    }

    fn checked(rel: &str) -> Result<&str, CgroupError> {
        let rel = rel.trim_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == ".." || c == ".") {
            return Err(CgroupError::BadPath(rel.to_string()));
        }
        Ok(rel)
    }

    /// The directory of `rel` in each hierarchy.
    pub fn dirs(&self, rel: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let rel = Cgroups::checked(rel)?;
        Ok(self.hierarchies.iter().map(|h| h.join(rel)).collect())
    }

    /// The `cgroup.procs` file of `rel` in each hierarchy.
    pub fn procs_files(&self, rel: &str) -> Result<Vec<PathBuf>, CgroupError> {
        Ok(self
            .dirs(rel)?
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect())
    }

    /// The directory of `rel` in one v1 controller (`memory`, `cpu`, …), or the v2 one.
    pub fn controller_dir(&self, controller: &str, rel: &str) -> Option<PathBuf> {
        let rel = Cgroups::checked(rel).ok()?;
        match self.version {
            CgroupVersion::V2 => self.hierarchies.first().map(|h| h.join(rel)),
            CgroupVersion::V1 => self
                .hierarchies
                .iter()
                .find(|h| {
                    h.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.split(',').any(|c| c == controller))
                })
                .map(|h| h.join(rel)),
        }
    }

    /// Creates `rel` (and missing parents) in every hierarchy.
    pub fn create(&self, rel: &str) -> Result<(), CgroupError> {
        let rel = Cgroups::checked(rel)?;
        for hierarchy in &self.hierarchies {
            let mut dir = hierarchy.clone();
            for component in rel.split('/') {
                let parent = dir.clone();
                dir.push(component);
                match fs::create_dir(&dir) {
                    Ok(()) => inherit_cpuset(&parent, &dir)?,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(CgroupError::Io { path: dir, source }),
                }
            }
        }
        Ok(())
    }

    /// Removes `rel` from every hierarchy. Its processes must be gone; a
    /// cgroup the kernel still calls busy is retried briefly.
    pub fn remove(&self, rel: &str) -> Result<(), CgroupError> {
        let mut first_error = None;
        for dir in self.dirs(rel)? {
            if let Err(e) = remove_dir_retrying(&dir)
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Kills every process in `rel` and the cgroups below it.
    pub fn kill_all(&self, rel: &str) {
        let Ok(dirs) = self.dirs(rel) else { return };
        for _ in 0..100 {
            let mut any = false;
            for dir in &dirs {
                let mut stack = vec![dir.clone()];
                while let Some(d) = stack.pop() {
                    for pid in fs::read_to_string(d.join("cgroup.procs"))
                        .unwrap_or_default()
                        .lines()
                    {
                        if let Ok(pid) = pid.trim().parse::<i32>() {
                            any = true;
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                    for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                            stack.push(e.path());
                        }
                    }
                }
            }
            if !any {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes `rel` and every cgroup below it, deepest first.
    pub fn remove_tree(&self, rel: &str) {
        self.kill_all(rel);
        let Ok(dirs) = self.dirs(rel) else { return };
        for dir in dirs {
            let mut all = Vec::new();
            let mut stack = vec![dir];
            while let Some(d) = stack.pop() {
                for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        stack.push(e.path());
                    }
                }
                all.push(d);
            }
            all.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in all {
                let _ = remove_dir_retrying(&d);
            }
        }
    }

    /// Removes `rel` where it is empty; a cgroup still in use stays, silently.
    pub fn remove_if_empty(&self, rel: &str) {
        if let Ok(dirs) = self.dirs(rel) {
            for dir in dirs {
                let _ = fs::remove_dir(dir);
            }
        }
    }
}

/// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and no
/// process can join it until they are copied from the parent.
fn inherit_cpuset(parent: &Path, dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let child = dir.join(file);
        if !child.exists() {
            return Ok(());
        }
        let current = fs::read_to_string(&child).unwrap_or_default();
        if current.trim().is_empty() {
            let value =
                fs::read_to_string(parent.join(file)).map_err(|source| CgroupError::Io {
                    path: parent.join(file),
                    source,
                })?;
            fs::write(&child, value.trim()).map_err(|source| CgroupError::Io {
                path: child.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

fn remove_dir_retrying(dir: &Path) -> Result<(), CgroupError> {
    for attempt in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // Exited tasks leave the cgroup a moment after they are reaped.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(CgroupError::Io {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok(())
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
    fn create_join_and_remove_in_every_hierarchy() {
        let cgroups = Cgroups::discover(Path::new("/sys/fs/cgroup")).expect("cgroups");
        let rel = format!("berth-unit-{}/pod", std::process::id());
        cgroups.create(&rel).expect("create");
        for procs in cgroups.procs_files(&rel).expect("procs") {
            assert!(procs.exists(), "{}", procs.display());
        }
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        for procs in cgroups.procs_files(&rel).expect("procs") {
            fs::write(&procs, child.id().to_string()).expect("join cgroup");
        }
        assert!(
            cgroups.remove(&rel).is_err(),
            "busy while the process lives"
        );
        let _ = child.kill();
        let _ = child.wait();
        cgroups.remove(&rel).expect("remove");
        cgroups.remove_if_empty(rel.split('/').next().expect("parent"));
        for dir in cgroups.dirs(&rel).expect("dirs") {
            assert!(!dir.parent().expect("parent").exists(), "{}", dir.display());
        }
        assert!(cgroups.dirs("../x").is_err());
    }
}
