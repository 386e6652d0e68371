//! Live restore: berthd killed with SIGKILL (or stopped with SIGTERM) while
//! its pods and containers run on under their monitors, then started again.
//!
//! - A fault loop: pod churn (run, create, start, stop, remove) from several
//!   tasks under load, with long-running pods that must survive it, while
//!   berthd is killed at random moments and restarted, 50 times. After every
//!   restart the records berthd reports are checked against the kernel; at
//!   the end everything is removed and nothing of the instance may remain.
//!   The loop is deterministic in its seed (printed; `BERTH_CHURN_SEED`
//!   overrides it) as far as the choices go: when to kill, how long berthd
//!   stays down, what each churn task does. The interleaving of the tasks
//!   is the machine's.
//! - A monitor killed with SIGKILL: its container is reported exited with a
//!   reason, its processes do not run on, and nothing leaks.
//! - The story a user would try with crictl and curl: a host port that keeps
//!   answering while berthd is down, output and an exit that happen while
//!   it is down and are found after the restart.
//! - The time a restarted berthd with 100 running containers takes to
//!   answer: printed, not asserted (a test asserts no timing); all 100 must
//!   be found running.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::cni::bridge::host_veth_name;
use common::berthd::{Berthd, BerthdOptions};
use common::cri_pod::{self, CriNode, Rt, run_container, run_pod, status_pid};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Endpoint, Uri};
use tonic::{Code, Status};

/// A container that writes a line every 0.2 s until it is stopped; it exits
/// on SIGTERM even as the PID 1 of its own namespace (which has no default
/// action for it).
const TICKER: &[&str] = &[
    "sh",
    "-c",
    "trap 'exit 143' TERM; i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.2; done",
];

// ---------------------------------------------------------------------------
// Shared helpers: a node with busybox pulled, configs, CRI calls, /proc.
// ---------------------------------------------------------------------------

/// A pod labelled `pod=<name>`; `ports` are (container port, host port) over TCP.
fn pod_config(logs: &Path, name: &str, ports: &[(i32, i32)]) -> PodSandboxConfig {
    let ports = ports
        .iter()
        .map(|&(container_port, host_port)| PortMapping {
            protocol: Protocol::Tcp as i32,
            container_port,
            host_port,
            host_ip: String::new(),
        })
        .collect();
    PodSandboxConfig {
        labels: HashMap::from([("pod".to_string(), name.to_string())]),
        ..cri_pod::pod_config("live-restore", name, logs, ports)
    }
}

/// Kubelet's choice for a pod without `shareProcessNamespace`: each
/// container has its own PID namespace (the CRI default is one per pod).
fn own_pid_namespaces(mut config: PodSandboxConfig) -> PodSandboxConfig {
    config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption {
                pid: NamespaceMode::Container as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// A container labelled `container=<name>`, logging to `<name>.log`.
fn container_config(image: &str, name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..cri_pod::container_config(image, name, command)
    }
}

/// A CRI client on `socket`, or why not (the harness's `connect` panics).
async fn try_connect(socket: &Path) -> Result<Rt, String> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| e.to_string())?;
    Ok(RuntimeServiceClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}

fn state_name(state: i32) -> &'static str {
    ContainerState::try_from(state).map_or("?", |s| s.as_str_name())
}

async fn remove_all_pods(rt: &mut Rt) {
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    for pod in pods {
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("StopPodSandbox");
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    }
}

/// One process as /proc shows it.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    comm: String,
    cmdline: String,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        out.push(Proc {
            pid,
            comm: comm.trim().to_string(),
            cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
        });
    }
    out
}

/// Whether `pid` runs: it exists and is no zombie.
fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last parenthesis.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// The parent of `pid`, 0 if unknown.
fn parent_of(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(") ")?;
            rest.split(' ').nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Monitors (and monitor launchers) of this instance: (pid, container id,
/// comm). A container's init that has not exec'd yet is a fork of its
/// monitor and looks like one; it is left out.
fn monitors_of(state_dir: &Path) -> Vec<(i32, String, String)> {
    let needle = format!(" monitor --bundle {}/containers/", state_dir.display());
    let found: Vec<(i32, String, String)> = processes()
        .into_iter()
        .filter(|p| alive(p.pid))
        .filter_map(|p| {
            let at = p.cmdline.find(&needle)?;
            let id: String = p.cmdline[at + needle.len()..]
                .chars()
                .take_while(|c| *c != '/' && *c != ' ')
                .collect();
            Some((p.pid, id, p.comm))
        })
        .collect();
    found
        .iter()
        .filter(|(pid, id, comm)| {
            let parent = parent_of(*pid);
            !(comm == "berth-monitor"
                && found
                    .iter()
                    .any(|(p, i, c)| *p == parent && i == id && c == "berth-monitor"))
        })
        .cloned()
        .collect()
}

fn monitor_pid(state_dir: &Path, id: &str) -> Option<i32> {
    monitors_of(state_dir)
        .into_iter()
        .find(|(_, c, comm)| c == id && comm == "berth-monitor")
        .map(|(pid, _, _)| pid)
}

fn mount_points() -> BTreeSet<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .collect()
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The cgroup controller hierarchies (v1) or the one unified tree (v2),
/// without the symlinks v1 keeps for combined controllers.
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect()
}

fn sub_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The cgroup under the instance's cgroup parent that holds the monitors.
const MONITORS_CGROUP: &str = "monitors";

/// Whether `pid` is in the monitors cgroup of the instance with `cgroup_parent`.
fn in_monitors_cgroup(pid: i32, cgroup_parent: &str) -> bool {
    let needle = format!("/{cgroup_parent}/{MONITORS_CGROUP}");
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.ends_with(&needle))
}

fn cgroup_procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// What the host holds of one instance, read from the kernel and the disk.
#[derive(Debug, Default)]
struct HostView {
    /// Container id -> (pid, comm) of the monitors and launchers.
    monitors: BTreeMap<String, Vec<(i32, String)>>,
    mounts: Vec<PathBuf>,
    /// Ports of the instance's bridge.
    bridge_ports: BTreeSet<String>,
    /// Pod ids with a network record (`<state>/network/pods/<id>.json`).
    net_records: BTreeSet<String>,
    /// IPAM claims: (address, owning pod id).
    ipam: Vec<(String, String)>,
    pins: BTreeSet<String>,
    pod_dirs: BTreeSet<String>,
    bundles: BTreeSet<String>,
    layers: BTreeSet<String>,
    /// Pod cgroup -> its container cgroups -> processes in them.
    cgroups: BTreeMap<String, BTreeMap<String, Vec<i32>>>,
    /// Processes in a pod's own cgroup (the pod's infra process).
    pod_procs: BTreeMap<String, BTreeSet<i32>>,
    /// Processes in `<cgroup parent>/monitors`, where berthd puts monitors.
    monitors_cgroup: BTreeSet<i32>,
}

impl HostView {
    fn read(berthd: &Berthd) -> HostView {
        let state = &berthd.state_dir;
        let mut view = HostView::default();
        for (pid, id, comm) in monitors_of(state) {
            view.monitors.entry(id).or_default().push((pid, comm));
        }
        view.mounts = mount_points()
            .into_iter()
            .filter(|p| p.starts_with(state) || p.starts_with(&berthd.root))
            .collect();
        view.bridge_ports = dir_names(
            &Path::new("/sys/class/net")
                .join(&berthd.names.bridge)
                .join("brif"),
        );
        let network = state.join("network");
        view.net_records = dir_names(&network.join("pods"))
            .into_iter()
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .collect();
        for subnet in sub_dirs(&network.join("ipam")) {
            let dir = network.join("ipam").join(subnet);
            for name in dir_names(&dir) {
                if name == "last" || name.starts_with('.') {
                    continue;
                }
                let owner = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
                view.ipam.push((name, owner.trim().to_string()));
            }
        }
        view.pins = dir_names(&state.join("ns"));
        view.pod_dirs = dir_names(&state.join("pods"));
        view.bundles = dir_names(&state.join("containers"));
        view.layers = dir_names(&berthd.root.join("containers"));
        for root in cgroup_roots() {
            let parent = root.join(&berthd.names.cgroup_parent);
            view.monitors_cgroup
                .extend(cgroup_procs(&parent.join(MONITORS_CGROUP)));
            for pod in sub_dirs(&parent) {
                if pod == MONITORS_CGROUP {
                    continue;
                }
                view.pod_procs
                    .entry(pod.clone())
                    .or_default()
                    .extend(cgroup_procs(&parent.join(&pod)));
                let containers = view.cgroups.entry(pod.clone()).or_default();
                for c in sub_dirs(&parent.join(&pod)) {
                    containers
                        .entry(c.clone())
                        .or_default()
                        .extend(cgroup_procs(&parent.join(&pod).join(&c)));
                }
            }
        }
        view
    }
}

/// What berthd reports: pods, and containers with their status and init pid.
struct CriView {
    pods: Vec<PodSandbox>,
    /// Ids of the pods with a PID namespace of their own (and an infra process).
    pod_pid_namespaces: BTreeSet<String>,
    containers: Vec<(Container, ContainerStatus, i32)>,
}

async fn cri_view(rt: &mut Rt) -> Result<CriView, String> {
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .map_err(|s| format!("ListPodSandbox: {s:?}"))?
        .into_inner()
        .items;
    let listed = rt
        .list_containers(ListContainersRequest::default())
        .await
        .map_err(|s| format!("ListContainers: {s:?}"))?
        .into_inner()
        .containers;
    let mut pod_pid_namespaces = BTreeSet::new();
    for pod in &pods {
        let status = rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.id.clone(),
                verbose: false,
            })
            .await
            .map_err(|s| format!("PodSandboxStatus {}: {s:?}", pod.id))?
            .into_inner()
            .status;
        let pid_mode = status
            .and_then(|s| s.linux)
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options)
            .map(|o| o.pid);
        if pid_mode == Some(NamespaceMode::Pod as i32) {
            pod_pid_namespaces.insert(pod.id.clone());
        }
    }
    let mut containers = Vec::new();
    for c in listed {
        let (status, pid) = status_pid(rt, &c.id)
            .await
            .map_err(|s| format!("ContainerStatus {}: {s:?}", c.id))?;
        containers.push((c, status, pid));
    }
    Ok(CriView {
        pods,
        pod_pid_namespaces,
        containers,
    })
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Every way the records berthd reports and the kernel can disagree.
fn disagreements(berthd: &Berthd, cri: &CriView, host: &HostView) -> Vec<String> {
    let mut f = Vec::new();
    let state = &berthd.state_dir;
    let pods: BTreeMap<&str, &PodSandbox> = cri.pods.iter().map(|p| (p.id.as_str(), p)).collect();
    let ready = |id: &str| {
        pods.get(id)
            .is_some_and(|p| p.state == PodSandboxState::SandboxReady as i32)
    };
    let ready_veths: BTreeMap<String, &str> = cri
        .pods
        .iter()
        .filter(|p| ready(&p.id))
        .map(|p| (host_veth_name(&p.id), p.id.as_str()))
        .collect();
    for pod in &cri.pods {
        let id = short(&pod.id);
        if ready(&pod.id) {
            if !host
                .mounts
                .contains(&state.join("ns").join(&pod.id).join("net"))
            {
                f.push(format!("ready pod {id} has no pinned network namespace"));
            }
            let veth = host_veth_name(&pod.id);
            if !host.bridge_ports.contains(&veth) {
                let link = Path::new("/sys/class/net").join(&veth);
                let master = std::fs::read_link(link.join("master"))
                    .map(|m| m.display().to_string())
                    .unwrap_or_else(|_| "none".to_string());
                f.push(if link.exists() {
                    format!("ready pod {id}: its veth {veth} is off the bridge (master {master})")
                } else {
                    format!("ready pod {id} has no veth ({veth} is gone)")
                });
            }
            if !host.net_records.contains(&pod.id) {
                f.push(format!("ready pod {id} has no network record"));
            }
            if !host.cgroups.contains_key(&pod.id) {
                f.push(format!("ready pod {id} has no cgroup"));
            }
            let infra = host.pod_procs.get(&pod.id);
            if cri.pod_pid_namespaces.contains(&pod.id)
                && !infra.is_some_and(|p| p.iter().any(|pid| alive(*pid)))
            {
                f.push(format!(
                    "ready pod {id} shares a PID namespace but has no infra process"
                ));
            }
        } else {
            if host.bridge_ports.contains(&host_veth_name(&pod.id)) {
                f.push(format!("stopped pod {id} still has its veth"));
            }
            if host.net_records.contains(&pod.id) {
                f.push(format!("stopped pod {id} still has a network record"));
            }
            if let Some(procs) = host.pod_procs.get(&pod.id).filter(|p| !p.is_empty()) {
                f.push(format!("stopped pod {id} still has processes {procs:?}"));
            }
        }
    }
    for pin in &host.pins {
        if !pods.contains_key(pin.as_str()) {
            f.push(format!("namespace pins of unknown pod {}", short(pin)));
        }
    }
    for dir in &host.pod_dirs {
        if !pods.contains_key(dir.as_str()) {
            f.push(format!("pod directory of unknown pod {}", short(dir)));
        }
    }
    for rec in &host.net_records {
        if !ready(rec) {
            f.push(format!("network record of a pod not ready: {}", short(rec)));
        }
    }
    for (ip, owner) in &host.ipam {
        if !ready(owner) {
            f.push(format!(
                "address {ip} held by a pod not ready: {}",
                short(owner)
            ));
        }
    }
    for port in &host.bridge_ports {
        if !ready_veths.contains_key(port) {
            f.push(format!("bridge port {port} of no ready pod"));
        }
    }

    let containers: BTreeMap<&str, &(Container, ContainerStatus, i32)> = cri
        .containers
        .iter()
        .map(|c| (c.0.id.as_str(), c))
        .collect();
    for (c, status, pid) in &cri.containers {
        let id = short(&c.id);
        let monitors = host.monitors.get(&c.id).map(Vec::as_slice).unwrap_or(&[]);
        let cgroup_procs = host
            .cgroups
            .get(&c.pod_sandbox_id)
            .and_then(|p| p.get(&c.id));
        match ContainerState::try_from(status.state) {
            Ok(ContainerState::ContainerRunning) => {
                if !alive(*pid) {
                    f.push(format!("running container {id}: its process {pid} is gone"));
                } else {
                    let cg =
                        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                    if !cg.contains(&c.id) {
                        f.push(format!(
                            "running container {id}: process {pid} is not in its cgroup"
                        ));
                    }
                }
                if monitors.is_empty() {
                    f.push(format!("running container {id} has no monitor"));
                }
            }
            Ok(ContainerState::ContainerCreated) => {
                if monitors.is_empty() {
                    f.push(format!("created container {id} has no monitor"));
                }
            }
            _ => {
                if !monitors.is_empty() {
                    f.push(format!(
                        "{} container {id} ({}: {}) still has monitor {monitors:?}",
                        state_name(status.state),
                        status.reason,
                        status.message
                    ));
                }
                if let Some(procs) = cgroup_procs.filter(|p| !p.is_empty()) {
                    f.push(format!(
                        "{} container {id} still has processes {procs:?} in its cgroup",
                        state_name(status.state)
                    ));
                }
            }
        }
        if monitors.len() > 1 {
            f.push(format!("container {id} has several monitors: {monitors:?}"));
        }
        for (pid, comm) in monitors {
            if comm == "berth-monitor" && !in_monitors_cgroup(*pid, &berthd.names.cgroup_parent) {
                f.push(format!(
                    "monitor {pid} of container {id} is not in the monitors cgroup"
                ));
            }
        }
    }
    let monitor_pids: BTreeSet<i32> = host
        .monitors
        .values()
        .flatten()
        .map(|(pid, _)| *pid)
        .collect();
    for pid in &host.monitors_cgroup {
        if !monitor_pids.contains(pid) && alive(*pid) {
            f.push(format!(
                "process {pid} in the monitors cgroup is no monitor"
            ));
        }
    }
    for (id, monitors) in &host.monitors {
        if !containers.contains_key(id.as_str()) {
            f.push(format!(
                "monitor {monitors:?} of unknown container {}",
                short(id)
            ));
        }
    }
    for dir in &host.bundles {
        if !containers.contains_key(dir.as_str()) {
            f.push(format!("bundle of unknown container {}", short(dir)));
        }
    }
    for dir in &host.layers {
        if !containers.contains_key(dir.as_str()) {
            f.push(format!(
                "writable layer of unknown container {}",
                short(dir)
            ));
        }
    }
    for (pod, cgroups) in &host.cgroups {
        if !pods.contains_key(pod.as_str()) {
            let procs = host.pod_procs.get(pod).cloned().unwrap_or_default();
            f.push(format!(
                "cgroup of unknown pod {} (processes {procs:?})",
                short(pod)
            ));
        }
        for (c, procs) in cgroups {
            if !containers.contains_key(c.as_str()) {
                f.push(format!(
                    "cgroup of unknown container {} (processes {procs:?})",
                    short(c)
                ));
            }
        }
    }
    for mount in &host.mounts {
        let rel = mount
            .strip_prefix(state)
            .ok()
            .map(|r| r.iter().map(|c| c.to_string_lossy()).collect::<Vec<_>>());
        let known = match rel.as_deref() {
            Some([kind, id, ..]) if kind == "ns" || kind == "pods" => {
                pods.contains_key(id.as_ref())
            }
            Some([kind, id, ..]) if kind == "containers" => containers.contains_key(id.as_ref()),
            _ => false,
        };
        if !known {
            f.push(format!(
                "mount {} of nothing berthd reports",
                mount.display()
            ));
        }
    }
    f
}

// ---------------------------------------------------------------------------
// The churn loop.
// ---------------------------------------------------------------------------

/// splitmix64: small, and the same sequence for a seed everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

const DEFAULT_SEED: u64 = 0x6265_7274_682d_6c72;
const KILLS: usize = 50;
const CHURN_TASKS: usize = 3;
const KEEPERS: usize = 2;

fn churn_seed() -> u64 {
    let Ok(text) = std::env::var("BERTH_CHURN_SEED") else {
        return DEFAULT_SEED;
    };
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|e| panic!("BERTH_CHURN_SEED={text:?}: {e}"))
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    mutating: AtomicU64,
    /// Mutating calls berthd answered (with success or an error status).
    answered: AtomicU64,
    /// Calls cut by a kill and sent again after the restart.
    cut: AtomicU64,
    /// AlreadyExists or FailedPrecondition after a cut call, resolved by
    /// finding that the first attempt had landed.
    landed: AtomicU64,
    pods_run: AtomicU64,
    pods_removed: AtomicU64,
    containers_created: AtomicU64,
    containers_started: AtomicU64,
    containers_stopped: AtomicU64,
    containers_removed: AtomicU64,
    execs: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, SeqCst);
}

struct Shared {
    socket: PathBuf,
    image: String,
    logs: PathBuf,
    /// Calls hold it shared; the killer holds it alone from just after a
    /// kill until the restarted berthd has been checked.
    gate: tokio::sync::RwLock<()>,
    /// Bumped at every restart; a call made in an older one may have been cut.
    generation: AtomicU64,
    /// Set from just before a kill until the restart is checked.
    killing: AtomicBool,
    stop: AtomicBool,
    n: Counters,
    findings: Mutex<Vec<String>>,
    /// Every pod id a churn task or the test learnt of.
    pod_ids: Mutex<BTreeSet<String>>,
    keepers: Mutex<Vec<String>>,
}

impl Shared {
    fn finding(&self, text: String) {
        eprintln!("FINDING: {text}");
        self.findings.lock().unwrap().push(text);
    }
}

/// A CRI client of a churn task: it waits out kills and sends a cut call again.
struct Cri {
    shared: Arc<Shared>,
    generation: u64,
    client: Option<Rt>,
    /// Whether the last call was cut by a kill and sent again.
    retried: bool,
}

impl Cri {
    fn new(shared: Arc<Shared>) -> Cri {
        Cri {
            shared,
            generation: u64::MAX,
            client: None,
            retried: false,
        }
    }

    async fn call<T, F, Fut>(&mut self, what: &str, mutating: bool, f: F) -> Result<T, Status>
    where
        F: Fn(Rt) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(90);
        self.retried = false;
        loop {
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "{what}: berthd did not answer for 90 s"
                )));
            }
            let guard = self.shared.gate.read().await;
            let generation = self.shared.generation.load(SeqCst);
            if self.client.is_none() || self.generation != generation {
                match try_connect(&self.shared.socket).await {
                    Ok(client) => {
                        self.client = Some(client);
                        self.generation = generation;
                    }
                    Err(_) => {
                        drop(guard);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
            let client = self.client.clone().expect("connected");
            bump(&self.shared.n.calls);
            if mutating {
                bump(&self.shared.n.mutating);
            }
            let outcome = tokio::time::timeout(Duration::from_secs(60), f(client)).await;
            drop(guard);
            let answered = match &outcome {
                Ok(Ok(_)) => true,
                Ok(Err(status)) => !transport_error(status),
                Err(_) => false,
            };
            if mutating && answered {
                bump(&self.shared.n.answered);
            }
            match outcome {
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "{what}: no answer within 60 s"
                    )));
                }
                Ok(Ok(reply)) => return Ok(reply.into_inner()),
                Ok(Err(status)) => {
                    let transport = transport_error(&status);
                    let killed = self.shared.killing.load(SeqCst)
                        || self.shared.generation.load(SeqCst) != generation;
                    if !(transport && killed) {
                        return Err(status);
                    }
                    bump(&self.shared.n.cut);
                    self.retried = true;
                    self.client = None;
                }
            }
        }
    }
}

/// One CRI call through a [`Cri`]: `rpc!(cri, method, mutating, request)`.
macro_rules! rpc {
    ($cri:expr, $method:ident, $mutating:expr, $req:expr) => {{
        let req = $req;
        $cri.call(stringify!($method), $mutating, move |mut c: Rt| {
            let req = req.clone();
            async move { c.$method(req).await }
        })
        .await
    }};
}

/// What a call cut by a kill ends with (berthd's own errors have other codes).
fn transport_error(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

fn describe(what: &str, status: &Status) -> String {
    format!("{what}: {:?}: {}", status.code(), status.message())
}

/// RunPodSandbox; a cut call that had landed is found by the pod's labels.
async fn run_pod_retrying(cri: &mut Cri, config: &PodSandboxConfig) -> Result<String, String> {
    let name = config.metadata.as_ref().map_or("", |m| m.name.as_str());
    let req = RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    };
    match rpc!(cri, run_pod_sandbox, true, req) {
        Ok(reply) => {
            bump(&cri.shared.n.pods_run);
            Ok(reply.pod_sandbox_id)
        }
        Err(s) if s.code() == Code::AlreadyExists && cri.retried => {
            let req = ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: config.labels.clone(),
                    ..Default::default()
                }),
            };
            let items = rpc!(cri, list_pod_sandbox, false, req)
                .map_err(|s| describe("ListPodSandbox", &s))?
                .items;
            match items.as_slice() {
                [one] => {
                    bump(&cri.shared.n.landed);
                    bump(&cri.shared.n.pods_run);
                    Ok(one.id.clone())
                }
                other => Err(format!(
                    "RunPodSandbox {name} was cut, then AlreadyExists ({}), but {} pods carry its labels",
                    s.message(),
                    other.len()
                )),
            }
        }
        Err(s) => Err(describe(&format!("RunPodSandbox {name}"), &s)),
    }
}

/// CreateContainer; a cut call that had landed is found by the container's labels.
async fn create_retrying(
    cri: &mut Cri,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> Result<String, String> {
    let name = config
        .metadata
        .as_ref()
        .map_or(String::new(), |m| m.name.clone());
    let labels = config.labels.clone();
    let req = CreateContainerRequest {
        pod_sandbox_id: pod.to_string(),
        config: Some(config),
        sandbox_config: Some(pod_config.clone()),
    };
    match rpc!(cri, create_container, true, req) {
        Ok(reply) => {
            bump(&cri.shared.n.containers_created);
            Ok(reply.container_id)
        }
        Err(s) if s.code() == Code::AlreadyExists && cri.retried => {
            let req = ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: pod.to_string(),
                    label_selector: labels,
                    ..Default::default()
                }),
            };
            let items = rpc!(cri, list_containers, false, req)
                .map_err(|s| describe("ListContainers", &s))?
                .containers;
            match items.as_slice() {
                [one] => {
                    bump(&cri.shared.n.landed);
                    bump(&cri.shared.n.containers_created);
                    Ok(one.id.clone())
                }
                other => Err(format!(
                    "CreateContainer {name} in pod {} was cut, then AlreadyExists, but {} containers carry its labels",
                    short(pod),
                    other.len()
                )),
            }
        }
        Err(s) => Err(describe(
            &format!("CreateContainer {name} in pod {}", short(pod)),
            &s,
        )),
    }
}

/// StartContainer; after a cut call the container may already run.
async fn start_retrying(cri: &mut Cri, id: &str) -> Result<(), String> {
    let req = StartContainerRequest {
        container_id: id.to_string(),
    };
    let err = match rpc!(cri, start_container, true, req) {
        Ok(_) => {
            bump(&cri.shared.n.containers_started);
            return Ok(());
        }
        Err(s) => s,
    };
    let retried = cri.retried;
    let req = ContainerStatusRequest {
        container_id: id.to_string(),
        verbose: false,
    };
    let status = rpc!(cri, container_status, false, req)
        .ok()
        .and_then(|r| r.status);
    match status {
        Some(s)
            if retried
                && err.code() == Code::FailedPrecondition
                && s.state == ContainerState::ContainerRunning as i32 =>
        {
            bump(&cri.shared.n.landed);
            bump(&cri.shared.n.containers_started);
            Ok(())
        }
        Some(s) => Err(format!(
            "{} (cut before: {retried}); the container is {} exit {} ({}: {})",
            describe(&format!("StartContainer {}", short(id)), &err),
            state_name(s.state),
            s.exit_code,
            s.reason,
            s.message
        )),
        None => Err(describe(&format!("StartContainer {}", short(id)), &err)),
    }
}

/// One pod's life: run, one or two containers created and started, maybe
/// stopped and removed one by one, then the pod stopped and removed.
async fn churn_pod(
    cri: &mut Cri,
    rng: &mut Rng,
    name: &str,
    ports: &[(i32, i32)],
    pod_id: &mut Option<String>,
) -> Result<(), String> {
    let shared = cri.shared.clone();
    let mut config = pod_config(&shared.logs, name, ports);
    if rng.percent(50) {
        config = own_pid_namespaces(config);
    }
    let pod = run_pod_retrying(cri, &config).await?;
    shared.pod_ids.lock().unwrap().insert(pod.clone());
    *pod_id = Some(pod.clone());
    let mut ids = Vec::new();
    for i in 0..rng.range(1, 2) {
        let cfg = container_config(&shared.image, &format!("c{i}"), TICKER);
        let id = create_retrying(cri, &pod, &config, cfg).await?;
        start_retrying(cri, &id).await?;
        ids.push(id);
    }
    if rng.percent(50) {
        for id in &ids {
            let req = StopContainerRequest {
                container_id: id.clone(),
                timeout: rng.range(0, 2) as i64,
            };
            rpc!(cri, stop_container, true, req)
                .map_err(|s| describe(&format!("StopContainer {}", short(id)), &s))?;
            bump(&shared.n.containers_stopped);
        }
    }
    if rng.percent(50) {
        for id in &ids {
            let req = RemoveContainerRequest {
                container_id: id.clone(),
            };
            rpc!(cri, remove_container, true, req)
                .map_err(|s| describe(&format!("RemoveContainer {}", short(id)), &s))?;
            bump(&shared.n.containers_removed);
        }
    }
    remove_pod_retrying(cri, &pod).await?;
    *pod_id = None;
    Ok(())
}

async fn remove_pod_retrying(cri: &mut Cri, pod: &str) -> Result<(), String> {
    let req = StopPodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    };
    rpc!(cri, stop_pod_sandbox, true, req)
        .map_err(|s| describe(&format!("StopPodSandbox {}", short(pod)), &s))?;
    let req = RemovePodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    };
    rpc!(cri, remove_pod_sandbox, true, req)
        .map_err(|s| describe(&format!("RemovePodSandbox {}", short(pod)), &s))?;
    bump(&cri.shared.n.pods_removed);
    Ok(())
}

async fn churn_task(shared: Arc<Shared>, task: usize, seed: u64, ports: Vec<(i32, i32)>) {
    let mut rng = Rng::new(seed ^ (task as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut cri = Cri::new(shared.clone());
    let mut n = 0;
    while !shared.stop.load(SeqCst) {
        let name = format!("churn-{task}-{n}");
        let mut pod = None;
        if let Err(e) = churn_pod(&mut cri, &mut rng, &name, &ports, &mut pod).await {
            shared.finding(format!("{name}: {e}"));
            if let Some(pod) = pod
                && let Err(e) = remove_pod_retrying(&mut cri, &pod).await
            {
                shared.finding(format!("{name}: cleaning up: {e}"));
            }
        }
        n += 1;
    }
}

/// Load beside the churn: lists, statuses, and execs in the long-running pods.
async fn reader_task(shared: Arc<Shared>, seed: u64) {
    let mut rng = Rng::new(seed ^ 0x5EED_0F4E_AD00);
    let mut cri = Cri::new(shared.clone());
    while !shared.stop.load(SeqCst) {
        match rpc!(
            cri,
            list_containers,
            false,
            ListContainersRequest::default()
        ) {
            Ok(reply) if !reply.containers.is_empty() => {
                let pick = rng.range(0, reply.containers.len() as u64 - 1) as usize;
                let req = ContainerStatusRequest {
                    container_id: reply.containers[pick].id.clone(),
                    verbose: false,
                };
                match rpc!(cri, container_status, false, req) {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => shared.finding(describe("reader: ContainerStatus", &s)),
                }
            }
            Ok(_) => {}
            Err(s) => shared.finding(describe("reader: ListContainers", &s)),
        }
        if let Err(s) = rpc!(
            cri,
            list_pod_sandbox,
            false,
            ListPodSandboxRequest::default()
        ) {
            shared.finding(describe("reader: ListPodSandbox", &s));
        }
        if rng.percent(15) {
            let keepers = shared.keepers.lock().unwrap().clone();
            let id = keepers[rng.range(0, keepers.len() as u64 - 1) as usize].clone();
            let req = ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["cat".into(), "/etc/hostname".into()],
                timeout: 10,
            };
            match rpc!(cri, exec_sync, false, req) {
                Ok(r) if r.exit_code == 0 && r.stdout.starts_with(b"keep-") => {
                    bump(&shared.n.execs)
                }
                Ok(r) => shared.finding(format!(
                    "reader: ExecSync in keeper {}: exit {}, stdout {:?}, stderr {:?}",
                    short(&id),
                    r.exit_code,
                    String::from_utf8_lossy(&r.stdout),
                    String::from_utf8_lossy(&r.stderr)
                )),
                Err(s) => shared.finding(describe("reader: ExecSync", &s)),
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.range(10, 40))).await;
    }
}

struct Keeper {
    id: String,
    pid: i32,
}

/// Checks after a restart: berthd's records against the kernel, the
/// long-running containers untouched, every running container still logging.
struct Auditor {
    keepers: Vec<Keeper>,
    /// Log size of each running container at the last check, and when.
    logs: HashMap<String, (u64, Instant)>,
    /// What earlier checks found, reported once.
    reported: BTreeSet<String>,
}

impl Auditor {
    async fn once(
        &self,
        berthd: &Berthd,
        rt: &mut Rt,
    ) -> (Vec<String>, HashMap<String, (u64, Instant)>) {
        let cri = match cri_view(rt).await {
            Ok(v) => v,
            Err(e) => return (vec![e], self.logs.clone()),
        };
        let host = HostView::read(berthd);
        let mut f = disagreements(berthd, &cri, &host);
        for k in &self.keepers {
            match cri.containers.iter().find(|c| c.0.id == k.id) {
                Some((_, s, pid)) if s.state == ContainerState::ContainerRunning as i32 => {
                    if *pid != k.pid {
                        f.push(format!(
                            "keeper {} runs as pid {pid}, not {}",
                            short(&k.id),
                            k.pid
                        ));
                    }
                }
                Some((_, s, _)) => f.push(format!(
                    "keeper {} is {} ({}: {})",
                    short(&k.id),
                    state_name(s.state),
                    s.reason,
                    s.message
                )),
                None => f.push(format!("keeper {} is not listed", short(&k.id))),
            }
        }
        let now = Instant::now();
        let mut logs = HashMap::new();
        for (c, s, _) in &cri.containers {
            if s.state != ContainerState::ContainerRunning as i32 || s.log_path.is_empty() {
                continue;
            }
            let size = std::fs::metadata(&s.log_path).map_or(0, |m| m.len());
            if let Some((before, at)) = self.logs.get(&c.id)
                && now.duration_since(*at) >= Duration::from_secs(1)
                && size <= *before
            {
                f.push(format!(
                    "running container {} wrote nothing to its log in {:?}",
                    short(&c.id),
                    now.duration_since(*at)
                ));
            }
            let sample = match self.logs.get(&c.id) {
                Some(&(before, at)) if size <= before => (before, at),
                _ => (size, now),
            };
            logs.insert(c.id.clone(), sample);
        }
        (f, logs)
    }

    /// Checks until all agrees, or nothing but what an earlier check
    /// reported disagrees, or `settle` has passed (a monitor may be a moment
    /// from its exit); returns what disagrees that was not reported before.
    async fn check(&mut self, berthd: &Berthd, settle: Duration) -> Vec<String> {
        let deadline = Instant::now() + settle;
        let mut rt = match try_connect(&berthd.socket).await {
            Ok(rt) => rt,
            Err(e) => return vec![format!("cannot connect to the restarted berthd: {e}")],
        };
        loop {
            let (findings, logs) = self.once(berthd, &mut rt).await;
            let new: Vec<String> = findings
                .into_iter()
                .filter(|f| !self.reported.contains(f))
                .collect();
            if new.is_empty() || Instant::now() >= deadline {
                self.logs = logs;
                self.reported.extend(new.iter().cloned());
                return new;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How a kill moment is chosen.
#[derive(Debug)]
enum KillAt {
    /// After this many more mutating CRI calls were answered, then a few ms
    /// more (into the calls that follow). Counting answers, not attempts,
    /// lets the churn make progress however often calls are cut.
    Calls { calls: u64, then_ms: u64 },
    /// This long after the restart.
    Time { ms: u64 },
}

/// What is left of an instance once every pod is removed, berthd still up.
fn remains_after_removal(berthd: &Berthd, pod_ids: &BTreeSet<String>) -> Vec<String> {
    let mut left = Vec::new();
    let state = &berthd.state_dir;
    for (pid, id, comm) in monitors_of(state) {
        left.push(format!(
            "process {pid} ({comm}) of container {}",
            short(&id)
        ));
    }
    for id in pod_ids {
        let veth = host_veth_name(id);
        if Path::new("/sys/class/net").join(&veth).exists() {
            left.push(format!("veth {veth} of pod {}", short(id)));
        }
    }
    let view = HostView::read(berthd);
    for port in &view.bridge_ports {
        left.push(format!("bridge port {port}"));
    }
    for id in &view.net_records {
        left.push(format!("network record of pod {}", short(id)));
    }
    for (ip, owner) in &view.ipam {
        left.push(format!("IPAM claim {ip} of pod {}", short(owner)));
    }
    for (what, names) in [
        ("namespace pin", &view.pins),
        ("pod directory", &view.pod_dirs),
        ("bundle", &view.bundles),
        ("writable layer", &view.layers),
    ] {
        for n in names {
            left.push(format!("{what} {}", short(n)));
        }
    }
    for (pod, containers) in &view.cgroups {
        let procs = view.pod_procs.get(pod).cloned().unwrap_or_default();
        left.push(format!(
            "cgroup of pod {} (processes {procs:?}) with container cgroups {:?}",
            short(pod),
            containers
                .iter()
                .map(|(c, p)| format!("{} (processes {p:?})", short(c)))
                .collect::<Vec<_>>()
        ));
    }
    for m in &view.mounts {
        left.push(format!("mount {}", m.display()));
    }
    for pid in view.monitors_cgroup.iter().filter(|p| alive(**p)) {
        left.push(format!("process {pid} in the monitors cgroup"));
    }
    if let Ok(out) = std::process::Command::new("nft")
        .args(["list", "table", "inet", &berthd.names.nft_table])
        .output()
    {
        let table = String::from_utf8_lossy(&out.stdout);
        for line in table.lines() {
            if line.contains("dnat ip to") || pod_ids.iter().any(|id| line.contains(id.as_str())) {
                left.push(format!("nftables rule: {}", line.trim()));
            }
        }
    }
    left
}

fn free_port() -> i32 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    i32::from(l.local_addr().expect("local addr").port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_under_fifty_kills_keeps_records_true_and_leaves_nothing() {
    let seed = churn_seed();
    println!("live restore churn: seed {seed:#x} (BERTH_CHURN_SEED overrides)");
    let began = Instant::now();
    let mut node = CriNode::start().await;
    let mut rng = Rng::new(seed);
    let mut rt = node.berthd.runtime().await;

    // Long-running pods that every kill must leave alone.
    let mut keepers = Vec::new();
    let mut keeper_pods = Vec::new();
    for k in 0..KEEPERS {
        let mut config = pod_config(node.logs.path(), &format!("keep-{k}"), &[]);
        if k % 2 == 1 {
            config = own_pid_namespaces(config);
        }
        let pod = run_pod(&mut rt, &config).await;
        let id = run_container(
            &mut rt,
            &pod,
            &config,
            &container_config(&node.busybox, "ticker", TICKER),
        )
        .await;
        let (_, pid) = status_pid(&mut rt, &id).await.expect("keeper status");
        assert!(alive(pid), "keeper runs as {pid}");
        keepers.push(Keeper { id, pid });
        keeper_pods.push(pod);
    }
    drop(rt);

    let shared = Arc::new(Shared {
        socket: node.berthd.socket.clone(),
        image: node.busybox.clone(),
        logs: node.logs.path().to_path_buf(),
        gate: tokio::sync::RwLock::new(()),
        generation: AtomicU64::new(0),
        killing: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        n: Counters::default(),
        findings: Mutex::new(Vec::new()),
        pod_ids: Mutex::new(keeper_pods.iter().cloned().collect()),
        keepers: Mutex::new(keepers.iter().map(|k| k.id.clone()).collect()),
    });
    let mut auditor = Auditor {
        keepers,
        logs: HashMap::new(),
        reported: BTreeSet::new(),
    };
    let mut tasks = Vec::new();
    for task in 0..CHURN_TASKS {
        // The first task's pods publish a host port: nftables rules churn too.
        let ports = if task == 0 {
            vec![(8080, free_port())]
        } else {
            Vec::new()
        };
        tasks.push(tokio::spawn(churn_task(shared.clone(), task, seed, ports)));
    }
    tasks.push(tokio::spawn(reader_task(shared.clone(), seed)));

    let mut restart_times = Vec::new();
    for cycle in 1..=KILLS {
        let kill_at = if rng.percent(70) {
            KillAt::Calls {
                calls: rng.range(1, 10),
                then_ms: rng.range(0, 25),
            }
        } else {
            KillAt::Time {
                ms: rng.range(5, 800),
            }
        };
        let down_ms = rng.range(0, 150);
        match kill_at {
            KillAt::Calls { calls, then_ms } => {
                let target = shared.n.answered.load(SeqCst) + calls;
                let give_up = Instant::now() + Duration::from_secs(3);
                while shared.n.answered.load(SeqCst) < target && Instant::now() < give_up {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(then_ms)).await;
            }
            KillAt::Time { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
        let pid = node.berthd.pid().as_raw();
        if !alive(pid) {
            shared.finding(format!(
                "cycle {cycle}: berthd (pid {pid}) died by itself; its log ends:\n{}",
                tail(&node.berthd.log(), 30)
            ));
        }
        shared.killing.store(true, SeqCst);
        let status = tokio::task::block_in_place(|| node.berthd.stop_with(Signal::SIGKILL));
        assert!(!status.success(), "berthd killed: {status}");
        let gate = shared.gate.write().await;
        tokio::time::sleep(Duration::from_millis(down_ms)).await;
        let spawned = Instant::now();
        tokio::task::block_in_place(|| node.berthd.spawn());
        let restart = spawned.elapsed();
        restart_times.push(restart);
        let findings = auditor.check(&node.berthd, Duration::from_secs(2)).await;
        println!(
            "cycle {cycle:2}: kill {kill_at:?}, down {down_ms} ms, serving after {restart:?}, \
             checked in {:?}; {} mutating calls answered so far; {} new findings",
            spawned.elapsed() - restart,
            shared.n.answered.load(SeqCst),
            findings.len()
        );
        for f in findings {
            shared.finding(format!("cycle {cycle}: {f}"));
        }
        shared.generation.fetch_add(1, SeqCst);
        shared.killing.store(false, SeqCst);
        drop(gate);
    }

    shared.stop.store(true, SeqCst);
    for task in tasks {
        if tokio::time::timeout(Duration::from_secs(90), task)
            .await
            .is_err()
        {
            shared.finding("a churn task did not finish within 90 s".to_string());
        }
    }
    for f in auditor.check(&node.berthd, Duration::from_secs(2)).await {
        shared.finding(format!("after the churn: {f}"));
    }

    // Remove everything, then nothing of berth's may remain.
    let mut rt = try_connect(&node.berthd.socket).await.expect("connect");
    remove_all_pods(&mut rt).await;
    let containers = rt
        .list_containers(ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    let mut leaks: Vec<String> = containers
        .iter()
        .map(|c| {
            format!(
                "container {} listed after its pod was removed",
                short(&c.id)
            )
        })
        .collect();
    let pod_ids = shared.pod_ids.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    let remains = loop {
        let remains = remains_after_removal(&node.berthd, &pod_ids);
        if remains.is_empty() || Instant::now() >= deadline {
            break remains;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    leaks.extend(remains);
    drop(rt);
    let status = tokio::task::block_in_place(|| node.berthd.stop_with(Signal::SIGTERM));
    if !status.success() {
        leaks.push(format!("berthd exited with {status} on SIGTERM"));
    }
    leaks.extend(node.berthd.leaks());
    leaks.extend(
        monitors_of(&node.berthd.state_dir)
            .into_iter()
            .map(|(pid, id, comm)| format!("process {pid} ({comm}) of container {}", short(&id))),
    );

    let n = &shared.n;
    let findings = shared.findings.lock().unwrap().clone();
    if !findings.is_empty() || !leaks.is_empty() {
        let kept = std::env::temp_dir().join(format!("berth-live-restore-{seed:x}.log"));
        if std::fs::copy(&node.berthd.log_path, &kept).is_ok() {
            println!("berthd's log is kept in {}", kept.display());
        }
    }
    restart_times.sort();
    println!(
        "live restore churn: seed {seed:#x}; {KILLS} kills in {:?}; restart to serving: median {:?}, max {:?}; \
         CRI calls {} ({} mutating, {} of them answered), {} cut by a kill and sent again, {} of those had landed; \
         pods run {} removed {}; containers created {} started {} stopped {} removed {}; \
         execs {}; findings {}; leaks {}",
        began.elapsed(),
        restart_times[restart_times.len() / 2],
        restart_times.last().copied().unwrap_or_default(),
        n.calls.load(SeqCst),
        n.mutating.load(SeqCst),
        n.answered.load(SeqCst),
        n.cut.load(SeqCst),
        n.landed.load(SeqCst),
        n.pods_run.load(SeqCst),
        n.pods_removed.load(SeqCst),
        n.containers_created.load(SeqCst),
        n.containers_started.load(SeqCst),
        n.containers_stopped.load(SeqCst),
        n.containers_removed.load(SeqCst),
        n.execs.load(SeqCst),
        findings.len(),
        leaks.len(),
    );
    assert!(
        findings.is_empty() && leaks.is_empty(),
        "seed {seed:#x}: {} findings:\n  {}\n{} leaks:\n  {}",
        findings.len(),
        findings.join("\n  "),
        leaks.len(),
        leaks.join("\n  ")
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// A monitor killed under its container.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_monitor_reports_its_container_exited_and_leaves_nothing() {
    let mut node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let config = own_pid_namespaces(pod_config(node.logs.path(), "orphaned", &[]));
    let pod = run_pod(&mut rt, &config).await;
    // A silent container: nothing it writes can die of the broken log pipe.
    let id = run_container(
        &mut rt,
        &pod,
        &config,
        &container_config(&node.busybox, "sleeper", &["sleep", "100000"]),
    )
    .await;
    let (status, pid) = status_pid(&mut rt, &id).await.expect("status");
    assert_eq!(status.state, ContainerState::ContainerRunning as i32);
    assert!(alive(pid), "container init {pid} runs");
    let monitor = monitor_pid(&node.berthd.state_dir, &id).expect("the container's monitor");

    kill(Pid::from_raw(monitor), Signal::SIGKILL).expect("kill the monitor");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exited = loop {
        let (s, _) = status_pid(&mut rt, &id).await.expect("status");
        if s.state == ContainerState::ContainerExited as i32 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after its monitor was killed the container is still {}",
            state_name(s.state)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "monitor killed: exit {}, reason {:?}, message {:?}",
        exited.exit_code, exited.reason, exited.message
    );
    let mut problems = Vec::new();
    if exited.reason.is_empty() || exited.message.is_empty() {
        problems.push(format!(
            "no clear reason: reason {:?}, message {:?}",
            exited.reason, exited.message
        ));
    }
    if exited.exit_code == 0 {
        problems.push("exit code 0 for a container whose monitor was killed".to_string());
    }
    if exited.finished_at == 0 {
        problems.push("no finish time".to_string());
    }
    // Reported exited, so it must not run on.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if alive(pid) {
        problems.push(format!(
            "reported exited, yet its process {pid} still runs 5 s later"
        ));
    }
    let listed = rt
        .list_containers(ListContainersRequest::default())
        .await
        .expect("list")
        .into_inner()
        .containers;
    if listed
        .iter()
        .any(|c| c.id == id && c.state != ContainerState::ContainerExited as i32)
    {
        problems.push("ListContainers does not agree with ContainerStatus".to_string());
    }

    rt.remove_container(RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("remove the container");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("remove the pod");
    if alive(pid) {
        problems.push(format!("its process {pid} still runs after removal"));
    }
    let remains = remains_after_removal(&node.berthd, &BTreeSet::from([pod]));
    problems.extend(
        remains
            .into_iter()
            .map(|r| format!("left after removal: {r}")),
    );
    drop(rt);
    assert!(node.berthd.stop_with(Signal::SIGTERM).success());
    problems.extend(
        node.berthd
            .leaks()
            .into_iter()
            .map(|l| format!("left after berthd stopped: {l}")),
    );
    // The harness kills whatever stayed in the instance's cgroups.
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// As a user would try it.
// ---------------------------------------------------------------------------

/// GET / on 127.0.0.1:port, the body if it answers.
async fn http_get(port: i32) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port as u16));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .map_err(|e| format!("read: {e}"))?;
        Ok(reply)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The messages of a CRI log file: (stream, text) per full line.
fn log_messages(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.splitn(4, ' ').collect();
            match parts.as_slice() {
                [_, stream, "F", text] => Some((stream.to_string(), text.to_string())),
                _ => None,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_a_user_would_try_it_ports_logs_and_exits_across_a_killed_berthd() {
    let mut node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let port = free_port();
    let config = pod_config(node.logs.path(), "story", &[(8080, port)]);
    let pod = run_pod(&mut rt, &config).await;
    let web = run_container(
        &mut rt,
        &pod,
        &config,
        &container_config(
            &node.busybox,
            "web",
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo hello-from-berth > /www/index.html && exec httpd -f -p 8080 -h /www",
            ],
        ))
    .await;
    let ticker = run_container(
        &mut rt,
        &pod,
        &config,
        &container_config(&node.busybox, "ticker", TICKER),
    )
    .await;
    let trigger = tempfile::tempdir().expect("trigger dir");
    let mut printer_config = container_config(
        &node.busybox,
        "printer",
        &[
            "sh",
            "-c",
            "while [ ! -e /trigger/go ]; do sleep 0.05; done; echo printed-while-berthd-was-down; exit 3",
        ],
    );
    printer_config.mounts = vec![Mount {
        container_path: "/trigger".into(),
        host_path: trigger.path().display().to_string(),
        ..Default::default()
    }];
    let printer = run_container(&mut rt, &pod, &config, &printer_config).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(port).await {
            Ok(reply) if reply.contains("hello-from-berth") => break,
            other => assert!(
                Instant::now() < deadline,
                "the host port {port} does not answer: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut running = BTreeMap::new();
    for id in [&web, &ticker, &printer] {
        let (s, pid) = status_pid(&mut rt, id).await.expect("status");
        assert_eq!(s.state, ContainerState::ContainerRunning as i32);
        running.insert(id.clone(), (pid, s.log_path));
    }
    let ticker_log = running[&ticker].1.clone();
    let printer_log = running[&printer].1.clone();
    drop(rt);

    let killed_at = std::time::SystemTime::now();
    assert!(!node.berthd.stop_with(Signal::SIGKILL).success());
    let ticks_at_kill = log_messages(&ticker_log).len();
    let reply = http_get(port).await;
    assert!(
        reply.as_ref().is_ok_and(|r| r.contains("hello-from-berth")),
        "the host port answers while berthd is down: {reply:?}"
    );
    std::fs::write(trigger.path().join("go"), b"").expect("trigger the printer");
    let deadline = Instant::now() + Duration::from_secs(10);
    while (monitor_pid(&node.berthd.state_dir, &printer).is_some()
        || !log_messages(&printer_log)
            .iter()
            .any(|(_, t)| t == "printed-while-berthd-was-down"))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        monitor_pid(&node.berthd.state_dir, &printer).is_none(),
        "the printer exited and its monitor with it while berthd was down"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticks_while_down = log_messages(&ticker_log).len() - ticks_at_kill;
    let restarted_at = std::time::SystemTime::now();
    node.berthd.spawn();

    let mut rt = node.berthd.runtime().await;
    let listed: BTreeSet<String> = rt
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("list running")
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(
        listed,
        BTreeSet::from([web.clone(), ticker.clone()]),
        "`crictl ps` shows the same containers running"
    );
    for id in [&web, &ticker] {
        let (_, pid) = status_pid(&mut rt, id).await.expect("status");
        assert_eq!(pid, running[id].0, "the same process runs");
        assert!(alive(pid));
    }
    let (s, _) = status_pid(&mut rt, &printer).await.expect("printer status");
    let nanos = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_nanos() as i64
    };
    assert_eq!(
        (s.state, s.exit_code, s.reason.as_str()),
        (ContainerState::ContainerExited as i32, 3, "Error"),
        "the real exit code: {s:?}"
    );
    assert!(
        s.finished_at > nanos(killed_at) && s.finished_at < nanos(restarted_at),
        "finished while berthd was down"
    );
    assert_eq!(s.log_path, printer_log);
    assert!(
        log_messages(&s.log_path).contains(&(
            "stdout".to_string(),
            "printed-while-berthd-was-down".to_string()
        )),
        "`crictl logs` shows what was written while berthd was down"
    );
    assert!(
        ticks_while_down >= 3,
        "the ticker logged {ticks_while_down} lines while berthd was down"
    );
    let reply = http_get(port).await;
    assert!(
        reply.as_ref().is_ok_and(|r| r.contains("hello-from-berth")),
        "the host port answers after the restart: {reply:?}"
    );

    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("remove the pod");
    let remains = remains_after_removal(&node.berthd, &BTreeSet::from([pod]));
    assert!(remains.is_empty(), "left after removal: {remains:#?}");
    assert!(
        http_get(port).await.is_err(),
        "the host port is closed once the pod is gone"
    );
}

// ---------------------------------------------------------------------------
// Time to the first answer with 100 containers running.
// ---------------------------------------------------------------------------

const MANY: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_100_running_containers_answers_at_once() {
    let mut node = CriNode::start().await;
    let rt = node.berthd.runtime().await;
    let began = Instant::now();
    let image = node.busybox.clone();
    let logs = node.logs.path().to_path_buf();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (mut rt, next, image, logs) = (rt.clone(), next.clone(), image.clone(), logs.clone());
        workers.push(tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, SeqCst) as usize;
                if i >= MANY {
                    return made;
                }
                let config = pod_config(&logs, &format!("many-{i}"), &[]);
                let pod = run_pod(&mut rt, &config).await;
                let id = run_container(
                    &mut rt,
                    &pod,
                    &config,
                    &container_config(&image, "sleep", &["sleep", "100000"]),
                )
                .await;
                made.push(id);
            }
        }));
    }
    let mut ids = BTreeSet::new();
    for w in workers {
        ids.extend(w.await.expect("worker"));
    }
    println!(
        "{MANY} pods with a running container made in {:?}",
        began.elapsed()
    );
    drop(rt);

    // SIGTERM: berthd goes, the containers stay.
    assert!(node.berthd.stop_with(Signal::SIGTERM).success());
    let spawned = Instant::now();
    node.berthd.spawn();
    let socket_at = spawned.elapsed();
    let mut rt = try_connect(&node.berthd.socket)
        .await
        .expect("connect to the restarted berthd");
    let version = rt
        .version(VersionRequest::default())
        .await
        .expect("Version");
    let version_at = spawned.elapsed();
    let listed = rt
        .list_containers(ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    let list_at = spawned.elapsed();
    println!(
        "restart with {MANY} running containers: socket after {socket_at:?} \
         (polled every 20 ms), Version ({}) after {version_at:?}, ListContainers ({} items) after {list_at:?}",
        version.get_ref().runtime_version,
        listed.len()
    );
    let running: BTreeSet<String> = listed
        .iter()
        .filter(|c| c.state == ContainerState::ContainerRunning as i32)
        .map(|c| c.id.clone())
        .collect();
    assert_eq!(running, ids, "all {MANY} are found running");
    for id in &ids {
        let (_, pid) = status_pid(&mut rt, id).await.expect("status");
        assert!(alive(pid), "container {} runs as {pid}", short(id));
    }

    let started = Instant::now();
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list pods")
        .into_inner()
        .items;
    let pods = Arc::new(Mutex::new(pods));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (mut rt, pods) = (rt.clone(), pods.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let Some(pod) = pods.lock().unwrap().pop() else {
                    return;
                };
                rt.remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: pod.id,
                })
                .await
                .expect("remove pod");
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    println!("{MANY} pods removed in {:?}", started.elapsed());
    let remains = remains_after_removal(&node.berthd, &BTreeSet::new());
    assert!(remains.is_empty(), "left after removal: {remains:#?}");
}

// ---------------------------------------------------------------------------
// Without live restore, and a creation cut before it was recorded.
// ---------------------------------------------------------------------------

/// A pod named `name` with one TICKER container `c` started in it.
async fn ticking_pod(
    rt: &mut Rt,
    node: &CriNode,
    name: &str,
) -> (PodSandboxConfig, String, String) {
    let config = pod_config(node.logs.path(), name, &[]);
    let pod = run_pod(rt, &config).await;
    let id = run_container(
        rt,
        &pod,
        &config,
        &container_config(&node.busybox, "c", TICKER),
    )
    .await;
    (config, pod, id)
}

/// `live_restore: false`: SIGTERM stops every container first, politely
/// where the container listens and with SIGKILL after the grace where not;
/// the restarted berthd reports them exited with those codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_live_restore_a_clean_shutdown_stops_every_container() {
    let mut node = CriNode::start_with(BerthdOptions {
        extra_config: "live_restore: false\nshutdown_timeout_secs: 2\n".to_string(),
    })
    .await;
    let mut rt = node.berthd.runtime().await;
    let config = pod_config(node.logs.path(), "no-restore", &[]);
    let pod = run_pod(&mut rt, &config).await;
    let polite = run_container(
        &mut rt,
        &pod,
        &config,
        &container_config(&node.busybox, "polite", TICKER),
    )
    .await;
    let deaf = run_container(
        &mut rt,
        &pod,
        &config,
        &container_config(
            &node.busybox,
            "deaf",
            &["sh", "-c", "trap '' TERM; exec sleep 3600"],
        ),
    )
    .await;
    let mut pids = Vec::new();
    for id in [&polite, &deaf] {
        let (_, pid) = status_pid(&mut rt, id).await.expect("status");
        assert!(alive(pid), "container {} runs as {pid}", short(id));
        pids.push(pid);
    }
    drop(rt);

    let status = tokio::task::block_in_place(|| node.berthd.stop_with(Signal::SIGTERM));
    assert!(status.success(), "berthd exits 0 on SIGTERM: {status}");
    for pid in &pids {
        assert!(!alive(*pid), "container process {pid} outlived berthd");
    }
    assert!(monitors_of(&node.berthd.state_dir).is_empty());

    tokio::task::block_in_place(|| node.berthd.spawn());
    let mut rt = node.berthd.runtime().await;
    for (id, code) in [(&polite, 143), (&deaf, 137)] {
        let (s, _) = status_pid(&mut rt, id).await.expect("status after restart");
        assert_eq!(
            (state_name(s.state), s.exit_code),
            ("CONTAINER_EXITED", code),
            "container {}: {} {}",
            short(id),
            s.reason,
            s.message
        );
    }
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1, "the pod is kept: {pods:?}");
    remove_all_pods(&mut rt).await;
}

/// A CreateContainer cut by a kill after the monitor was launched but before
/// the record was written: the restarted berthd ends the monitor and removes
/// every piece, and the same name can be created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_cut_before_its_record_is_rolled_back() {
    let mut node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let (config, pod, id) = ticking_pod(&mut rt, &node, "cut").await;
    let (_, pid) = status_pid(&mut rt, &id).await.expect("status");
    drop(rt);
    tokio::task::block_in_place(|| node.berthd.stop_with(Signal::SIGKILL));
    // What a kill between the monitor's launch and the record leaves.
    let bundle = node.berthd.state_dir.join("containers").join(&id);
    std::fs::remove_file(bundle.join("container.json")).expect("remove the record");
    let monitor = monitor_pid(&node.berthd.state_dir, &id).expect("the monitor runs");

    tokio::task::block_in_place(|| node.berthd.spawn());
    let mut rt = node.berthd.runtime().await;
    let listed = rt
        .list_containers(ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert!(listed.is_empty(), "nothing is listed: {listed:?}");
    for p in [pid, monitor] {
        assert!(!alive(p), "process {p} of the cut creation still runs");
    }
    assert!(!bundle.exists(), "the bundle is removed");
    assert!(
        !node.berthd.root.join("containers").join(&id).exists(),
        "the writable layer is removed"
    );
    let again = run_container(
        &mut rt,
        &pod,
        &config,
        &container_config(&node.busybox, "c", TICKER),
    )
    .await;
    assert_ne!(again, id);
    remove_all_pods(&mut rt).await;
}

/// The periodic garbage-collection pass removes leftovers only this instance
/// can own (under its state dir, root and cgroup parent), logs each, and
/// leaves a live pod and container alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_collector_removes_orphans_and_keeps_the_living() {
    let node = CriNode::start_with(BerthdOptions {
        extra_config: "gc_interval_secs: 1\n".to_string(),
    })
    .await;
    let mut rt = node.berthd.runtime().await;
    let (_, pod, id) = ticking_pod(&mut rt, &node, "living").await;

    let orphan = "0".repeat(64);
    // A writable layer without a bundle, apart from the half-made container.
    let layer = "1".repeat(64);
    let state = &node.berthd.state_dir;
    let made = [
        state.join("containers").join(&orphan),
        state.join("pods").join(&orphan),
        state.join("ns").join(&orphan),
        node.berthd
            .root
            .join("containers")
            .join(&layer)
            .join("upper"),
    ];
    for dir in &made {
        std::fs::create_dir_all(dir).expect("make an orphan");
    }
    let cgroups: Vec<PathBuf> = cgroup_roots()
        .into_iter()
        .filter(|r| r.join(&node.berthd.names.cgroup_parent).is_dir())
        .map(|r| r.join(&node.berthd.names.cgroup_parent).join(&orphan))
        .collect();
    assert!(!cgroups.is_empty(), "berth's cgroup parent exists");
    for cg in &cgroups {
        std::fs::create_dir(cg).expect("make an orphan cgroup");
    }

    // The writable layer's own directory must go, not just what is in it.
    let watched: Vec<PathBuf> = made[..3]
        .iter()
        .cloned()
        .chain([node.berthd.root.join("containers").join(&layer)])
        .chain(cgroups.iter().cloned())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left: Vec<&PathBuf> = watched.iter().filter(|p| p.exists()).collect();
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(left.is_empty(), "orphans left after 10 s: {left:?}");
    let log = node.berthd.log();
    for what in [
        "removing a half-made container",
        "removing a half-made pod",
        "removing orphaned namespace pins",
        "removing an orphaned writable layer",
        "removing an orphaned pod cgroup",
    ] {
        assert!(log.contains(what), "the log says {what:?}");
    }
    let (s, pid) = status_pid(&mut rt, &id).await.expect("status");
    assert_eq!(state_name(s.state), "CONTAINER_RUNNING");
    assert!(alive(pid));
    assert!(state.join("containers").join(&id).is_dir());
    assert!(state.join("pods").join(&pod).is_dir());
    remove_all_pods(&mut rt).await;
}

/// A RunPodSandbox cut by a kill after the pod's PID 1 was started and its
/// PID namespace pinned, but before the pod's record: the restarted berthd
/// kills that infra and unmounts every pin, the PID one included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_start_cut_before_its_record_is_rolled_back() {
    let mut node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let config = pod_config(node.logs.path(), "cut-pod", &[]);
    let pod = run_pod(&mut rt, &config).await;
    drop(rt);
    tokio::task::block_in_place(|| node.berthd.stop_with(Signal::SIGKILL));
    let pins = node.berthd.state_dir.join("ns").join(&pod);
    assert!(
        mount_points().contains(&pins.join("pid")),
        "a pod sharing its PID namespace has its PID 1 pinned"
    );
    let infra = processes()
        .into_iter()
        .find(|p| p.cmdline.contains(&pins.join("pid").display().to_string()))
        .expect("the pod's infra runs");
    // What a kill between the pins and the record leaves.
    std::fs::remove_file(
        node.berthd
            .state_dir
            .join("pods")
            .join(&pod)
            .join("pod.json"),
    )
    .expect("remove the pod's record");

    tokio::task::block_in_place(|| node.berthd.spawn());
    let mut rt = node.berthd.runtime().await;
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "nothing is listed: {pods:?}");
    assert!(!alive(infra.pid), "the infra {} is killed", infra.pid);
    let left: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&pins))
        .collect();
    assert!(left.is_empty(), "pins left mounted: {left:?}");
    assert!(!pins.exists(), "the pin directory is removed");
    // The same pod can run again.
    let again = run_pod(&mut rt, &config).await;
    assert_ne!(again, pod);
    remove_all_pods(&mut rt).await;
}
