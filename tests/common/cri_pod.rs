//! Pods and containers through CRI on a real berthd: a node (a registry with
//! busybox pushed, a berthd that has pulled it, a log dir), pod and busybox
//! container configs, the RPCs run to their answer (run and remove pods,
//! create, start, status, wait for an exit), pod addresses, and servers
//! reached with `nc` from inside a container.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

use super::berthd::{Berthd, BerthdOptions};
use super::fixtures::{self, Fixture};
use super::registry::Registry;

pub type Rt = RuntimeServiceClient<Channel>;

/// A berthd with busybox pulled from a registry of its own, and a log dir
/// for its pods.
pub struct CriNode {
    pub berthd: Berthd,
    pub registry: Registry,
    pub busybox: String,
    pub logs: tempfile::TempDir,
}

impl CriNode {
    pub async fn start() -> CriNode {
        CriNode::start_with(BerthdOptions::default()).await
    }

    /// A node whose berthd runs with `options` (extra config).
    pub async fn start_with(options: BerthdOptions) -> CriNode {
        CriNode::start_with_network(options, "").await
    }

    /// Like [`CriNode::start_with`], with `network_keys` under `network:`
    /// (see [`Berthd::start_with_network`]).
    pub async fn start_with_network(options: BerthdOptions, network_keys: &str) -> CriNode {
        let registry = Registry::start().expect("registry");
        let pushed = fixtures::push(&registry, Fixture::BusyboxLatest).expect("push busybox");
        let berthd = Berthd::start_with_network(options, network_keys);
        berthd.pull(&pushed.reference).await;
        CriNode {
            berthd,
            registry,
            busybox: pushed.reference,
            logs: tempfile::tempdir().expect("log dir"),
        }
    }

    pub async fn runtime(&self) -> Rt {
        self.berthd.runtime().await
    }

    /// A pod of namespace `default` logging under `<logs>/<name>`.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        pod_config("default", name, self.logs.path(), Vec::new())
    }

    /// A busybox container running `command`, logging to `<name>.log`.
    pub fn busybox_config(&self, name: &str, command: &[&str]) -> ContainerConfig {
        container_config(&self.busybox, name, command)
    }

    /// A busybox container running `sh -c script`.
    pub fn container_config(&self, name: &str, script: &str) -> ContainerConfig {
        ContainerConfig {
            linux: Some(LinuxContainerConfig::default()),
            ..self.busybox_config(name, &["sh", "-c", script])
        }
    }

    /// The text a container wrote, from its CRI log file.
    pub fn log(&self, pod: &PodSandboxConfig, container: &ContainerConfig) -> String {
        let path = PathBuf::from(&pod.log_directory).join(&container.log_path);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines()
            .filter_map(|line| line.splitn(4, ' ').nth(3))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A pod of `namespace` called `name` (uid `uid-<name>`), logging under
/// `logs/<name>`, with `ports`.
pub fn pod_config(
    namespace: &str,
    name: &str,
    logs: &Path,
    ports: Vec<PortMapping>,
) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: logs.join(name).display().to_string(),
        port_mappings: ports,
        ..Default::default()
    }
}

/// A container of `image` running `command`, logging to `<name>.log`.
pub fn container_config(image: &str, name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

pub async fn run_pod(rt: &mut Rt, config: &PodSandboxConfig) -> String {
    rt.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

/// Stops and removes a pod with its containers.
pub async fn remove_pod(rt: &mut Rt, pod: &str) {
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    })
    .await
    .expect("RemovePodSandbox");
}

pub async fn create(
    rt: &mut Rt,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: &ContainerConfig,
) -> Result<String, tonic::Status> {
    rt.create_container(CreateContainerRequest {
        pod_sandbox_id: pod.to_string(),
        config: Some(config.clone()),
        sandbox_config: Some(pod_config.clone()),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

pub async fn start(rt: &mut Rt, id: &str) {
    rt.start_container(StartContainerRequest {
        container_id: id.to_string(),
    })
    .await
    .expect("StartContainer");
}

/// Creates a container in `pod` and starts it; returns its id.
pub async fn run_container(
    rt: &mut Rt,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: &ContainerConfig,
) -> String {
    let id = create(rt, pod, pod_config, config)
        .await
        .expect("CreateContainer");
    start(rt, &id).await;
    id
}

/// Starts a container called `main` of `image` in `pod` running `command`.
pub async fn start_container(
    rt: &mut Rt,
    pod: &str,
    pod_config: &PodSandboxConfig,
    image: &str,
    command: &[&str],
) -> String {
    run_container(
        rt,
        pod,
        pod_config,
        &container_config(image, "main", command),
    )
    .await
}

pub async fn status(rt: &mut Rt, id: &str) -> ContainerStatus {
    rt.container_status(ContainerStatusRequest {
        container_id: id.to_string(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("status")
}

/// ContainerStatus with the init's host pid from the verbose info (0 when
/// it has none).
pub async fn status_pid(rt: &mut Rt, id: &str) -> Result<(ContainerStatus, i32), tonic::Status> {
    let reply = rt
        .container_status(ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: true,
        })
        .await?
        .into_inner();
    let pid = reply
        .info
        .get("info")
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
        .and_then(|v| v["pid"].as_i64())
        .unwrap_or(0) as i32;
    let status = reply
        .status
        .ok_or_else(|| tonic::Status::internal("ContainerStatus without a status"))?;
    Ok((status, pid))
}

/// Polls the container's status until it has exited, for at most `limit`.
pub async fn wait_exited(rt: &mut Rt, id: &str, limit: Duration) -> ContainerStatus {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(rt, id).await;
        if s.state == ContainerState::ContainerExited as i32 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not exit: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates and starts a container and waits (at most 30 s) for its exit.
pub async fn run_to_exit(
    rt: &mut Rt,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: &ContainerConfig,
) -> ContainerStatus {
    let id = run_container(rt, pod, pod_config, config).await;
    wait_exited(rt, &id, Duration::from_secs(30)).await
}

/// Runs `nc` in a container until it prints something (servers take a
/// moment to listen); returns what it printed.
pub async fn nc_from(rt: &mut Rt, container: &str, ip: &str, port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = rt
            .exec_sync(ExecSyncRequest {
                container_id: container.to_string(),
                cmd: vec![
                    "nc".into(),
                    "-w".into(),
                    "3".into(),
                    ip.into(),
                    port.to_string(),
                ],
                timeout: 10,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.exit_code == 0 && !text.is_empty() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "nc {ip} {port} from {container}: exit {} {text:?} {:?}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pod's addresses as PodSandboxStatus reports them: `ip`, then
/// `additional_ips`.
pub async fn pod_ips(rt: &mut Rt, pod: &str) -> Vec<String> {
    let network = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_string(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .unwrap_or_default();
    std::iter::once(network.ip)
        .chain(network.additional_ips.into_iter().map(|p| p.ip))
        .filter(|ip| !ip.is_empty())
        .collect()
}

/// The pod's primary address, empty when it has none.
pub async fn pod_ip(rt: &mut Rt, pod: &str) -> String {
    pod_ips(rt, pod)
        .await
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// UpdateRuntimeConfig with only a pod CIDR, as kubelet sends it.
pub async fn update_pod_cidr(rt: &mut Rt, pod_cidr: &str) -> Result<(), tonic::Status> {
    rt.update_runtime_config(UpdateRuntimeConfigRequest {
        runtime_config: Some(RuntimeConfig {
            network_config: Some(NetworkConfig {
                pod_cidr: pod_cidr.to_string(),
            }),
        }),
    })
    .await
    .map(|_| ())
}
