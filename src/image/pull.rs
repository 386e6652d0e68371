//! Pulling an image: resolve the manifest for the host's platform, fetch the
//! config, then fetch each layer — in parallel, decompressed and unpacked
//! while it downloads — and record the image. Concurrent pulls of one image,
//! and of one layer across images, share a single download; each runs as its
//! own task, so a caller that gives up does not abort it for the others.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::sync::{Semaphore, mpsc};

use super::digest::Digest;
use super::manifest::{self, ManifestKind};
use super::metadata::{ImageRecord, LayerRecord};
use super::reference::{ImageName, Reference, parse_image_name};
use super::registry::{Credentials, EndpointFailure, RegistryError, Session};
use super::snapshot::chain_ids;
use super::unpack;
use super::{ImageError, ImageStore, SharedPull};

pub(super) type SharedLayer = Shared<BoxFuture<'static, Result<(), Arc<ImageError>>>>;

/// Chunks buffered between the download and the unpacking thread.
const PIPE_CHUNKS: usize = 16;
/// How often a long layer download logs its progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the registry told us about the image, before its layers are fetched.
struct Resolved {
    /// The digest the name resolved to (an index's, if it was one).
    top_digest: Digest,
    manifests: Vec<(Digest, Bytes)>,
    config_digest: Digest,
    config_body: Bytes,
    layers: Vec<LayerRecord>,
}

impl ImageStore {
    /// Pulls `name` (never an image id) and returns its record.
    pub async fn pull(
        self: &Arc<Self>,
        name: &str,
        credentials: Option<Credentials>,
    ) -> Result<ImageRecord, Arc<ImageError>> {
        let reference = match parse_image_name(name).map_err(ImageError::from)? {
            ImageName::Reference(r) => r,
            ImageName::Id(id) => {
                // An id names content berth already has, or nothing it can fetch.
                return self.catalog().get(&id).cloned().ok_or_else(|| {
                    Arc::new(ImageError::Internal(format!(
                        "{id} is an image id, not a reference, and berth has no such image"
                    )))
                });
            }
        };
        let key = reference.to_string();
        let shared = {
            let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            match pulls.get(&key) {
                Some(pull) => pull.clone(),
                None => {
                    let store = self.clone();
                    let task_key = key.clone();
                    let task = tokio::spawn(async move {
                        let result = store.pull_now(&reference, credentials.as_ref()).await;
                        store
                            .pulls
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&task_key);
                        result.map_err(Arc::new)
                    });
                    let pull: SharedPull = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Arc::new(ImageError::Internal(format!(
                                "pull task failed: {e}"
                            ))))
                        })
                    }
                    .boxed()
                    .shared();
                    pulls.insert(key, pull.clone());
                    pull
                }
            }
        };
        shared.await
    }

    async fn pull_now(
        self: &Arc<Self>,
        reference: &Reference,
        credentials: Option<&Credentials>,
    ) -> Result<ImageRecord, ImageError> {
        let started = Instant::now();
        let _shared = self.gc_lock.read().await;
        let name = reference.to_string();
        let registry_err = |source| ImageError::Registry {
            reference: name.clone(),
            source,
        };
        let resolved = self
            .registry
            .with_endpoints(reference, credentials, |session| {
                let store = self.clone();
                let name = name.clone();
                async move {
                    let session = Arc::new(session);
                    let resolved = store.resolve(&session, reference).await?;
                    store
                        .fetch_layers(&session, &name, &resolved.layers)
                        .await?;
                    Ok::<_, PullFailure>(resolved)
                }
            })
            .await
            .map_err(|failure: PullFailure| failure.into_image_error(&name, registry_err))?;

        for (digest, body) in &resolved.manifests {
            self.content.put(digest, body)?;
        }
        self.content
            .put(&resolved.config_digest, &resolved.config_body)?;
        // Unpacked files are not fsynced one by one: one syncfs makes them
        // durable before the record that points at them is written.
        sync_filesystem(self.mountpoint());

        let config = manifest::parse_config(&resolved.config_body)
            .map_err(|source| ImageError::Manifest {
                reference: name.clone(),
                source,
            })?
            .config
            .unwrap_or_default();
        let record = {
            let mut catalog = self.catalog_mut();
            let mut record = catalog
                .get(&resolved.config_digest)
                .cloned()
                .unwrap_or_else(|| ImageRecord {
                    id: resolved.config_digest.clone(),
                    repo_tags: Default::default(),
                    repo_digests: Default::default(),
                    size: resolved.config_body.len() as u64
                        + resolved.layers.iter().map(|l| l.size).sum::<u64>(),
                    layers: resolved.layers.clone(),
                    manifests: Default::default(),
                    config,
                    pinned: false,
                });
            if reference.tag().is_some() && reference.digest().is_none() {
                let tag = reference.to_string();
                for changed in catalog.untag_others(&tag, &record.id) {
                    if changed.is_unnamed() {
                        catalog.delete(&changed.id)?;
                    } else {
                        catalog.put(changed)?;
                    }
                }
                record.repo_tags.insert(tag);
            }
            record
                .repo_digests
                .insert(format!("{}@{}", reference.name(), resolved.top_digest));
            record
                .manifests
                .extend(resolved.manifests.iter().map(|(d, _)| d.clone()));
            catalog.put(record.clone())?;
            record
        };
        tracing::info!(
            image = %name,
            id = %record.id,
            layers = record.layers.len(),
            bytes = record.size,
            millis = started.elapsed().as_millis() as u64,
            "image pulled"
        );
        Ok(record)
    }

    /// Fetches the manifest (choosing the platform from an index) and the config.
    async fn resolve(
        &self,
        session: &Session,
        reference: &Reference,
    ) -> Result<Resolved, PullFailure> {
        let top = session.manifest(reference.manifest_reference()).await?;
        let mut manifests = vec![(top.digest.clone(), top.body.clone())];
        let manifest = match manifest::parse(&top.media_type, &top.body)? {
            ManifestKind::Manifest(m) => m,
            ManifestKind::Index(index) => {
                let chosen = manifest::select_platform(&index, &manifest::host_platform())?;
                let fetched = session.manifest(chosen.digest.as_str()).await?;
                if fetched.digest != chosen.digest {
                    return Err(PullFailure::Registry(RegistryError::Protocol {
                        endpoint: session.endpoint.base.clone(),
                        message: format!(
                            "manifest {} came back with digest {}",
                            chosen.digest, fetched.digest
                        ),
                    }));
                }
                let m = match manifest::parse(&fetched.media_type, &fetched.body)? {
                    ManifestKind::Manifest(m) => m,
                    ManifestKind::Index(_) => {
                        return Err(PullFailure::Manifest(manifest::ManifestError::MediaType(
                            "an index inside an index".to_string(),
                        )));
                    }
                };
                manifests.push((fetched.digest, fetched.body));
                m
            }
        };
        let config_body = match self.content.contains(&manifest.config.digest) {
            true => Bytes::from(self.content.read(&manifest.config.digest)?),
            false => {
                fetch_small_blob(session, &manifest.config.digest, manifest.config.size).await?
            }
        };
        let config = manifest::parse_config(&config_body)?;
        let diff_ids = config.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(PullFailure::Manifest(manifest::ManifestError::LayerCount {
                diff_ids: diff_ids.len(),
                layers: manifest.layers.len(),
            }));
        }
        let chains = chain_ids(&diff_ids);
        let layers = manifest
            .layers
            .iter()
            .zip(diff_ids)
            .zip(chains)
            .map(|((d, diff_id), chain_id)| LayerRecord {
                digest: d.digest.clone(),
                size: d.size,
                media_type: d.media_type.clone(),
                diff_id,
                chain_id,
            })
            .collect();
        Ok(Resolved {
            top_digest: top.digest,
            manifests,
            config_digest: manifest.config.digest,
            config_body,
            layers,
        })
    }

    /// Makes sure every layer is unpacked, at most `max_downloads` at once.
    async fn fetch_layers(
        self: &Arc<Self>,
        session: &Arc<Session>,
        name: &str,
        layers: &[LayerRecord],
    ) -> Result<(), PullFailure> {
        let slots = Arc::new(Semaphore::new(self.max_downloads));
        let mut waits = Vec::new();
        for layer in layers {
            if self.snapshots.contains(&layer.chain_id) && self.content.contains(&layer.digest) {
                continue;
            }
            waits.push(self.shared_layer(session, name, layer, slots.clone()));
        }
        for result in futures_util::future::join_all(waits).await {
            result.map_err(PullFailure::Shared)?;
        }
        Ok(())
    }

    /// The one fetch of `layer` in flight, started here if there is none.
    fn shared_layer(
        self: &Arc<Self>,
        session: &Arc<Session>,
        name: &str,
        layer: &LayerRecord,
        slots: Arc<Semaphore>,
    ) -> SharedLayer {
        let mut fetches = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        // Keyed by blob: two images may carry one layer compressed differently,
        // and each needs its own blob in the content store.
        if let Some(f) = fetches.get(&layer.digest) {
            return f.clone();
        }
        let store = self.clone();
        let session = session.clone();
        let layer = layer.clone();
        let name = name.to_string();
        let key = layer.digest.clone();
        let task = tokio::spawn(async move {
            let result = match slots.acquire_owned().await {
                Ok(_slot) => store.fetch_layer(&session, &name, &layer).await,
                Err(_) => Err(ImageError::Internal("download slots closed".to_string())),
            };
            store
                .layers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&layer.digest);
            result.map_err(Arc::new)
        });
        let shared = async move {
            task.await.unwrap_or_else(|e| {
                Err(Arc::new(ImageError::Internal(format!(
                    "layer task failed: {e}"
                ))))
            })
        }
        .boxed()
        .shared();
        fetches.insert(key, shared.clone());
        shared
    }

    /// Downloads one layer into the content store while a blocking thread
    /// decompresses and unpacks the same bytes into a new snapshot.
    async fn fetch_layer(
        &self,
        session: &Session,
        name: &str,
        layer: &LayerRecord,
    ) -> Result<(), ImageError> {
        let started = Instant::now();
        let unpack_err = |source| ImageError::Unpack {
            reference: name.to_string(),
            layer: layer.digest.clone(),
            source,
        };
        let pending = self.snapshots.prepare(&layer.chain_id)?;
        let dest = pending.dir().to_path_buf();
        let media_type = layer.media_type.clone();

        let summary = if self.content.contains(&layer.digest) {
            // The blob survived (e.g. its snapshot was collected): unpack it locally.
            let path = self.content.path(&layer.digest);
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&path).map_err(unpack::UnpackError::Read)?;
                unpack::unpack_compressed_layer(&media_type, std::io::BufReader::new(file), &dest)
            })
            .await
            .map_err(|e| ImageError::Internal(format!("unpack thread failed: {e}")))?
            .map_err(unpack_err)?
        } else {
            let (tx, rx) = mpsc::channel::<Bytes>(PIPE_CHUNKS);
            let unpacker = tokio::task::spawn_blocking(move || {
                unpack::unpack_compressed_layer(&media_type, ChannelReader::new(rx), &dest)
            });
            let downloaded = self.download(session, name, layer, tx, started).await;
            // Wait for the unpacker even when the download failed: it must be
            // done writing before the pending snapshot is removed.
            let unpacked = unpacker
                .await
                .map_err(|e| ImageError::Internal(format!("unpack thread failed: {e}")))?;
            let ingest = downloaded?;
            let summary = unpacked.map_err(unpack_err)?;
            ingest.commit()?;
            summary
        };
        if summary.diff_id != layer.diff_id {
            return Err(ImageError::DiffId {
                reference: name.to_string(),
                layer: layer.digest.clone(),
                expected: layer.diff_id.clone(),
                actual: summary.diff_id,
            });
        }
        pending.commit()?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            image = name,
            layer = %layer.digest,
            bytes = layer.size,
            files = summary.entries,
            seconds,
            rate_kib_s = (layer.size as f64 / 1024.0 / seconds.max(0.001)) as u64,
            "layer pulled"
        );
        Ok(())
    }

    /// Streams a layer blob into the content store and into `tx`, the unpacker's pipe.
    async fn download(
        &self,
        session: &Session,
        name: &str,
        layer: &LayerRecord,
        tx: mpsc::Sender<Bytes>,
        started: Instant,
    ) -> Result<super::content::Ingest, ImageError> {
        let mut ingest = self.content.ingest(layer.digest.clone(), layer.size)?;
        let mut body = session
            .blob(&layer.digest)
            .await
            .map_err(|source| registry_error(name, source))?;
        let mut tx = Some(tx);
        let mut last_report = Instant::now();
        while let Some(chunk) = body
            .next()
            .await
            .map_err(|source| registry_error(name, source))?
        {
            ingest.write(&chunk)?;
            // The unpacker may finish before the last bytes (gzip trailer
            // padding); the blob is still written whole and verified.
            if let Some(sender) = &tx
                && sender.send(chunk).await.is_err()
            {
                tx = None;
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let done = ingest.written();
                tracing::info!(
                    image = name,
                    layer = %layer.digest,
                    bytes = done,
                    total = layer.size,
                    rate_kib_s = done / 1024 / started.elapsed().as_secs().max(1),
                    "pulling layer"
                );
            }
        }
        Ok(ingest)
    }
}

async fn fetch_small_blob(
    session: &Session,
    digest: &Digest,
    size: u64,
) -> Result<Bytes, PullFailure> {
    const MAX_CONFIG: u64 = 8 * 1024 * 1024;
    if size > MAX_CONFIG {
        return Err(PullFailure::Registry(RegistryError::Protocol {
            endpoint: session.endpoint.base.clone(),
            message: format!("image config {digest} claims {size} bytes"),
        }));
    }
    let mut verifier = super::digest::DigestVerifier::new(digest.clone(), size);
    let mut body = Vec::with_capacity(size as usize);
    let mut stream = session.blob(digest).await?;
    while let Some(chunk) = stream.next().await? {
        verifier
            .update(&chunk)
            .map_err(|e| protocol(session, digest, e))?;
        body.extend_from_slice(&chunk);
    }
    verifier
        .finish()
        .map_err(|e| protocol(session, digest, e))?;
    Ok(Bytes::from(body))
}

fn protocol(session: &Session, digest: &Digest, e: super::digest::DigestError) -> PullFailure {
    PullFailure::Registry(RegistryError::Protocol {
        endpoint: session.endpoint.base.clone(),
        message: format!("blob {digest}: {e}"),
    })
}

fn registry_error(name: &str, source: RegistryError) -> ImageError {
    ImageError::Registry {
        reference: name.to_string(),
        source,
    }
}

/// Why one endpoint could not deliver the image.
enum PullFailure {
    Registry(RegistryError),
    Manifest(manifest::ManifestError),
    Content(super::content::ContentError),
    Shared(Arc<ImageError>),
}

impl From<RegistryError> for PullFailure {
    fn from(e: RegistryError) -> Self {
        PullFailure::Registry(e)
    }
}

impl From<manifest::ManifestError> for PullFailure {
    fn from(e: manifest::ManifestError) -> Self {
        PullFailure::Manifest(e)
    }
}

impl From<super::content::ContentError> for PullFailure {
    fn from(e: super::content::ContentError) -> Self {
        PullFailure::Content(e)
    }
}

impl EndpointFailure for PullFailure {
    fn is_transient(&self) -> bool {
        match self {
            PullFailure::Registry(e) => e.is_transient(),
            PullFailure::Shared(e) => {
                matches!(&**e, ImageError::Registry { source, .. } if source.is_transient())
            }
            PullFailure::Manifest(_) | PullFailure::Content(_) => false,
        }
    }
}

impl std::fmt::Display for PullFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullFailure::Registry(e) => e.fmt(f),
            PullFailure::Manifest(e) => e.fmt(f),
            PullFailure::Content(e) => e.fmt(f),
            PullFailure::Shared(e) => e.fmt(f),
        }
    }
}

impl PullFailure {
    fn into_image_error(
        self,
        name: &str,
        registry_err: impl FnOnce(RegistryError) -> ImageError,
    ) -> ImageError {
        match self {
            PullFailure::Registry(e) => registry_err(e),
            PullFailure::Manifest(source) => ImageError::Manifest {
                reference: name.to_string(),
                source,
            },
            PullFailure::Content(e) => ImageError::Content(e),
            PullFailure::Shared(e) => match Arc::try_unwrap(e) {
                Ok(e) => e,
                Err(shared) => ImageError::Internal(shared.to_string()),
            },
        }
    }
}

/// A blocking `Read` over chunks sent from the async download.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Flushes the filesystem holding `path` (syncfs): one call instead of an
/// fsync per unpacked file.
fn sync_filesystem(path: &std::path::Path) {
    match std::fs::File::open(path) {
        Ok(dir) => {
            if let Err(e) = nix::unistd::syncfs(&dir) {
                tracing::warn!(error = %e, "syncfs failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, path = %path.display(), "cannot open for syncfs"),
    }
}
