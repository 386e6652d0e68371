//! Images: references, the registry client, the content store, layer unpack
//! into snapshots, image records and garbage collection. `ImageStore` is the
//! one entry point; it knows nothing of CRI.

pub mod content;
pub mod digest;
pub mod manifest;
pub mod metadata;
mod pull;
pub mod reference;
pub mod registry;
pub mod snapshot;
pub mod unpack;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use content::{ContentError, ContentStore};
use digest::Digest;
use metadata::{Catalog, ImageRecord};
use reference::{ImageName, ReferenceError, parse_image_name};
use registry::{RegistryClient, RegistryError};
use snapshot::{SnapshotError, SnapshotStore};

use crate::config::Config;
use crate::store::StoreError;

pub use registry::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("pulling {reference}: {source}")]
    Registry {
        reference: String,
        source: RegistryError,
    },
    #[error("pulling {reference}: {source}")]
    Manifest {
        reference: String,
        source: manifest::ManifestError,
    },
    #[error("pulling {reference}: layer {layer}: {source}")]
    Unpack {
        reference: String,
        layer: Digest,
        source: unpack::UnpackError,
    },
    #[error(
        "pulling {reference}: layer {layer} unpacks to {actual}, but the image config says {expected}"
    )]
    DiffId {
        reference: String,
        layer: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image {name} is in use by {users}")]
    InUse { name: String, users: String },
    #[error("{0}")]
    Internal(String),
}

/// Bytes and inodes the image store uses on its filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub bytes: u64,
    pub inodes: u64,
}

type SharedPull = futures_util::future::Shared<
    futures_util::future::BoxFuture<'static, Result<ImageRecord, Arc<ImageError>>>,
>;

pub struct ImageStore {
    dir: PathBuf,
    content: ContentStore,
    snapshots: SnapshotStore,
    registry: RegistryClient,
    catalog: RwLock<Catalog>,
    max_downloads: usize,
    /// Pulls in flight by reference: a second caller waits on the first's pull.
    pulls: Mutex<HashMap<String, SharedPull>>,
    /// Layer fetches in flight by blob digest, shared between images.
    layers: Mutex<HashMap<Digest, pull::SharedLayer>>,
    /// Pulls hold it shared; garbage collection holds it alone, so it never
    /// deletes what a running pull has written but not yet recorded.
    gc_lock: tokio::sync::RwLock<()>,
    /// Layers held by containers, by container id: kept while a container
    /// exists, even when its image is removed.
    held: Mutex<HashMap<String, Vec<Digest>>>,
}

impl ImageStore {
    /// Opens the store under `<root>`, discarding leftovers of a crashed pull.
    pub fn open(config: &Config) -> Result<Arc<ImageStore>, ImageError> {
        let dir = config.root.clone();
        let store = ImageStore {
            content: ContentStore::open(&dir.join("content"))?,
            snapshots: SnapshotStore::open(&dir.join("snapshots"))?,
            catalog: RwLock::new(Catalog::load(&dir.join("images"))?),
            registry: RegistryClient::new(
                config.registries.clone(),
                Duration::from_secs(config.images.pull_progress_timeout_secs),
            ),
            max_downloads: config.images.max_concurrent_downloads,
            pulls: Mutex::new(HashMap::new()),
            layers: Mutex::new(HashMap::new()),
            gc_lock: tokio::sync::RwLock::new(()),
            held: Mutex::new(HashMap::new()),
            dir,
        };
        Ok(Arc::new(store))
    }

    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner())
    }

    fn catalog_mut(&self) -> std::sync::RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        self.catalog().all().cloned().collect()
    }

    /// The image `name` refers to (id, tag or digest), if berth has it.
    pub fn find(&self, name: &str) -> Result<Option<ImageRecord>, ImageError> {
        let parsed = parse_image_name(name)?;
        Ok(self.catalog().find(&parsed).cloned())
    }

    /// The image config as stored (JSON), for verbose status.
    pub fn config_json(&self, image: &ImageRecord) -> Result<Vec<u8>, ImageError> {
        Ok(self.content.read(&image.id)?)
    }

    /// The overlayfs lower dirs of an image, bottom layer first.
    pub fn layer_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        image
            .layers
            .iter()
            .map(|l| self.snapshots.path(&l.chain_id))
            .collect()
    }

    /// Keeps the layers (chain ids) while the container `holder` exists.
    pub fn hold(&self, holder: &str, chains: Vec<Digest>) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(holder.to_string(), chains);
    }

    /// Lets go of what `holder` kept, and collects what no one uses now.
    pub fn release(self: &Arc<Self>, holder: &str) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(holder);
        self.collect_in_background();
    }

    /// Collects garbage on a task of its own: it waits for pulls in flight,
    /// and the caller need not.
    fn collect_in_background(self: &Arc<Self>) {
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(e) = store.collect_garbage().await {
                tracing::warn!(error = %e, "image garbage collection failed");
            }
        });
    }

    /// Removes the name `name`; the image goes when no name is left, and its
    /// content when no other image shares it. An unknown name is not an error.
    pub async fn remove(self: &Arc<Self>, name: &str) -> Result<(), ImageError> {
        let parsed = parse_image_name(name)?;
        {
            let mut catalog = self.catalog_mut();
            let Some(mut image) = catalog.find(&parsed).cloned() else {
                return Ok(());
            };
            match &parsed {
                // By id: the image and every name of it go.
                ImageName::Id(_) => {
                    image.repo_tags.clear();
                    image.repo_digests.clear();
                }
                ImageName::Reference(r) => match r.digest() {
                    Some(d) => {
                        image.repo_digests.remove(&format!("{}@{d}", r.name()));
                    }
                    None => {
                        image.repo_tags.remove(&r.to_string());
                        // As Docker does: the repository's digest names go
                        // with its last tag, else removing an image by its
                        // only tag (crictl rmi) would leave it listed.
                        let same_repo =
                            |t: &String| t.rsplit_once(':').is_some_and(|(n, _)| n == r.name());
                        if !image.repo_tags.iter().any(same_repo) {
                            let prefix = format!("{}@", r.name());
                            image.repo_digests.retain(|d| !d.starts_with(&prefix));
                        }
                    }
                },
            }
            if image.is_unnamed() {
                catalog.delete(&image.id)?;
                tracing::info!(image = %image.id, "image removed");
            } else {
                catalog.put(image)?;
            }
        }
        self.collect_in_background();
        Ok(())
    }

    /// Deletes blobs and snapshots that no image record uses. Pulls cannot run
    /// meanwhile, so nothing written but not yet recorded is lost.
    pub async fn collect_garbage(&self) -> Result<(), ImageError> {
        let _exclusive = self.gc_lock.write().await;
        let (blobs, chains) = {
            let catalog = self.catalog();
            let mut blobs: HashSet<Digest> = HashSet::new();
            let mut chains: HashSet<Digest> = HashSet::new();
            for image in catalog.all() {
                blobs.insert(image.id.clone());
                blobs.extend(image.manifests.iter().cloned());
                for layer in &image.layers {
                    blobs.insert(layer.digest.clone());
                    chains.insert(layer.chain_id.clone());
                }
            }
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            chains.extend(held.values().flatten().cloned());
            (blobs, chains)
        };
        for (digest, _) in self.content.list()? {
            if !blobs.contains(&digest) {
                tracing::info!(blob = %digest, "collecting unused blob");
                self.content.remove(&digest)?;
            }
        }
        for chain_id in self.snapshots.list()? {
            if !chains.contains(&chain_id) {
                tracing::info!(snapshot = %chain_id, "collecting unused snapshot");
                self.snapshots.remove(&chain_id)?;
            }
        }
        Ok(())
    }

    /// Real bytes and inodes under the content and snapshot directories.
    pub fn disk_usage(&self) -> DiskUsage {
        let mut usage = DiskUsage::default();
        for dir in ["content", "snapshots", "images"] {
            add_usage(&self.dir.join(dir), &mut usage);
        }
        usage
    }

    /// Where the image store lives: the directory kubelet's eviction watches.
    pub fn mountpoint(&self) -> &Path {
        &self.dir
    }
}

/// Allocated bytes and inodes below `path`.
pub fn disk_usage_of(path: &Path) -> DiskUsage {
    let mut usage = DiskUsage::default();
    add_usage(path, &mut usage);
    usage
}

/// Adds up allocated bytes and inodes below `path`, not following symlinks and
/// counting a hard-linked file once.
fn add_usage(path: &Path, usage: &mut DiskUsage) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.bytes += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&p)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
}
