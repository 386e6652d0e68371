//! The content store: blobs by digest under `<root>/content/blobs/sha256/`.
//! A blob is written to a temp file under `ingest/`, verified (size and digest)
//! while it streams, fsynced, and only then renamed into place.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::digest::{Digest, DigestError, DigestVerifier};

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("content store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("blob {digest}: {source}")]
    Verify { digest: Digest, source: DigestError },
}

#[derive(Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ContentStore {
    /// Opens the store under `dir`, discarding ingests a crash left behind.
    pub fn open(dir: &Path) -> Result<ContentStore, ContentError> {
        let blobs = dir.join("blobs").join("sha256");
        let ingest = dir.join("ingest");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        if ingest.exists() {
            fs::remove_dir_all(&ingest).map_err(io_err(&ingest))?;
        }
        fs::create_dir_all(&ingest).map_err(io_err(&ingest))?;
        Ok(ContentStore { blobs, ingest })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).exists()
    }

    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, ContentError> {
        let path = self.path(digest);
        fs::read(&path).map_err(io_err(&path))
    }

    /// Stores a small blob held in memory (manifests, configs).
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<(), ContentError> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut ingest = self.ingest(digest.clone(), data.len() as u64)?;
        ingest.write(data)?;
        ingest.commit()
    }

    /// Starts streaming a blob in; it becomes visible only on `commit`.
    pub fn ingest(&self, digest: Digest, size: u64) -> Result<Ingest, ContentError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .ingest
            .join(format!("{}-{}-{n}", digest.hex(), std::process::id()));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(Ingest {
            file,
            tmp,
            target: self.path(&digest),
            verifier: DigestVerifier::new(digest, size),
            committed: false,
        })
    }

    /// Every blob in the store with its size.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, ContentError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.blobs).map_err(io_err(&self.blobs))? {
            let entry = entry.map_err(io_err(&self.blobs))?;
            let name = entry.file_name();
            let Ok(digest) = Digest::parse(&format!("sha256:{}", name.to_string_lossy())) else {
                continue;
            };
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((digest, size));
        }
        Ok(out)
    }

    pub fn remove(&self, digest: &Digest) -> Result<(), ContentError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }
}

/// A blob being written; dropped without `commit`, it leaves nothing behind.
pub struct Ingest {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    verifier: DigestVerifier,
    committed: bool,
}

impl Ingest {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        self.verifier
            .update(chunk)
            .map_err(|source| ContentError::Verify {
                digest: self.verifier.expected().clone(),
                source,
            })?;
        self.file.write_all(chunk).map_err(io_err(&self.tmp))
    }

    pub fn written(&self) -> u64 {
        self.verifier.size()
    }

    /// Verifies size and digest, makes the data durable, and publishes the blob.
    pub fn commit(mut self) -> Result<(), ContentError> {
        let digest = self.verifier.expected().clone();
        let verifier =
            std::mem::replace(&mut self.verifier, DigestVerifier::new(digest.clone(), 0));
        verifier
            .finish()
            .map_err(|source| ContentError::Verify { digest, source })?;
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        fs::rename(&self.tmp, &self.target).map_err(io_err(&self.target))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_blob_is_published_and_a_bad_one_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let good = Digest::sha256_of(b"hello");
        store.put(&good, b"hello").expect("put");
        assert_eq!(store.read(&good).expect("read"), b"hello");

        let claimed = Digest::sha256_of(b"other");
        let mut ingest = store.ingest(claimed.clone(), 5).expect("ingest");
        ingest.write(b"hello").expect("write");
        assert!(ingest.commit().is_err(), "digest mismatch must fail");
        assert!(!store.contains(&claimed));
        assert_eq!(
            fs::read_dir(dir.path().join("ingest")).expect("ls").count(),
            0
        );

        let mut ingest = store.ingest(good.clone(), 3).expect("ingest");
        assert!(ingest.write(b"hello").is_err(), "oversize must fail early");
    }

    #[test]
    fn opening_discards_leftover_ingests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let ingest = store.ingest(Digest::sha256_of(b"x"), 1).expect("ingest");
        std::mem::forget(ingest);
        ContentStore::open(dir.path()).expect("reopen");
        assert_eq!(
            fs::read_dir(dir.path().join("ingest")).expect("ls").count(),
            0
        );
    }
}
