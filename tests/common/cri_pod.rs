//! Pods and containers through CRI on a real berthd with busybox pulled: a
//! pod, a `sh -c` container in it, run to its exit, and its log read back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

use super::berthd::{Berthd, BerthdOptions};
use super::fixtures::{self, Fixture};
use super::registry::Registry;

pub struct CriNode {
    pub berthd: Berthd,
    _registry: Registry,
    pub busybox: String,
    pub logs: tempfile::TempDir,
}

impl CriNode {
    pub async fn start() -> CriNode {
        CriNode::start_with(BerthdOptions::default()).await
    }

    pub async fn start_with(options: BerthdOptions) -> CriNode {
        let registry = Registry::start().expect("registry");
        let pushed = fixtures::push(&registry, Fixture::BusyboxLatest).expect("push busybox");
        let berthd = Berthd::start_with(options);
        berthd
            .images()
            .await
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: pushed.reference.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("pull busybox");
        CriNode {
            berthd,
            _registry: registry,
            busybox: pushed.reference,
            logs: tempfile::tempdir().expect("log dir"),
        }
    }

    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        self.berthd.runtime().await
    }

    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: format!("uid-{name}"),
                namespace: "default".to_string(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: self.logs.path().join(name).display().to_string(),
            ..Default::default()
        }
    }

    /// A busybox container running `sh -c script`.
    pub fn container_config(&self, name: &str, script: &str) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.busybox.clone(),
                ..Default::default()
            }),
            command: vec!["sh".into(), "-c".into(), script.into()],
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig::default()),
            ..Default::default()
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

/// Stops and removes a pod with its containers.
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

pub async fn create(
    rt: &mut RuntimeServiceClient<Channel>,
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

pub async fn start(rt: &mut RuntimeServiceClient<Channel>, id: &str) {
    rt.start_container(StartContainerRequest {
        container_id: id.to_string(),
    })
    .await
    .expect("StartContainer");
}

pub async fn status(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> ContainerStatus {
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

pub async fn wait_exited(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    limit: Duration,
) -> ContainerStatus {
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates and starts a container and waits for its exit.
pub async fn run_to_exit(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: &ContainerConfig,
) -> ContainerStatus {
    let id = create(rt, pod, pod_config, config)
        .await
        .expect("CreateContainer");
    start(rt, &id).await;
    wait_exited(rt, &id, Duration::from_secs(30)).await
}
