//! CRI pods and busybox containers for the network tests: run and remove
//! pods, read their addresses, start containers, and reach servers with `nc`
//! from inside them.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

use super::berthd::Berthd;

/// A pod of `namespace` called `name`, logging under `logs/<name>`.
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

pub async fn run_pod(rt: &mut RuntimeServiceClient<Channel>, config: &PodSandboxConfig) -> String {
    rt.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

/// Starts a busybox container in `pod` running `command`.
pub async fn start_container(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &PodSandboxConfig,
    image: &str,
    command: &[&str],
) -> String {
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "main".to_string(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                command: command.iter().map(|s| s.to_string()).collect(),
                log_path: "main.log".to_string(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    id
}

/// Runs `nc` in a container until it prints something (servers take a
/// moment to listen); returns what it printed.
pub async fn nc_from(
    rt: &mut RuntimeServiceClient<Channel>,
    container: &str,
    ip: &str,
    port: u16,
) -> String {
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
pub async fn pod_ips(rt: &mut RuntimeServiceClient<Channel>, pod: &str) -> Vec<String> {
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
pub async fn pod_ip(rt: &mut RuntimeServiceClient<Channel>, pod: &str) -> String {
    pod_ips(rt, pod)
        .await
        .into_iter()
        .next()
        .unwrap_or_default()
}

pub async fn remove_pod(rt: &mut RuntimeServiceClient<Channel>, pod: &str) {
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

pub async fn pull(berthd: &Berthd, image: &str) {
    berthd
        .images()
        .await
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull busybox");
}

/// UpdateRuntimeConfig with only a pod CIDR, as kubelet sends it.
pub async fn update_pod_cidr(
    rt: &mut RuntimeServiceClient<Channel>,
    pod_cidr: &str,
) -> Result<(), tonic::Status> {
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
