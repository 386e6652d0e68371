//! berthd's life: take the root and state locks, bind the CRI socket, serve
//! until SIGTERM or SIGINT, drain requests in flight (bounded), clean up.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use crate::cni::bridge::BridgeNetwork;
use crate::cni::{NetworkError, PodNetwork};
use crate::config::NetworkMode;
use crate::config::{CgroupDriver, Config};
use crate::cri::CriService;
use crate::image::{ImageError, ImageStore};
use crate::runtime::cgroup::{CgroupError, Cgroups};
use crate::runtime::systemd;
use crate::runtime::{Runtime, RuntimeError};

/// Largest gRPC message accepted or sent; ListContainers on a full node is big.
const MAX_GRPC_MESSAGE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open lock file {path}: {source}")]
    LockFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another berthd (pid {pid}) holds {path}; one daemon per root and state dir")]
    AlreadyRunning { path: PathBuf, pid: String },
    #[error("socket {path} is served by another process; refusing to replace it")]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cgroup.driver is systemd, but systemd is not this host's init (no {marker}); \
         set cgroup.driver: cgroupfs"
    )]
    SystemdNotBooted { marker: &'static str },
    #[error(transparent)]
    Cgroup(CgroupError),
    #[error("cannot recover pods and containers: {0}")]
    Runtime(RuntimeError),
    #[error("cannot open the image store: {0}")]
    Images(ImageError),
    #[error("cannot set up the pod network: {0}")]
    Network(NetworkError),
    #[error("cannot start the streaming server: {0}")]
    Stream(crate::stream::StreamError),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// An exclusive flock on a file that also names the holder's pid; released on drop.
#[derive(Debug)]
pub struct PidLock {
    _lock: Flock<File>,
}

impl PidLock {
    /// Takes the lock at `path`, or fails naming the pid of the berthd that holds it.
    pub fn acquire(path: &Path) -> Result<PidLock, DaemonError> {
        let lock_err = |source| DaemonError::LockFile {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(lock_err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut pid = String::new();
                // The holder wrote its pid; an unreadable one still names the file.
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(DaemonError::AlreadyRunning {
                    path: path.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                });
            }
        };
        lock.set_len(0).map_err(lock_err)?;
        lock.rewind().map_err(lock_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(lock_err)?;
        Ok(PidLock { _lock: lock })
    }
}

fn create_dir(path: &Path, mode: u32) -> Result<(), DaemonError> {
    let err = |source| DaemonError::CreateDir {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
}

/// Binds the CRI socket with mode 0660, replacing a stale file but never a live socket.
fn bind_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| DaemonError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse {
                path: path.to_path_buf(),
            });
        }
        tracing::info!(socket = %path.display(), "removing stale socket");
        let _ = fs::remove_file(path);
    }
    let listen_err = |source| DaemonError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660)).map_err(listen_err)?;
    Ok(listener)
}

/// The pod network of the config's mode: `builtin`, the bridge; `cni`, CNI
/// plugins only (not ready until a config appears in `cni_conf_dir`);
/// `auto`, CNI when `cni_conf_dir` holds a config file at start, else the
/// bridge.
fn pod_network(config: &Config) -> Result<Arc<dyn PodNetwork>, DaemonError> {
    let network = &config.network;
    let use_cni = match network.mode {
        NetworkMode::Cni => true,
        NetworkMode::Builtin => false,
        NetworkMode::Auto => crate::cni::conf::has_conf_files(&network.cni_conf_dir),
    };
    if use_cni {
        let cni = crate::cni::cni_network::CniNetwork::new(network, &config.state_dir.join("cni"))
            .map_err(DaemonError::Network)?;
        tracing::info!(
            mode = ?network.mode,
            conf_dir = %network.cni_conf_dir.display(),
            network = cni.config().map(|c| c.name).unwrap_or_default(),
            "pod network: CNI plugins"
        );
        return Ok(Arc::new(cni));
    }
    let bridge = BridgeNetwork::new(network, &config.state_dir.join("network"))
        .map_err(DaemonError::Network)?;
    tracing::info!(mode = ?network.mode, bridge = %network.bridge, "pod network: built-in bridge");
    Ok(Arc::new(bridge))
}

/// Image garbage collection now, then passes over images and the runtime's
/// orphans every `interval_secs` (never when 0).
async fn collect_garbage(images: Arc<ImageStore>, runtime: Arc<Runtime>, interval_secs: u64) {
    let mut first = true;
    loop {
        if let Err(e) = images.collect_garbage().await {
            tracing::warn!(error = %e, "image garbage collection failed");
        }
        if !first {
            let runtime = runtime.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || runtime.remove_orphans()).await {
                tracing::warn!(error = %e, "garbage collection of the runtime failed");
            }
        }
        first = false;
        if interval_secs == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(interval_secs)).await;
    }
}

/// Runs berthd until a termination signal, then shuts down cleanly.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    // Checked first: without systemd as init there is no manager to own
    // the units, and falling back to cgroupfs would put pods where kubelet
    // does not look.
    if config.cgroup.driver == CgroupDriver::Systemd && !Path::new(systemd::BOOTED_MARKER).exists()
    {
        return Err(DaemonError::SystemdNotBooted {
            marker: systemd::BOOTED_MARKER,
        });
    }
    let config = Arc::new(config);
    create_dir(&config.root, 0o711)?;
    create_dir(&config.state_dir, 0o711)?;
    let _root_lock = PidLock::acquire(&config.root.join("berthd.lock"))?;
    let _state_lock = PidLock::acquire(&config.state_dir.join("berthd.lock"))?;

    let cgroups = Cgroups::discover(Path::new("/sys/fs/cgroup")).map_err(DaemonError::Cgroup)?;
    let cgroup_version = cgroups.version;
    let images = ImageStore::open(&config).map_err(DaemonError::Images)?;
    let network = pod_network(&config)?;
    let runtime = Runtime::open(config.clone(), cgroups.clone(), images.clone(), network)
        .map_err(DaemonError::Runtime)?;
    // Leftovers of crashed pulls go; after recovery, so containers' layers
    // are held. Recovery removed the runtime's own orphans already.
    let collector = tokio::spawn(collect_garbage(
        images.clone(),
        runtime.clone(),
        config.gc_interval_secs,
    ));
    let runtime_for_shutdown = runtime.clone();
    let stream = crate::stream::StreamServer::start(&config.stream, runtime.clone())
        .await
        .map_err(DaemonError::Stream)?;
    let service = CriService::new(config.clone(), cgroup_version, images, runtime);
    service.set_stream_server(Arc::new(stream));

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;

    let listener = bind_socket(&config.socket)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .layer(crate::cri::deadline::DeadlineLayer)
        .add_service(
            RuntimeServiceServer::from_arc(service.clone())
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(
            ImageServiceServer::from_arc(service)
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);
    tracing::info!(
        socket = %config.socket.display(),
        root = %config.root.display(),
        state_dir = %config.state_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "berthd serving CRI"
    );

    let outcome = tokio::select! {
        _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); None }
        result = &mut server => Some(result),
    };
    let result = match outcome {
        Some(result) => result,
        None => {
            let _ = stop_tx.send(());
            let grace = Duration::from_secs(config.shutdown_timeout_secs);
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        seconds = config.shutdown_timeout_secs,
                        "requests still in flight after the shutdown timeout; abandoning them"
                    );
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    collector.abort();
    let _ = fs::remove_file(&config.socket);
    if !config.live_restore {
        let grace = Duration::from_secs(config.shutdown_timeout_secs);
        runtime_for_shutdown.stop_all_containers(grace).await;
    }
    runtime_for_shutdown.shut_down();
    // The parent of pod cgroups goes when no pod is left in it.
    cgroups.remove_if_empty(&runtime_for_shutdown.parent_cgroup());
    tracing::info!("berthd stopped");
    match result {
        Ok(served) => served.map_err(DaemonError::from),
        Err(join) => {
            tracing::error!(error = %join, "server task failed");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("berthd.lock");
        let _held = PidLock::acquire(&path).expect("first lock");
        let err = PidLock::acquire(&path).expect_err("second lock must fail");
        let text = err.to_string();
        assert!(text.contains(&std::process::id().to_string()), "{text}");
    }

    #[test]
    fn a_lock_is_free_again_after_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("berthd.lock");
        drop(PidLock::acquire(&path).expect("first lock"));
        PidLock::acquire(&path).expect("lock after release");
    }
}
