//! Unpacked layers, one directory per layer keyed by its chain id, each ready
//! to be an overlayfs lower dir. A layer is unpacked into a temp directory and
//! renamed into place whole, so a crash never leaves half a snapshot visible.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::digest::Digest;

#[derive(Debug, thiserror::Error)]
#[error("snapshot store I/O on {path}: {source}")]
pub struct SnapshotError {
    path: PathBuf,
    source: std::io::Error,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError {
        path: path.to_path_buf(),
        source,
    }
}

const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    /// Opens the store under `dir`, removing unpacks a crash cut short.
    pub fn open(dir: &Path) -> Result<SnapshotStore, SnapshotError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        for entry in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing an unfinished unpack");
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
            }
        }
        Ok(SnapshotStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory holding the layer's files: the overlayfs lower dir.
    pub fn path(&self, chain_id: &Digest) -> PathBuf {
        self.dir.join(chain_id.hex())
    }

    pub fn contains(&self, chain_id: &Digest) -> bool {
        self.path(chain_id).is_dir()
    }

    /// A fresh directory to unpack a layer into; removed unless committed.
    pub fn prepare(&self, chain_id: &Digest) -> Result<PendingSnapshot, SnapshotError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            "{TEMP_PREFIX}{}-{}-{n}",
            chain_id.hex(),
            std::process::id()
        ));
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        // Layer roots are plain 0755 directories, as in every image.
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io_err(&tmp))?;
        Ok(PendingSnapshot {
            tmp,
            target: self.path(chain_id),
            committed: false,
        })
    }

    /// Chain ids of every committed snapshot.
    pub fn list(&self) -> Result<Vec<Digest>, SnapshotError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)
            .map_err(io_err(&self.dir))?
            .flatten()
        {
            let name = entry.file_name();
            if let Ok(d) = Digest::parse(&format!("sha256:{}", name.to_string_lossy())) {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub fn remove(&self, chain_id: &Digest) -> Result<(), SnapshotError> {
        let path = self.path(chain_id);
        // Rename first so a crash mid-delete leaves a temp dir, not a torn layer.
        let doomed = self.dir.join(format!("{TEMP_PREFIX}rm-{}", chain_id.hex()));
        match fs::rename(&path, &doomed) {
            Ok(()) => fs::remove_dir_all(&doomed).map_err(io_err(&doomed)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

/// A layer being unpacked.
pub struct PendingSnapshot {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl PendingSnapshot {
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Publishes the layer. Another pull may have published the same chain id
    /// meanwhile; its copy is identical, so this one is dropped.
    pub fn commit(mut self) -> Result<(), SnapshotError> {
        match fs::rename(&self.tmp, &self.target) {
            Ok(()) => {
                self.committed = true;
                Ok(())
            }
            Err(_) if self.target.is_dir() => Ok(()),
            Err(e) => Err(io_err(&self.target)(e)),
        }
    }
}

impl Drop for PendingSnapshot {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// The chain id of each layer: the first is its diff id, each next one is
/// sha256 of "<parent chain id> <diff id>" (OCI image spec).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => Digest::sha256_of(format!("{parent} {diff_id}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], Digest::sha256_of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn uncommitted_snapshots_vanish_and_committed_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path()).expect("open");
        let id = Digest::sha256_of(b"layer");
        {
            let pending = store.prepare(&id).expect("prepare");
            fs::write(pending.dir().join("f"), b"x").expect("write");
        }
        assert!(!store.contains(&id));
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 0);
        let pending = store.prepare(&id).expect("prepare");
        fs::write(pending.dir().join("f"), b"x").expect("write");
        pending.commit().expect("commit");
        assert!(store.path(&id).join("f").exists());
        assert_eq!(store.list().expect("list"), vec![id.clone()]);
        store.remove(&id).expect("remove");
        assert!(!store.contains(&id));
    }

    #[test]
    fn opening_removes_unfinished_unpacks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path()).expect("open");
        std::mem::forget(store.prepare(&Digest::sha256_of(b"x")).expect("prepare"));
        SnapshotStore::open(dir.path()).expect("reopen");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 0);
    }
}
