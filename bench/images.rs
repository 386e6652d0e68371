//! Image benchmarks: a cold PullImage of each image, from the local registry,
//! timed from the CRI client. Cold means an empty store: every sample gets a
//! fresh daemon with an empty root (its start is not timed), so the daemon's
//! VmHWM after the pull is its peak resident memory for that pull. Also
//! recorded per pull: the daemon's CPU time, and its idle RSS before the pull.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::{ImageSpec, ImageStatusRequest, PullImageRequest};
use serde_json::Value;

use crate::daemon::{Daemon, Runtime, Setup};
use crate::procfs;
use crate::report::{Metric, Unit};

/// How long a daemon sits idle after it answered CRI Version, before its
/// idle RSS is read and the pull starts.
const SETTLE: Duration = Duration::from_secs(1);
/// A pull that takes longer than this is a failure, not a sample.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// An image in the registry, and what it is made of.
#[derive(Clone, Debug)]
pub struct Image {
    /// Short name for the table and the command-line filter, e.g. "big".
    pub name: &'static str,
    /// What PullImage is given: "127.0.0.1:PORT/berth-test/big:latest".
    pub reference: String,
    pub layers: usize,
    /// Compressed size of config and layers, as the registry serves them.
    pub compressed: u64,
}

impl Image {
    /// Layer count and compressed size read from the OCI layout the image
    /// was pushed from (`layout_ref` is its ref name there).
    pub fn from_layout(
        name: &'static str,
        reference: String,
        layout: &Path,
        layout_ref: &str,
    ) -> Result<Image, String> {
        let read_json = |path: &Path| -> Result<Value, String> {
            let text = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
            serde_json::from_slice(&text).map_err(|e| format!("parse {}: {e}", path.display()))
        };
        let index = read_json(&layout.join("index.json"))?;
        let manifest_digest = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == layout_ref)
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| format!("no {layout_ref} in {}", layout.display()))?;
        let blob = |digest: &str| layout.join("blobs").join(digest.replacen(':', "/", 1));
        let manifest = read_json(&blob(manifest_digest))?;
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        let size = |v: &Value| v["size"].as_u64().unwrap_or(0);
        Ok(Image {
            name,
            reference,
            layers: layers.len(),
            compressed: size(&manifest["config"]) + layers.iter().map(size).sum::<u64>(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} layers, {:.1} MB)",
            self.name,
            self.layers,
            self.compressed as f64 / 1e6
        )
    }
}

/// What the image benchmarks measured.
pub struct Results {
    pub per_image: Vec<ImageResults>,
    /// What daemons left on the host after they stopped (normally nothing).
    pub leftovers: Vec<String>,
}

pub struct ImageResults {
    pub image: Image,
    /// Wall time of PullImage as the CRI client sees it.
    pub pull: Metric,
    /// The daemon's VmHWM after the pull.
    pub peak_rss: Metric,
    /// The daemon's user + system CPU time during the pull.
    pub cpu: Metric,
    /// What the daemon's root takes on disk after the pull: content blobs,
    /// unpacked layers, metadata.
    pub disk: Metric,
}

/// `samples` cold pulls of every image in each runtime, alternating which
/// runtime goes first; pushes each daemon's RSS after it sat idle for
/// [`SETTLE`] into `idle_rss`.
pub async fn run(
    setup: &Setup,
    images: &[Image],
    samples: usize,
    idle_rss: &mut Metric,
) -> Result<Results, String> {
    let mut results = Results {
        per_image: images
            .iter()
            .map(|image| ImageResults {
                image: image.clone(),
                pull: Metric::new(
                    format!("PullImage {}, cold", image.describe()),
                    Unit::Seconds,
                ),
                peak_rss: Metric::new(
                    format!("peak RSS during pull of {} (VmHWM)", image.name),
                    Unit::MiB,
                ),
                cpu: Metric::new(
                    format!("CPU time of the daemon for pull of {}", image.name),
                    Unit::Seconds,
                ),
                disk: Metric::new(
                    format!("store on disk after pull of {}", image.name),
                    Unit::MiB,
                ),
            })
            .collect(),
        leftovers: Vec::new(),
    };
    for sample in 0..samples {
        for per_image in &mut results.per_image {
            for runtime in Runtime::in_turn(sample) {
                let pulled = cold_pull(setup, runtime, &per_image.image).await?;
                eprintln!(
                    "  sample {}/{samples} {:<5} {:<10} pull {:>7.3} s  peak RSS {:>6.1} MiB  CPU {:>5.2} s (system {:>5.2} s)  idle RSS {:>5.1} MiB",
                    sample + 1,
                    per_image.image.name,
                    runtime.name(),
                    pulled.seconds,
                    pulled.peak_rss_mib,
                    pulled.cpu.total(),
                    pulled.cpu.system,
                    pulled.idle_rss_mib,
                );
                per_image.pull.push(runtime, pulled.seconds);
                per_image.peak_rss.push(runtime, pulled.peak_rss_mib);
                per_image.cpu.push(runtime, pulled.cpu.total());
                per_image.disk.push(runtime, pulled.disk_mib);
                idle_rss.push(runtime, pulled.idle_rss_mib);
                results.leftovers.extend(
                    pulled
                        .leftovers
                        .into_iter()
                        .map(|l| format!("{}: {l}", runtime.name())),
                );
            }
        }
    }
    Ok(results)
}

struct Pulled {
    seconds: f64,
    peak_rss_mib: f64,
    cpu: procfs::Cpu,
    idle_rss_mib: f64,
    disk_mib: f64,
    leftovers: Vec<String>,
}

/// Starts a fresh `runtime`, lets it settle, pulls `image` once, stops it.
async fn cold_pull(setup: &Setup, runtime: Runtime, image: &Image) -> Result<Pulled, String> {
    let mut daemon = Daemon::start(runtime, setup).await?;
    let pid = daemon.pid();
    tokio::time::sleep(SETTLE).await;
    let idle = procfs::memory(pid)?;
    let mut client = daemon.images().await?;
    let spec = || {
        Some(ImageSpec {
            image: image.reference.clone(),
            ..Default::default()
        })
    };
    // Write back what earlier samples (and anyone else) left dirty, so this
    // pull's fsyncs and syncfs do not pay for it.
    nix::unistd::sync();
    procfs::check_interrupted()?;
    let cpu_before = procfs::cpu(pid)?;
    let started = Instant::now();
    let pulled = tokio::select! {
        r = tokio::time::timeout(PULL_TIMEOUT, client.pull_image(PullImageRequest {
            image: spec(),
            ..Default::default()
        })) => r,
        () = procfs::interrupted() => return Err("interrupted".to_string()),
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu = procfs::cpu(pid)?.since(cpu_before);
    let peak = procfs::memory(pid)?;
    let fail = |what: String| {
        format!(
            "{} pull of {}: {what}; its log ends:\n{}",
            runtime.name(),
            image.reference,
            daemon.log_tail(20)
        )
    };
    let image_ref = match pulled {
        Err(_) => return Err(fail(format!("no answer within {PULL_TIMEOUT:?}"))),
        Ok(Err(status)) => return Err(fail(format!("PullImage failed: {status}"))),
        Ok(Ok(response)) => response.into_inner().image_ref,
    };
    let status = client
        .image_status(ImageStatusRequest {
            image: spec(),
            verbose: false,
        })
        .await
        .map_err(|s| fail(format!("ImageStatus failed: {s}")))?
        .into_inner();
    match status.image {
        Some(found) if found.id == image_ref || image_ref.is_empty() => {}
        Some(found) => {
            return Err(fail(format!(
                "PullImage returned {image_ref}, ImageStatus says {}",
                found.id
            )));
        }
        None => {
            return Err(fail(
                "ImageStatus finds no image after the pull".to_string(),
            ));
        }
    }
    let disk = daemon.disk_usage();
    drop(client);
    let leftovers = daemon.stop().await;
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(Pulled {
        seconds,
        peak_rss_mib: mib(peak.hwm_kib),
        cpu,
        idle_rss_mib: mib(idle.rss_kib),
        disk_mib: disk as f64 / (1024.0 * 1024.0),
        leftovers,
    })
}
