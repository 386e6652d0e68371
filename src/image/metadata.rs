//! Image records: one JSON file per image under `<root>/images/`, keyed by the
//! image id (the config digest), fsynced since images outlive reboots; and the
//! in-memory catalog that finds an image by id, tag or digest.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::manifest::RunConfig;
use super::reference::{ImageName, Reference};
use crate::store::{self, Durability, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub diff_id: Digest,
    pub chain_id: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The config digest.
    pub id: Digest,
    /// Normalized `registry/repository:tag` names.
    pub repo_tags: BTreeSet<String>,
    /// Normalized `registry/repository@sha256:…` names.
    pub repo_digests: BTreeSet<String>,
    /// Config plus compressed layer bytes, as registries count an image.
    pub size: u64,
    pub layers: Vec<LayerRecord>,
    /// Manifests and indexes kept in the content store for this image.
    pub manifests: BTreeSet<Digest>,
    pub config: RunConfig,
    pub pinned: bool,
}

impl ImageRecord {
    /// No name refers to the image any more.
    pub fn is_unnamed(&self) -> bool {
        self.repo_tags.is_empty() && self.repo_digests.is_empty()
    }
}

/// All image records, on disk and in memory.
pub struct Catalog {
    dir: PathBuf,
    images: HashMap<Digest, ImageRecord>,
}

impl Catalog {
    /// Loads every record; a corrupt one is logged and skipped, never fatal.
    pub fn load(dir: &Path) -> Result<Catalog, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut images = HashMap::new();
        let entries = std::fs::read_dir(dir).map_err(|source| StoreError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match store::read_json::<ImageRecord>(&path) {
                Ok(record) => {
                    images.insert(record.id.clone(), record);
                }
                Err(e) => tracing::warn!(error = %e, "skipping image record"),
            }
        }
        Ok(Catalog {
            dir: dir.to_path_buf(),
            images,
        })
    }

    fn path(&self, id: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", id.hex()))
    }

    pub fn all(&self) -> impl Iterator<Item = &ImageRecord> {
        self.images.values()
    }

    pub fn get(&self, id: &Digest) -> Option<&ImageRecord> {
        self.images.get(id)
    }

    /// Finds an image by id, by `name:tag` or by `name@digest`.
    pub fn find(&self, name: &ImageName) -> Option<&ImageRecord> {
        match name {
            ImageName::Id(id) => self.images.get(id),
            ImageName::Reference(r) => self.find_reference(r),
        }
    }

    fn find_reference(&self, r: &Reference) -> Option<&ImageRecord> {
        if let Some(digest) = r.digest() {
            let wanted = format!("{}@{digest}", r.name());
            return self
                .images
                .values()
                .find(|i| i.repo_digests.contains(&wanted));
        }
        let wanted = r.to_string();
        self.images.values().find(|i| i.repo_tags.contains(&wanted))
    }

    /// Writes `record` durably, then makes it visible.
    pub fn put(&mut self, record: ImageRecord) -> Result<(), StoreError> {
        store::write_json(&self.path(&record.id), &record, Durability::PowerLoss)?;
        self.images.insert(record.id.clone(), record);
        Ok(())
    }

    /// Removes the record, durably.
    pub fn delete(&mut self, id: &Digest) -> Result<(), StoreError> {
        let path = self.path(id);
        store::remove(&path)?;
        store::sync_dir(&self.dir).map_err(|source| StoreError::Write { path, source })?;
        self.images.remove(id);
        Ok(())
    }

    /// Takes `tag` away from every image but `keep`; returns the changed records.
    pub fn untag_others(&self, tag: &str, keep: &Digest) -> Vec<ImageRecord> {
        self.images
            .values()
            .filter(|i| &i.id != keep && i.repo_tags.contains(tag))
            .map(|i| {
                let mut changed = i.clone();
                changed.repo_tags.remove(tag);
                changed
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::reference::parse_image_name;

    fn record(n: u8, tag: &str) -> ImageRecord {
        let id = Digest::sha256_of(&[n]);
        ImageRecord {
            id: id.clone(),
            repo_tags: [tag.to_string()].into(),
            repo_digests: [format!(
                "docker.io/library/busybox@{}",
                Digest::sha256_of(&[n, n])
            )]
            .into(),
            size: 10,
            layers: vec![],
            manifests: [Digest::sha256_of(&[n, n])].into(),
            config: RunConfig::default(),
            pinned: false,
        }
    }

    #[test]
    fn images_are_found_by_id_tag_and_digest_and_survive_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog = Catalog::load(dir.path()).expect("load");
        let r = record(1, "docker.io/library/busybox:latest");
        catalog.put(r.clone()).expect("put");
        let catalog = Catalog::load(dir.path()).expect("reload");
        for name in [
            r.id.to_string(),
            r.id.hex().to_string(),
            "busybox".to_string(),
            "docker.io/library/busybox:latest".to_string(),
            format!("busybox@{}", Digest::sha256_of(&[1, 1])),
        ] {
            let parsed = parse_image_name(&name).expect("name parses");
            assert_eq!(catalog.find(&parsed).map(|i| &i.id), Some(&r.id), "{name}");
        }
        let other = parse_image_name("busybox:other").expect("parses");
        assert!(catalog.find(&other).is_none());
    }

    #[test]
    fn a_corrupt_record_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bad.json"), b"{").expect("write");
        let catalog = Catalog::load(dir.path()).expect("load");
        assert_eq!(catalog.all().count(), 0);
    }
}
