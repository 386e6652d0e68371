//! Persisted state in one place: every record is replaced atomically (temp file
//! in the same directory, then rename), so a crash never leaves a torn record.
//! Records that must outlive a reboot are also fsynced, with their directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write record {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read record {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("record {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Whether a write must survive power loss (image metadata) or only a crash
/// of berthd (per-boot records, which a reboot makes moot anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Crash,
    PowerLoss,
}

/// Replaces `path` with `data` atomically.
pub fn write_atomic(path: &Path, data: &[u8], durability: Durability) -> Result<(), StoreError> {
    let err = |source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    // Unique per writer, so two writers of one record never share a temp file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let mut file = File::create(&tmp).map_err(err)?;
    let written = file.write_all(data).and_then(|()| match durability {
        Durability::PowerLoss => file.sync_all(),
        Durability::Crash => Ok(()),
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    if durability == Durability::PowerLoss {
        sync_dir(dir).map_err(err)?;
    }
    Ok(())
}

/// Makes a rename or unlink in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub fn write_json<T: Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
) -> Result<(), StoreError> {
    let data = serde_json::to_vec(value).map_err(|e| StoreError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(path, &data, durability)
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let data = fs::read(path).map_err(|source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&data).map_err(|source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes a record; a missing one is already removed.
pub fn remove(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rec.json");
        write_json(&path, &vec![1, 2, 3], Durability::PowerLoss).expect("write");
        write_json(&path, &vec![4], Durability::Crash).expect("overwrite");
        let back: Vec<i32> = read_json(&path).expect("read");
        assert_eq!(back, vec![4]);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("rec.json")]);
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.json");
        fs::write(&path, b"{not json").expect("write");
        let err = read_json::<Vec<i32>>(&path)
            .expect_err("corrupt")
            .to_string();
        assert!(err.contains("bad.json"), "{err}");
    }

    #[test]
    fn removing_twice_is_fine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.json");
        write_json(&path, &1, Durability::Crash).expect("write");
        remove(&path).expect("remove");
        remove(&path).expect("remove again");
    }
}
