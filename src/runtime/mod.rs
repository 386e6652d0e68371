//! Pods and containers on namespaces, overlayfs and cgroups: the core that the
//! CRI front end (and later the Docker API) drives. It decides; `cri`
//! translates. State lives in records under the state dir and in the
//! monitors, so a restarted berthd finds every pod and container again.

pub mod cdi;
pub mod cgroup;
pub mod container;
pub mod device_filter;
pub mod devices;
pub mod handler;
mod infra;
pub mod namespace;
pub mod pod;
mod recovery;
pub mod resources;
mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod stats;
pub mod systemd;
pub mod user;
pub mod userns;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::cni::{NetworkError, PodNetwork, PodNetworkRequest};
use crate::config::{CgroupDriver, Config};
use crate::image::ImageStore;
use crate::monitor::{self, MonitorConnection, MonitorError, MonitorStatus};
use crate::store::{self, Durability, StoreError};
use cgroup::{CgroupError, Cgroups};
use container::{ContainerConfig, ContainerPaths, ContainerRecord, ContainerState};
use namespace::{NamespaceError, NamespaceKind, NamespaceSetup};
use pod::{NamespaceMode, PodConfig, PodPaths, PodRecord, PodState};
use resources::Resources;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Systemd(#[from] systemd::SystemdError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Cdi(#[from] cdi::CdiError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

/// Whether the runtime can run pods, with the reason when not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeReadiness {
    Ready,
    NotReady { reason: String, message: String },
}

/// A container as berth knows it: its record and the monitor's latest status.
#[derive(Debug, Clone)]
pub struct ContainerView {
    pub record: ContainerRecord,
    pub status: MonitorStatus,
}

impl ContainerView {
    pub fn state(&self) -> ContainerState {
        state_of(&self.status)
    }
}

fn state_of(status: &MonitorStatus) -> ContainerState {
    match status.state {
        monitor::ContainerState::Created => ContainerState::Created,
        monitor::ContainerState::Running => ContainerState::Running,
        monitor::ContainerState::Exited => ContainerState::Exited,
        monitor::ContainerState::Unknown => ContainerState::Unknown,
    }
}

/// The status of a container whose monitor is gone without recording an exit.
fn lost_status(message: &str) -> MonitorStatus {
    MonitorStatus {
        protocol: monitor::PROTOCOL_VERSION,
        monitor_pid: 0,
        init_pid: 0,
        state: monitor::ContainerState::Exited,
        created_at: 0,
        started_at: 0,
        finished_at: now_nanos(),
        exit_code: 255,
        signal: 0,
        oom_killed: false,
        reason: monitor::REASON_ERROR.to_string(),
        message: message.to_string(),
    }
}

struct ContainerEntry {
    record: ContainerRecord,
    /// The monitor's status; changes are published here, so a stop can wait.
    status: watch::Sender<MonitorStatus>,
}

#[derive(Default)]
struct Tables {
    pods: HashMap<String, PodRecord>,
    containers: HashMap<String, ContainerEntry>,
    /// Reserved pod names and container names, to the id holding each.
    pod_names: HashMap<String, String>,
    container_names: HashMap<String, String>,
}

/// A change in a pod's or container's life, for event subscribers (evented PLEG).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The container's id, or the pod's for pod events.
    pub id: String,
    pub pod_id: String,
    pub kind: EventKind,
    /// Unix nanoseconds.
    pub at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

/// Usage of one container.
#[derive(Debug, Clone, Default)]
pub struct ContainerUsage {
    pub cpu: Option<stats::CpuUsage>,
    pub memory: Option<stats::MemoryUsage>,
    pub layer: stats::LayerUsage,
    pub layer_dir: PathBuf,
}

/// Usage of one pod: its cgroup and its network interfaces.
#[derive(Debug, Clone, Default)]
pub struct PodUsage {
    pub cpu: Option<stats::CpuUsage>,
    pub memory: Option<stats::MemoryUsage>,
    pub interfaces: Vec<stats::InterfaceStats>,
}

pub struct Runtime {
    config: Arc<Config>,
    cgroups: Cgroups,
    /// systemd's manager under the systemd driver, which owns the pod
    /// slices and container scopes; none under cgroupfs.
    systemd: Option<systemd::Systemd>,
    images: Arc<ImageStore>,
    network: Arc<dyn PodNetwork>,
    /// berthd's own executable, re-run as a monitor.
    exe: PathBuf,
    tables: Mutex<Tables>,
    events: broadcast::Sender<Event>,
    cpu: stats::CpuSampler,
    /// Compiled seccomp programs, one per distinct profile.
    seccomp: seccomp::SeccompCache,
}

/// Filters of the list calls; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct PodFilter {
    pub id: String,
    pub state: Option<PodState>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct ContainerFilter {
    pub id: String,
    pub pod_id: String,
    pub state: Option<ContainerState>,
    pub labels: BTreeMap<String, String>,
}

fn labels_match(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

/// A new 64-hex-digit id, as containerd makes them.
fn new_id() -> Result<String, RuntimeError> {
    let mut bytes = [0u8; 32];
    let mut urandom = std::fs::File::open("/dev/urandom").map_err(io("open /dev/urandom"))?;
    std::io::Read::read_exact(&mut urandom, &mut bytes).map_err(io("read /dev/urandom"))?;
    Ok(hex::encode(bytes))
}

/// Finds the one id that equals or starts with `given`.
fn resolve_id<'a, I: Iterator<Item = &'a String>>(
    ids: I,
    given: &str,
    what: &str,
) -> Result<Option<String>, RuntimeError> {
    if given.is_empty() {
        return Err(RuntimeError::InvalidArgument(format!("no {what} id given")));
    }
    let matches: Vec<&String> = ids.filter(|id| id.starts_with(given)).collect();
    match matches.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((*one).clone())),
        many => match many.iter().find(|id| id.as_str() == given) {
            Some(exact) => Ok(Some((*exact).clone())),
            None => Err(RuntimeError::InvalidArgument(format!(
                "{what} id prefix {given:?} is ambiguous: {} match",
                many.len()
            ))),
        },
    }
}

impl Runtime {
    /// Opens the runtime, finding the pods and containers of earlier runs.
    pub fn open(
        config: Arc<Config>,
        cgroups: Cgroups,
        images: Arc<ImageStore>,
        network: Arc<dyn PodNetwork>,
    ) -> Result<Arc<Runtime>, RuntimeError> {
        let exe = std::env::current_exe().map_err(io("find berthd's own executable"))?;
        let systemd = match config.cgroup.driver {
            CgroupDriver::Systemd => Some(systemd::Systemd::connect()?),
            CgroupDriver::Cgroupfs => None,
        };
        let runtime = Arc::new(Runtime {
            config,
            cgroups,
            systemd,
            images,
            network,
            exe,
            tables: Mutex::new(Tables::default()),
            events: broadcast::channel(1024).0,
            cpu: stats::CpuSampler::default(),
            seccomp: seccomp::SeccompCache::new(),
        });
        runtime.recover()?;
        let live: Vec<PodNetworkRequest> = runtime
            .tables()
            .pods
            .values()
            .filter(|p| {
                p.state == PodState::Ready && p.config.namespaces.network != NamespaceMode::Node
            })
            .map(|p| runtime.network_request(p))
            .collect();
        runtime.network.reconcile(&live)?;
        Ok(runtime)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, id: &str, pod_id: &str, kind: EventKind) {
        // No subscriber is fine: events are for whoever listens now.
        let _ = self.events.send(Event {
            id: id.to_string(),
            pod_id: pod_id.to_string(),
            kind,
            at: now_nanos(),
        });
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn readiness(&self) -> RuntimeReadiness {
        RuntimeReadiness::Ready
    }

    /// Stops every container that runs or waits to start, all at once, each
    /// with its stop signal and then SIGKILL after `grace`: a shutdown
    /// without live restore.
    pub async fn stop_all_containers(&self, grace: Duration) {
        let ids: Vec<String> = self.tables().containers.keys().cloned().collect();
        let stops = ids.iter().map(|id| async move {
            if let Err(e) = self.stop_container(id, grace).await {
                tracing::warn!(container = %id, error = %e, "cannot stop the container");
            }
        });
        futures_util::future::join_all(stops).await;
        tracing::info!(containers = ids.len(), "every container stopped");
    }

    /// A clean shutdown: with no pod left, the node-wide network objects go too.
    pub fn shut_down(&self) {
        // Monitors of removed containers may take a moment to leave it.
        if self.tables().containers.is_empty()
            && let Err(e) = self
                .cgroups
                .remove(&format!("{}/monitors", self.parent_cgroup()))
        {
            tracing::debug!(error = %e, "monitors cgroup stays: monitors still run");
        }
        if self.tables().pods.is_empty()
            && let Err(e) = self.network.remove_all()
        {
            tracing::warn!(error = %e, "cannot remove the pod network");
        }
    }

    pub fn network(&self) -> &dyn PodNetwork {
        self.network.as_ref()
    }

    fn network_request(&self, pod: &PodRecord) -> PodNetworkRequest {
        PodNetworkRequest {
            pod_id: pod.id.clone(),
            name: pod.config.name.clone(),
            namespace: pod.config.namespace.clone(),
            uid: pod.config.uid.clone(),
            netns: self.pod_paths(&pod.id).ns.join("net"),
            port_mappings: pod.config.port_mappings.clone(),
        }
    }

    fn pod_paths(&self, id: &str) -> PodPaths {
        PodPaths::new(&self.config.state_dir, id)
    }

    fn container_paths(&self, id: &str) -> ContainerPaths {
        ContainerPaths::new(&self.config.state_dir, &self.config.root, id)
    }

    // ---- pods ----

    pub fn run_pod(&self, config: PodConfig) -> Result<String, RuntimeError> {
        if !self
            .config
            .runtime_handlers
            .iter()
            .any(|h| h.name == config.runtime_handler)
        {
            return Err(RuntimeError::InvalidArgument(format!(
                "unknown runtime handler {:?}; configured: {:?}",
                config.runtime_handler,
                self.config
                    .runtime_handlers
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
            )));
        }
        let kinds = pod_namespace_kinds(&config);
        let user_namespace = userns::requested(&config.namespaces)?;
        for name in config.sysctls.keys() {
            match namespace::sysctl_namespace(name) {
                Some(kind) if kinds.contains(&kind) => {}
                Some(kind) => {
                    return Err(RuntimeError::InvalidArgument(format!(
                        "sysctl {name} needs the pod's own {} namespace, but the pod uses the host's",
                        kind.name()
                    )));
                }
                None => {
                    return Err(RuntimeError::InvalidArgument(format!(
                        "sysctl {name} is not namespaced and cannot be set per pod"
                    )));
                }
            }
        }
        let id = new_id()?;
        let (cgroup, owns_cgroup) = self.pod_cgroup(&id, &config.cgroup_parent)?;
        let reserved = PodRecord::reserved_name(&config);
        {
            let mut t = self.tables();
            if let Some(holder) = t.pod_names.get(&reserved) {
                return Err(RuntimeError::AlreadyExists(format!(
                    "pod name {reserved} is reserved by pod {holder}"
                )));
            }
            t.pod_names.insert(reserved.clone(), id.clone());
        }
        let mut record = PodRecord {
            id: id.clone(),
            config,
            state: PodState::Ready,
            created_at: now_nanos(),
            cgroup,
            owns_cgroup,
            ip: None,
            additional_ips: Vec::new(),
            infra_pid: None,
            user_namespace,
        };
        match self.set_up_pod(&mut record, kinds) {
            Ok(()) => {
                let userns_host_uid = record.user_namespace.map(|m| m.uids.host_id);
                self.tables().pods.insert(id.clone(), record);
                self.emit(&id, &id, EventKind::Created);
                self.emit(&id, &id, EventKind::Started);
                tracing::info!(
                    pod = %id,
                    name = %reserved,
                    userns_host_uid = ?userns_host_uid,
                    "pod sandbox running"
                );
                Ok(id)
            }
            Err(e) => {
                self.tear_down_pod(&record);
                self.tables().pod_names.remove(&reserved);
                Err(e)
            }
        }
    }

    /// A pod's start, step by step; on error the caller tears down what was made.
    fn set_up_pod(
        &self,
        pod: &mut PodRecord,
        kinds: Vec<NamespaceKind>,
    ) -> Result<(), RuntimeError> {
        let paths = self.pod_paths(&pod.id);
        std::fs::create_dir_all(&paths.dir).map_err(io("create the pod directory"))?;
        let hostname = if pod.config.hostname.is_empty() {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            pod.config.hostname.clone()
        };
        std::fs::write(paths.hostname(), format!("{hostname}\n")).map_err(io("write hostname"))?;
        std::fs::write(
            paths.resolv_conf(),
            pod::resolv_conf(pod.config.dns.as_ref()),
        )
        .map_err(io("write resolv.conf"))?;
        let setup = NamespaceSetup {
            kinds,
            hostname: hostname.clone(),
            sysctls: pod.config.sysctls.clone(),
        };
        match &pod.user_namespace {
            Some(map) => namespace::create_pinned_in_userns(&paths.ns, &setup, map, &self.exe)?,
            None => namespace::create_pinned(&paths.ns, setup)?,
        }
        let hosts = if pod.config.namespaces.network == NamespaceMode::Node {
            std::fs::read_to_string("/etc/hosts").unwrap_or_default()
        } else {
            let status = self.network.set_up(&self.network_request(pod))?;
            pod.ip = status.ips.first().map(|ip| ip.to_string());
            pod.additional_ips = status.ips.iter().skip(1).map(|ip| ip.to_string()).collect();
            pod::hosts_file(&hostname, pod.ip.as_deref())
        };
        std::fs::write(paths.hosts(), hosts).map_err(io("write hosts"))?;
        if pod.config.namespaces.ipc != NamespaceMode::Node {
            rootfs::mount_shm(&paths.shm())?;
        }
        if pod.owns_cgroup
            && let Some(sd) = &self.systemd
        {
            let slice = systemd::unit_of(&pod.cgroup);
            sd.start(slice, &systemd::slice_properties(slice, &pod.id))?;
            tracing::debug!(pod = %pod.id, slice, "pod slice started");
        }
        self.cgroups.create(&pod.cgroup)?;
        if pod.owns_cgroup {
            resources::apply(
                &self.cgroups,
                &pod.cgroup,
                &resources::pod_limits(&pod.config.resources, &pod.config.overhead),
            )?;
        } else {
            // kubelet made and sized this cgroup, overhead included.
            tracing::debug!(pod = %pod.id, cgroup = %pod.cgroup, "pod limits left to the cgroup's owner");
        }
        if pod.config.namespaces.pid == NamespaceMode::Pod {
            // Under systemd no process may sit in a slice: the infra gets a
            // scope of its own, named by the pod's id.
            let infra_cgroup = match self.systemd {
                Some(_) => systemd::scope_path(&pod.cgroup, &pod.id),
                None => pod.cgroup.clone(),
            };
            self.cgroups.create(&infra_cgroup)?;
            let procs = self.cgroups.procs_files(&infra_cgroup)?;
            let jail = pod.user_namespace.map(|_| infra::Jail {
                userns: paths.ns.join("user"),
                root: paths.infra_root(),
            });
            pod.infra_pid = Some(infra::start(
                &self.exe,
                &procs,
                &paths.ns.join("pid"),
                jail.as_ref(),
            )?);
            if let Some(pid) = pod.infra_pid {
                self.start_scope(&infra_cgroup, &pod.id, pid, &Resources::default())?;
            }
        }
        store::write_json(&paths.record(), pod, Durability::Crash)?;
        Ok(())
    }

    /// Undoes every step of a pod's start that happened; repeatable.
    fn tear_down_pod(&self, pod: &PodRecord) {
        let paths = self.pod_paths(&pod.id);
        self.release_network(pod);
        if let Some(pid) = pod.infra_pid {
            infra::stop(pid, &paths.ns.join("pid"));
        }
        namespace::remove_pins(&paths.ns, &namespace::ALL_KINDS);
        rootfs::unmount(&paths.shm());
        if self.systemd.is_some()
            && let Err(e) = self
                .cgroups
                .remove(&systemd::scope_path(&pod.cgroup, &pod.id))
        {
            tracing::warn!(pod = %pod.id, error = %e, "cannot remove the infra's scope cgroup");
        }
        if pod.owns_cgroup
            && let Err(e) = self.cgroups.remove(&pod.cgroup)
        {
            tracing::warn!(pod = %pod.id, error = %e, "cannot remove the pod's cgroup");
        }
        if pod.owns_cgroup
            && let Some(sd) = &self.systemd
            && let Err(e) = sd.stop(systemd::unit_of(&pod.cgroup))
        {
            tracing::warn!(pod = %pod.id, error = %e, "cannot stop the pod's slice");
        }
        if let Err(e) = std::fs::remove_dir_all(&paths.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pod = %pod.id, error = %e, "cannot remove the pod's directory");
        }
    }

    /// Releases the pod's network, keeping on past errors: teardown must finish.
    fn release_network(&self, pod: &PodRecord) {
        if pod.config.namespaces.network == NamespaceMode::Node {
            return;
        }
        if let Err(e) = self.network.tear_down(&self.network_request(pod)) {
            tracing::warn!(pod = %pod.id, error = %e, "cannot release the pod's network");
        }
    }

    pub fn resolve_pod(&self, given: &str) -> Result<Option<String>, RuntimeError> {
        let t = self.tables();
        resolve_id(t.pods.keys(), given, "pod sandbox")
    }

    pub fn resolve_container(&self, given: &str) -> Result<Option<String>, RuntimeError> {
        let t = self.tables();
        resolve_id(t.containers.keys(), given, "container")
    }

    /// Kills every container of the pod at once and marks it not ready.
    /// Unknown pods are fine: stopping is repeatable.
    pub async fn stop_pod(&self, given: &str) -> Result<(), RuntimeError> {
        let Some(id) = self.resolve_pod(given)? else {
            return Ok(());
        };
        let containers: Vec<String> = self
            .tables()
            .containers
            .values()
            .filter(|c| c.record.pod_id == id)
            .map(|c| c.record.id.clone())
            .collect();
        let kills = containers
            .iter()
            .map(|c| self.kill_and_wait(c, Duration::ZERO));
        for result in futures_util::future::join_all(kills).await {
            result?;
        }
        let (record, was_ready) = {
            let mut t = self.tables();
            let Some(pod) = t.pods.get_mut(&id) else {
                return Ok(());
            };
            let was_ready = pod.state == PodState::Ready;
            pod.state = PodState::NotReady;
            (pod.clone(), was_ready)
        };
        store::write_json(&self.pod_paths(&id).record(), &record, Durability::Crash)?;
        if was_ready {
            // Network teardown enters namespaces and runs tools: off the async workers.
            tokio::task::block_in_place(|| {
                self.release_network(&record);
                if let Some(pid) = record.infra_pid {
                    infra::stop(pid, &self.pod_paths(&id).ns.join("pid"));
                }
            });
        }
        store::write_json(&self.pod_paths(&id).record(), &record, Durability::Crash)?;
        self.emit(&id, &id, EventKind::Stopped);
        tracing::info!(pod = %id, "pod sandbox stopped");
        Ok(())
    }

    /// Removes the pod, its containers and everything it owns; repeatable.
    pub async fn remove_pod(&self, given: &str) -> Result<(), RuntimeError> {
        let Some(id) = self.resolve_pod(given)? else {
            return Ok(());
        };
        self.stop_pod(&id).await?;
        let containers: Vec<String> = self
            .tables()
            .containers
            .values()
            .filter(|c| c.record.pod_id == id)
            .map(|c| c.record.id.clone())
            .collect();
        for c in containers {
            self.remove_container(&c).await?;
        }
        let Some(record) = self.tables().pods.get(&id).cloned() else {
            return Ok(());
        };
        tokio::task::block_in_place(|| self.tear_down_pod(&record));
        let mut t = self.tables();
        t.pods.remove(&id);
        t.pod_names
            .remove(&PodRecord::reserved_name(&record.config));
        drop(t);
        self.emit(&id, &id, EventKind::Deleted);
        tracing::info!(pod = %id, "pod sandbox removed");
        Ok(())
    }

    pub fn pod(&self, given: &str) -> Result<PodRecord, RuntimeError> {
        let id = self
            .resolve_pod(given)?
            .ok_or_else(|| RuntimeError::NotFound(format!("pod sandbox {given:?} not found")))?;
        self.tables()
            .pods
            .get(&id)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(format!("pod sandbox {given:?} not found")))
    }

    pub fn list_pods(&self, filter: &PodFilter) -> Vec<PodRecord> {
        self.tables()
            .pods
            .values()
            .filter(|p| filter.id.is_empty() || p.id.starts_with(&filter.id))
            .filter(|p| filter.state.is_none_or(|s| s == p.state))
            .filter(|p| labels_match(&p.config.labels, &filter.labels))
            .cloned()
            .collect()
    }

    // ---- containers ----

    pub async fn create_container(
        self: &Arc<Self>,
        pod_given: &str,
        config: ContainerConfig,
    ) -> Result<String, RuntimeError> {
        let pod = self.pod(pod_given)?;
        if pod.state != PodState::Ready {
            return Err(RuntimeError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )));
        }
        let image = self
            .images
            .find(&config.image)
            .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?
            .ok_or_else(|| RuntimeError::NotFound(format!("image {:?} not found", config.image)))?;
        let id = new_id()?;
        let key = format!("{}_{}_{}", config.name, pod.id, config.attempt);
        {
            let mut t = self.tables();
            if let Some(holder) = t.container_names.get(&key) {
                return Err(RuntimeError::AlreadyExists(format!(
                    "container name {:?} (attempt {}) in pod {} is reserved by container {holder}",
                    config.name, config.attempt, pod.id
                )));
            }
            t.container_names.insert(key.clone(), id.clone());
        }
        let paths = self.container_paths(&id);
        let layers = self.images.layer_dirs(&image);
        let result = self
            .prepare_container(&id, &pod, config, &image, &paths, &layers)
            .await;
        match result {
            Ok(record) => {
                self.images.hold(&id, record.layers.clone());
                let status = monitor::read_status(&paths.bundle)?;
                let (tx, _) = watch::channel(status);
                self.tables()
                    .containers
                    .insert(id.clone(), ContainerEntry { record, status: tx });
                let runtime = self.clone();
                let watched = id.clone();
                tokio::spawn(async move { runtime.watch_container(watched).await });
                self.emit(&id, &pod.id, EventKind::Created);
                tracing::info!(pod = %pod.id, container = %id, "container created");
                Ok(id)
            }
            Err(e) => {
                // A monitor may be up already if a later step failed.
                let bundle = paths.bundle.clone();
                let _ = tokio::task::spawn_blocking(move || monitor::kill_launched(&bundle)).await;
                self.discard_container(&id, &pod.cgroup, &paths);
                self.tables().container_names.remove(&key);
                Err(e)
            }
        }
    }

    /// A container's creation, step by step, up to a monitor holding the
    /// init process ready to exec.
    async fn prepare_container(
        &self,
        id: &str,
        pod: &PodRecord,
        config: ContainerConfig,
        image: &crate::image::metadata::ImageRecord,
        paths: &ContainerPaths,
        layers: &[PathBuf],
    ) -> Result<ContainerRecord, RuntimeError> {
        std::fs::create_dir_all(&paths.bundle).map_err(io("create the container bundle"))?;
        let userns_pin = self.pod_paths(&pod.id).ns.join("user");
        rootfs::mount_overlay(
            layers,
            &paths.layer,
            &paths.rootfs(),
            pod.user_namespace
                .as_ref()
                .map(|map| (userns_pin.as_path(), map)),
        )?;
        let rootfs = paths.rootfs();
        let mut user = user::resolve(
            &user::UserRequest {
                run_as_user: config.run_as_user,
                run_as_username: config.run_as_username.clone(),
                run_as_group: config.run_as_group,
                supplemental_groups: config.supplemental_groups.clone(),
                image_user: image.config.user.clone(),
                strict_groups: config.groups_policy == container::GroupsPolicy::Strict,
            },
            &user::read_in_root(&rootfs, "/etc/passwd"),
            &user::read_in_root(&rootfs, "/etc/group"),
        )
        .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?;
        let args = container::process_args(
            &config.command,
            &config.args,
            &image.config.entrypoint,
            &image.config.cmd,
        );
        if args.is_empty() {
            return Err(RuntimeError::InvalidArgument(
                "no command: neither the container nor the image names one".to_string(),
            ));
        }
        let mut env = container::merge_env(&image.config.env, &config.envs);
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!(
                "HOME={}",
                if user.home.is_empty() {
                    "/"
                } else {
                    &user.home
                }
            ));
        }
        let cwd = if !config.working_dir.is_empty() {
            config.working_dir.clone()
        } else if !image.config.working_dir.is_empty() {
            image.config.working_dir.clone()
        } else {
            "/".to_string()
        };
        if config.privileged && !pod.config.privileged {
            return Err(RuntimeError::InvalidArgument(
                "a privileged container needs a privileged pod sandbox".to_string(),
            ));
        }
        let cdi_names = cdi::requested(&config.cdi_devices, &config.annotations)?;
        let cdi_edits = cdi::resolve(&self.config.cdi.spec_dirs, &cdi_names)?;
        let mut device_nodes = if config.privileged {
            devices::host_devices()
        } else {
            devices::requested(&config.devices)?
        };
        if !cdi_names.is_empty() {
            tracing::info!(pod = %pod.id, container = %id, devices = ?cdi_names, "CDI devices");
            cdi_edits.merge_into(&mut device_nodes, &mut env, &mut user.groups);
        }
        let cgroup = self.container_cgroup(&pod.cgroup, id);
        self.cgroups.create(&cgroup)?;
        resources::apply(&self.cgroups, &cgroup, &config.resources)?;
        devices::restrict(&self.cgroups, &cgroup, config.privileged, &device_nodes)?;
        let log_path = if pod.config.log_directory.is_empty() || config.log_path.is_empty() {
            String::new()
        } else {
            Path::new(&pod.config.log_directory)
                .join(&config.log_path)
                .display()
                .to_string()
        };
        if pod.user_namespace.is_some() && config.pid_mode == NamespaceMode::Node {
            return Err(RuntimeError::InvalidArgument(
                "a container of a pod with its own user namespace cannot use the node's pid namespace"
                    .to_string(),
            ));
        }
        let pid_namespace = match config.pid_mode {
            NamespaceMode::Pod => Some(self.pod_paths(&pod.id).ns.join("pid")),
            NamespaceMode::Target => {
                let target = self.container(&config.pid_target).map_err(|_| {
                    RuntimeError::NotFound(format!(
                        "target container {:?} not found",
                        config.pid_target
                    ))
                })?;
                if target.state() != ContainerState::Running {
                    return Err(RuntimeError::FailedPrecondition(format!(
                        "target container {} is not running",
                        target.record.id
                    )));
                }
                Some(PathBuf::from(format!(
                    "/proc/{}/ns/pid",
                    target.status.init_pid
                )))
            }
            NamespaceMode::Container | NamespaceMode::Node => None,
        };
        for m in config.mounts.iter().filter(|m| m.recursive_read_only) {
            if !m.readonly {
                return Err(RuntimeError::InvalidArgument(format!(
                    "mount {}: recursive_read_only needs readonly",
                    m.container_path
                )));
            }
            if m.propagation != container::Propagation::Private {
                return Err(RuntimeError::InvalidArgument(format!(
                    "mount {}: recursive_read_only works only with private propagation",
                    m.container_path
                )));
            }
        }
        let mut resolved = config.clone();
        for m in &mut resolved.mounts {
            m.host_path = host_path(&m.host_path)?;
        }
        resolved.mounts.extend(cdi_edits.mounts.iter().cloned());
        let spec = spec::build(&spec::SpecInput {
            config: &resolved,
            pod,
            pod_paths: &self.pod_paths(&pod.id),
            rootfs: &rootfs,
            args,
            env,
            cwd,
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            cgroup: &cgroup,
            pid_namespace,
            devices: device_nodes.iter().map(|d| d.spec()).collect(),
        });
        let mut spec = spec;
        if let Some(profile) = self.seccomp_profile(&resolved)? {
            // A profile's first use compiles it (tens of ms): off the async workers.
            let program = tokio::task::block_in_place(|| self.seccomp.get_or_compile(&profile))
                .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?;
            program
                .write(&paths.bundle.join(seccomp::PROGRAM_FILE))
                .map_err(|e| RuntimeError::Io {
                    what: "write the compiled seccomp program".to_string(),
                    source: std::io::Error::other(e),
                })?;
            spec["linux"]["seccomp"] =
                serde_json::to_value(&profile).map_err(|e| RuntimeError::Io {
                    what: "encode the seccomp profile".to_string(),
                    source: std::io::Error::other(e),
                })?;
        }
        store::write_json(&paths.bundle.join("config.json"), &spec, Durability::Crash)?;
        let monitor_config = monitor::MonitorConfig {
            id: id.to_string(),
            // Without a log directory the output has nowhere to go: discard it.
            log_path: if log_path.is_empty() {
                PathBuf::from("/dev/null")
            } else {
                PathBuf::from(&log_path)
            },
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            tty: config.tty,
            cgroup_procs: self.cgroups.procs_files(&cgroup)?,
        };
        store::write_json(
            &paths.bundle.join("monitor.json"),
            &monitor_config,
            Durability::Crash,
        )?;
        let record = ContainerRecord {
            id: id.to_string(),
            pod_id: pod.id.clone(),
            image_id: image.id.to_string(),
            layers: image.layers.iter().map(|l| l.chain_id.clone()).collect(),
            created_at: now_nanos(),
            log_path,
            cgroup,
            stop_signal: container::parse_signal(&image.config.stop_signal)
                .unwrap_or(libc::SIGTERM),
            uid: user.uid,
            gid: user.gid,
            groups: user.groups,
            config,
        };
        let exe = self.exe.clone();
        let bundle = paths.bundle.clone();
        tokio::task::spawn_blocking(move || monitor::launch(&exe, &bundle))
            .await
            .map_err(|e| RuntimeError::Io {
                what: "monitor launch".to_string(),
                source: std::io::Error::other(e),
            })??;
        self.adopt_monitor(&paths.bundle)?;
        if self.systemd.is_some() {
            let init_pid = monitor::read_status(&paths.bundle)?.init_pid;
            tokio::task::block_in_place(|| {
                self.start_scope(&record.cgroup, id, init_pid, &record.config.resources)
            })?;
        }
        // The record commits the creation: a bundle without one is half-made
        // and recovery rolls it back.
        store::write_json(&paths.record(), &record, Durability::Crash)?;
        Ok(record)
    }

    /// The seccomp profile of a container: none when privileged or unconfined.
    fn seccomp_profile(
        &self,
        config: &ContainerConfig,
    ) -> Result<Option<oci_spec::runtime::LinuxSeccomp>, RuntimeError> {
        if config.privileged {
            return Ok(None);
        }
        match &config.seccomp {
            container::SeccompChoice::Unconfined => Ok(None),
            container::SeccompChoice::RuntimeDefault => {
                Ok(Some(seccomp::default_profile(&spec::capabilities(config))))
            }
            container::SeccompChoice::Localhost(path) => seccomp::load_localhost(Path::new(path))
                .map(Some)
                .map_err(|e| RuntimeError::InvalidArgument(e.to_string())),
        }
    }

    /// The cgroup path of a new pod and whether berth made it: under the
    /// configured parent, or kubelet's `cgroup_parent` (a slice under the
    /// systemd driver, expanded to its path).
    fn pod_cgroup(&self, id: &str, cgroup_parent: &str) -> Result<(String, bool), RuntimeError> {
        let given = cgroup_parent.trim_matches('/');
        let invalid = |e: systemd::SystemdError| RuntimeError::InvalidArgument(e.to_string());
        Ok(match (&self.systemd, given.is_empty()) {
            (None, true) => (format!("{}/{id}", self.config.cgroup.parent), true),
            (None, false) => (given.to_string(), false),
            (Some(_), true) => {
                let slice = systemd::pod_slice(&self.config.cgroup.parent, id).map_err(invalid)?;
                (systemd::expand_slice(&slice).map_err(invalid)?, true)
            }
            (Some(_), false) => (systemd::expand_slice(given).map_err(invalid)?, false),
        })
    }

    /// The cgroup of a container (or of a pod's infra) in its pod's cgroup:
    /// a scope named after it under systemd, a directory named by its id
    /// under cgroupfs.
    fn container_cgroup(&self, pod_cgroup: &str, id: &str) -> String {
        match self.systemd {
            Some(_) => systemd::scope_path(pod_cgroup, id),
            None => format!("{pod_cgroup}/{id}"),
        }
    }

    /// The pod id of a cgroup directory under the configured parent; none
    /// for a directory berth did not make.
    fn pod_of_cgroup<'a>(&self, name: &'a str) -> Option<&'a str> {
        match self.systemd {
            Some(_) => systemd::pod_of_slice(&self.config.cgroup.parent, name),
            None => Some(name),
        }
    }

    /// The container id of a cgroup directory in a pod's cgroup; none for
    /// a directory berth did not make.
    fn container_of_cgroup<'a>(&self, name: &'a str) -> Option<&'a str> {
        match self.systemd {
            Some(_) => systemd::id_of_scope(name),
            None => Some(name),
        }
    }

    /// The cgroup path of the configured parent: a slice's expansion under
    /// systemd (validated with the config), the path as given under cgroupfs.
    pub fn parent_cgroup(&self) -> String {
        match self.systemd {
            Some(_) => systemd::expand_slice(&self.config.cgroup.parent)
                .unwrap_or_else(|_| self.config.cgroup.parent.clone()),
            None => self.config.cgroup.parent.clone(),
        }
    }

    /// Under systemd, hands the process berth put into `cgroup` to systemd
    /// as that cgroup's transient scope, as runc does once the container's
    /// init exists (a scope cannot start empty). systemd adopts the
    /// directory berth made; the limits berth wrote are passed as unit
    /// properties too, so systemd re-applying them keeps the same values.
    fn start_scope(
        &self,
        cgroup: &str,
        id: &str,
        pid: i32,
        resources: &Resources,
    ) -> Result<(), RuntimeError> {
        let Some(sd) = &self.systemd else {
            return Ok(());
        };
        let pid = u32::try_from(pid).map_err(|_| {
            RuntimeError::FailedPrecondition(format!("no process for the scope of {id}"))
        })?;
        let slice = cgroup
            .rsplit_once('/')
            .map(|(parent, _)| systemd::unit_of(parent))
            .unwrap_or("-.slice");
        let scope = systemd::scope_name(id);
        let props = systemd::scope_properties(slice, id, pid, self.cgroups.version, resources);
        sd.start(&scope, &props)?;
        tracing::debug!(container = %id, scope, slice, pid, "scope started");
        Ok(())
    }

    /// Moves a new monitor out of berthd's cgroup into berth's monitors
    /// cgroup, so stopping berthd's service does not stop containers.
    fn adopt_monitor(&self, bundle: &Path) -> Result<(), RuntimeError> {
        let status = monitor::read_status(bundle)?;
        let rel = format!("{}/monitors", self.parent_cgroup());
        self.cgroups.create(&rel)?;
        for procs in self.cgroups.procs_files(&rel)? {
            std::fs::write(&procs, status.monitor_pid.to_string())
                .map_err(io(format!("move the monitor into {}", procs.display())))?;
        }
        Ok(())
    }

    /// Removes whatever a failed or removed container left: rootfs mount,
    /// writable layer, bundle, cgroup.
    fn discard_container(&self, id: &str, pod_cgroup: &str, paths: &ContainerPaths) {
        rootfs::unmount(&paths.rootfs());
        for dir in [&paths.layer, &paths.bundle] {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(container = %id, dir = %dir.display(), error = %e, "cannot remove");
            }
        }
        // A scope whose processes are gone is stopped and collected by
        // systemd itself; berth only makes sure they are gone.
        let cgroup = self.container_cgroup(pod_cgroup, id);
        self.cgroups.kill_all(&cgroup);
        if let Err(e) = self.cgroups.remove(&cgroup) {
            tracing::warn!(container = %id, error = %e, "cannot remove the container's cgroup");
        }
    }

    /// Follows a container's monitor until it exits: the monitor closes its
    /// connection only after recording the exit, so EOF means "read the status".
    async fn watch_container(self: Arc<Self>, id: String) {
        let bundle = self.container_paths(&id).bundle;
        if let Ok(conn) = MonitorConnection::connect(&bundle).await {
            conn.wait_closed().await;
        }
        let status = monitor::read_status(&bundle)
            .ok()
            .filter(|s| state_of(s) == ContainerState::Exited)
            .unwrap_or_else(|| {
                if let Some(cg) = self
                    .tables()
                    .containers
                    .get(&id)
                    .map(|e| e.record.cgroup.clone())
                {
                    self.cgroups.kill_all(&cg);
                }
                lost_status("the container's monitor died before recording an exit")
            });
        tracing::info!(container = %id, exit_code = status.exit_code, reason = %status.reason, "container exited");
        let pod_id = self.tables().containers.get(&id).map(|entry| {
            entry.status.send_replace(status);
            entry.record.pod_id.clone()
        });
        if let Some(pod_id) = pod_id {
            self.emit(&id, &pod_id, EventKind::Stopped);
        }
    }

    fn entry(
        &self,
        given: &str,
    ) -> Result<(String, ContainerView, watch::Receiver<MonitorStatus>), RuntimeError> {
        let id = self
            .resolve_container(given)?
            .ok_or_else(|| RuntimeError::NotFound(format!("container {given:?} not found")))?;
        let t = self.tables();
        let entry = t
            .containers
            .get(&id)
            .ok_or_else(|| RuntimeError::NotFound(format!("container {given:?} not found")))?;
        let view = ContainerView {
            record: entry.record.clone(),
            status: entry.status.borrow().clone(),
        };
        Ok((id, view, entry.status.subscribe()))
    }

    pub async fn start_container(&self, given: &str) -> Result<(), RuntimeError> {
        let (id, view, mut rx) = self.entry(given)?;
        if view.state() != ContainerState::Created {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is {:?}, not created",
                view.state()
            )));
        }
        let bundle = self.container_paths(&id).bundle;
        let mut conn = MonitorConnection::connect(&bundle).await?;
        match conn.start().await {
            Ok(status) => {
                if let Some(entry) = self.tables().containers.get(&id)
                    && state_of(&entry.status.borrow()) == ContainerState::Created
                {
                    entry.status.send_replace(status);
                }
                self.emit(&id, &view.record.pod_id, EventKind::Started);
                tracing::info!(container = %id, "container started");
                Ok(())
            }
            Err(e) => {
                // The monitor records StartError and exits; wait for that record.
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    rx.wait_for(|s| state_of(s) == ContainerState::Exited),
                )
                .await;
                Err(RuntimeError::FailedPrecondition(format!(
                    "cannot start container {id}: {e}"
                )))
            }
        }
    }

    /// Signals the container and waits for its exit; after `timeout` (or at
    /// once, for zero) every process of it is killed.
    async fn kill_and_wait(&self, given: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let (id, view, mut rx) = self.entry(given)?;
        if !matches!(
            view.state(),
            ContainerState::Running | ContainerState::Created
        ) {
            return Ok(());
        }
        let bundle = self.container_paths(&id).bundle;
        let exited = |s: &MonitorStatus| state_of(s) == ContainerState::Exited;
        if !timeout.is_zero() {
            if let Ok(mut conn) = MonitorConnection::connect(&bundle).await {
                let _ = conn.kill(view.record.stop_signal, false).await;
            }
            if tokio::time::timeout(timeout, rx.wait_for(exited))
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        if let Ok(mut conn) = MonitorConnection::connect(&bundle).await {
            let _ = conn.kill(libc::SIGKILL, true).await;
        }
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(exited))
            .await
            .map_err(|_| {
                RuntimeError::DeadlineExceeded(format!("container {id} did not exit after SIGKILL"))
            })?
            .map_err(|_| RuntimeError::NotFound(format!("container {id} was removed")))?;
        Ok(())
    }

    /// Stops the container (stop signal, then SIGKILL after `timeout`); repeatable.
    pub async fn stop_container(&self, given: &str, timeout: Duration) -> Result<(), RuntimeError> {
        if self.resolve_container(given)?.is_none() {
            return Ok(());
        }
        self.kill_and_wait(given, timeout).await
    }

    /// Removes the container, killing it first if it runs; repeatable.
    pub async fn remove_container(&self, given: &str) -> Result<(), RuntimeError> {
        let Some(id) = self.resolve_container(given)? else {
            return Ok(());
        };
        self.kill_and_wait(&id, Duration::ZERO).await?;
        let Some(entry) = self.tables().containers.remove(&id) else {
            return Ok(());
        };
        let pod_cgroup = entry
            .record
            .cgroup
            .rsplit_once('/')
            .map(|(p, _)| p.to_string())
            .unwrap_or_default();
        // Unmounting and deleting the writable layer block: off the async workers.
        tokio::task::block_in_place(|| {
            self.discard_container(&id, &pod_cgroup, &self.container_paths(&id))
        });
        self.tables()
            .container_names
            .remove(&container_name_key(&entry.record));
        self.cpu.forget(&entry.record.cgroup);
        self.images.release(&id);
        self.emit(&id, &entry.record.pod_id, EventKind::Deleted);
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    pub fn container(&self, given: &str) -> Result<ContainerView, RuntimeError> {
        Ok(self.entry(given)?.1)
    }

    pub fn list_containers(&self, filter: &ContainerFilter) -> Vec<ContainerView> {
        self.tables()
            .containers
            .values()
            .map(|e| ContainerView {
                record: e.record.clone(),
                status: e.status.borrow().clone(),
            })
            .filter(|c| filter.id.is_empty() || c.record.id.starts_with(&filter.id))
            .filter(|c| filter.pod_id.is_empty() || c.record.pod_id.starts_with(&filter.pod_id))
            .filter(|c| filter.state.is_none_or(|s| s == c.state()))
            .filter(|c| labels_match(&c.record.config.labels, &filter.labels))
            .collect()
    }

    /// Changes a container's limits in its cgroup and its record.
    pub fn update_resources(
        &self,
        given: &str,
        r: resources::Resources,
    ) -> Result<(), RuntimeError> {
        let (id, view, _) = self.entry(given)?;
        if view.state() == ContainerState::Exited {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} has exited"
            )));
        }
        resources::apply(&self.cgroups, &view.record.cgroup, &r)?;
        let mut record = view.record;
        record.config.resources = r;
        store::write_json(
            &self.container_paths(&id).record(),
            &record,
            Durability::Crash,
        )?;
        if let Some(entry) = self.tables().containers.get_mut(&id) {
            entry.record = record;
        }
        Ok(())
    }

    pub async fn reopen_log(&self, given: &str) -> Result<(), RuntimeError> {
        let (id, view, _) = self.entry(given)?;
        if view.state() != ContainerState::Running {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let mut conn = MonitorConnection::connect(&self.container_paths(&id).bundle).await?;
        conn.reopen_log().await?;
        Ok(())
    }

    /// Runs a command in the container and collects its output.
    pub async fn exec_sync(
        &self,
        given: &str,
        args: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<monitor::ExecOutput, RuntimeError> {
        let (id, view, _) = self.entry(given)?;
        if view.state() != ContainerState::Running {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        if args.is_empty() {
            return Err(RuntimeError::InvalidArgument(
                "no command to exec".to_string(),
            ));
        }
        let bundle = self.container_paths(&id).bundle;
        match monitor::exec_sync(&self.exe, &bundle, view.status.init_pid, &args, timeout).await {
            Err(MonitorError::Timeout(t)) => Err(RuntimeError::DeadlineExceeded(format!(
                "command timed out after {t:?} in container {id}"
            ))),
            other => Ok(other?),
        }
    }
}

impl Runtime {
    pub fn container_usage(&self, c: &ContainerView) -> ContainerUsage {
        let now = now_nanos();
        let layer_dir = self.container_paths(&c.record.id).layer.join("upper");
        ContainerUsage {
            cpu: self.cpu.sample(&self.cgroups, &c.record.cgroup, now),
            memory: stats::memory(&self.cgroups, &c.record.cgroup),
            layer: stats::layer(&layer_dir),
            layer_dir,
        }
    }

    pub fn pod_usage(&self, pod: &PodRecord) -> PodUsage {
        let pin = self.pod_paths(&pod.id).ns.join("net");
        PodUsage {
            cpu: self.cpu.sample(&self.cgroups, &pod.cgroup, now_nanos()),
            memory: stats::memory(&self.cgroups, &pod.cgroup),
            interfaces: if pod.state == PodState::Ready
                && pod.config.namespaces.network != NamespaceMode::Node
            {
                stats::network(&pin).unwrap_or_default()
            } else {
                Vec::new()
            },
        }
    }
}

/// A bind mount's host path as the kernel will see it: symlinks resolved, and
/// created as a directory when missing, as containerd does.
fn host_path(given: &str) -> Result<String, RuntimeError> {
    let path = Path::new(given);
    if !path.is_absolute() {
        return Err(RuntimeError::InvalidArgument(format!(
            "mount host path {given:?} is not absolute"
        )));
    }
    if std::fs::symlink_metadata(path).is_err() {
        std::fs::create_dir_all(path).map_err(io(format!("create mount source {given}")))?;
    }
    let real = std::fs::canonicalize(path).map_err(io(format!("resolve mount source {given}")))?;
    Ok(real.display().to_string())
}

/// The hidden `berthd pod-infra` mode.
pub fn run_pod_infra(root: Option<&Path>) -> i32 {
    infra::run(root)
}

fn container_name_key(record: &ContainerRecord) -> String {
    format!(
        "{}_{}_{}",
        record.config.name, record.pod_id, record.config.attempt
    )
}

/// The namespaces a pod owns (and pins): the ones not shared with the node.
fn pod_namespace_kinds(config: &PodConfig) -> Vec<NamespaceKind> {
    let mut kinds = Vec::new();
    if config.namespaces.network != NamespaceMode::Node {
        kinds.push(NamespaceKind::Net);
        kinds.push(NamespaceKind::Uts);
    }
    if config.namespaces.ipc != NamespaceMode::Node {
        kinds.push(NamespaceKind::Ipc);
    }
    kinds
}

/// What an attach needs to know of the container it joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachInfo {
    /// The container runs on a terminal: all its output is stdout.
    pub tty: bool,
    /// The container's stdin closes when the first attached client's ends.
    pub stdin_once: bool,
}

/// Where a pod's port-forward connects: inside its network namespace, or on
/// the host for a pod on the host's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortForwardTarget {
    Netns(PathBuf),
    Host,
}

/// The streaming server's view: exec, attach and port-forward.
impl Runtime {
    /// The container a stream (exec, attach) joins: it must be running.
    pub fn running_container(&self, given: &str) -> Result<ContainerView, RuntimeError> {
        let (id, view, _) = self.entry(given)?;
        if view.state() != ContainerState::Running {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        Ok(view)
    }

    /// Starts `args` in the container with its stdio streamed.
    pub async fn exec_stream(
        &self,
        given: &str,
        args: &[String],
        streams: monitor::ExecStreams,
    ) -> Result<monitor::StreamingExec, RuntimeError> {
        let view = self.running_container(given)?;
        if args.is_empty() {
            return Err(RuntimeError::InvalidArgument(
                "no command to exec".to_string(),
            ));
        }
        let bundle = self.container_paths(&view.record.id).bundle;
        Ok(monitor::exec_stream(&self.exe, &bundle, view.status.init_pid, args, streams).await?)
    }

    /// Joins the container's stdio through its monitor.
    pub async fn attach(
        &self,
        given: &str,
        streams: monitor::AttachStreams,
    ) -> Result<(monitor::AttachOutput, monitor::AttachInput, AttachInfo), RuntimeError> {
        let view = self.running_container(given)?;
        let bundle = self.container_paths(&view.record.id).bundle;
        let conn = MonitorConnection::connect(&bundle).await?;
        let (output, input) = conn.attach(streams).await?;
        let info = AttachInfo {
            tty: view.record.config.tty,
            stdin_once: view.record.config.stdin_once,
        };
        Ok((output, input, info))
    }

    /// Where a port-forward to the pod connects; the pod must be ready.
    pub fn port_forward_target(&self, pod_given: &str) -> Result<PortForwardTarget, RuntimeError> {
        let pod = self.pod(pod_given)?;
        if pod.state != PodState::Ready {
            return Err(RuntimeError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )));
        }
        Ok(if pod.config.namespaces.network == NamespaceMode::Node {
            PortForwardTarget::Host
        } else {
            PortForwardTarget::Netns(self.pod_paths(&pod.id).ns.join("net"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let ids = ["abc123".to_string(), "abd456".to_string()];
        assert_eq!(
            resolve_id(ids.iter(), "abc", "pod").expect("ok"),
            Some("abc123".into())
        );
        assert_eq!(resolve_id(ids.iter(), "x", "pod").expect("ok"), None);
        assert!(resolve_id(ids.iter(), "ab", "pod").is_err(), "ambiguous");
        assert!(resolve_id(ids.iter(), "", "pod").is_err(), "empty");
    }
}
