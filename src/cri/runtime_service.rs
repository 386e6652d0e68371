//! CRI RuntimeService.

use std::collections::HashMap;
use std::pin::Pin;

use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use std::time::Duration;

use super::convert::{self, runtime_status};
use super::{CriService, stats, traced, unimplemented};
use crate::cni::NetworkReadiness;
use crate::runtime::container::ContainerState;
use crate::runtime::pod::PodState;
use crate::runtime::{ContainerFilter, PodFilter, RuntimeReadiness, handler};

type Reply<T> = Result<Response<T>, Status>;
type EventStream = Pin<Box<dyn Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

/// kubelet's API version that runtimes report in `VersionResponse.version`.
const KUBELET_API_VERSION: &str = "0.1.0";

#[tonic::async_trait]
impl RuntimeService for CriService {
    type GetContainerEventsStream = EventStream;

    async fn version(&self, _req: Request<VersionRequest>) -> Reply<VersionResponse> {
        traced("Version", "", async {
            Ok(Response::new(VersionResponse {
                version: KUBELET_API_VERSION.to_string(),
                runtime_name: "berth".to_string(),
                runtime_version: env!("CARGO_PKG_VERSION").to_string(),
                runtime_api_version: "v1".to_string(),
            }))
        })
        .await
    }

    async fn status(&self, req: Request<StatusRequest>) -> Reply<StatusResponse> {
        let verbose = req.get_ref().verbose;
        traced("Status", "", async {
            Ok(Response::new(self.status_reply(verbose)?))
        })
        .await
    }

    async fn runtime_config(
        &self,
        _req: Request<RuntimeConfigRequest>,
    ) -> Reply<RuntimeConfigResponse> {
        traced("RuntimeConfig", "", async {
            let driver = match self.config.cgroup.driver {
                crate::config::CgroupDriver::Cgroupfs => CgroupDriver::Cgroupfs,
                crate::config::CgroupDriver::Systemd => CgroupDriver::Systemd,
            };
            Ok(Response::new(RuntimeConfigResponse {
                linux: Some(LinuxRuntimeConfiguration {
                    cgroup_driver: driver as i32,
                }),
            }))
        })
        .await
    }

    async fn get_container_events(
        &self,
        _req: Request<GetEventsRequest>,
    ) -> Reply<Self::GetContainerEventsStream> {
        traced("GetContainerEvents", "", async {
            let mut events = self.runtime.subscribe();
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let service = self.self_ref();
            tokio::spawn(async move {
                loop {
                    let event = match events.recv().await {
                        Ok(e) => e,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "event subscriber lagged");
                            continue;
                        }
                        Err(_) => return,
                    };
                    let Some(service) = service.upgrade() else {
                        return;
                    };
                    if tx.send(Ok(service.event_of(&event))).await.is_err() {
                        return;
                    }
                }
            });
            let stream: EventStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::new(stream))
        })
        .await
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<RunPodSandboxRequest>,
    ) -> Reply<RunPodSandboxResponse> {
        let req = req.into_inner();
        let name = req
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| m.name.clone())
            .unwrap_or_default();
        traced("RunPodSandbox", &name, async {
            let config = convert::pod_config(req.config, req.runtime_handler)?;
            let runtime = self.runtime.clone();
            let id = tokio::task::spawn_blocking(move || runtime.run_pod(config))
                .await
                .map_err(|e| Status::internal(format!("pod start task failed: {e}")))?
                .map_err(runtime_status)?;
            Ok(Response::new(RunPodSandboxResponse { pod_sandbox_id: id }))
        })
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<StopPodSandboxRequest>,
    ) -> Reply<StopPodSandboxResponse> {
        let id = req.into_inner().pod_sandbox_id;
        traced("StopPodSandbox", &id, async {
            self.runtime.stop_pod(&id).await.map_err(runtime_status)?;
            Ok(Response::new(StopPodSandboxResponse {}))
        })
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<RemovePodSandboxRequest>,
    ) -> Reply<RemovePodSandboxResponse> {
        let id = req.into_inner().pod_sandbox_id;
        traced("RemovePodSandbox", &id, async {
            self.runtime.remove_pod(&id).await.map_err(runtime_status)?;
            Ok(Response::new(RemovePodSandboxResponse {}))
        })
        .await
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<PodSandboxStatusRequest>,
    ) -> Reply<PodSandboxStatusResponse> {
        let req = req.into_inner();
        traced("PodSandboxStatus", &req.pod_sandbox_id.clone(), async {
            let pod = self
                .runtime
                .pod(&req.pod_sandbox_id)
                .map_err(runtime_status)?;
            let info = if req.verbose {
                let record = serde_json::to_string(&pod)
                    .map_err(|e| Status::internal(format!("cannot encode pod record: {e}")))?;
                HashMap::from([("info".to_string(), record)])
            } else {
                HashMap::new()
            };
            Ok(Response::new(PodSandboxStatusResponse {
                status: Some(convert::pod_status(&pod)),
                info,
                containers_statuses: vec![],
                timestamp: now_nanos(),
            }))
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<ListPodSandboxRequest>,
    ) -> Reply<ListPodSandboxResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        traced("ListPodSandbox", &filter.id.clone(), async {
            let filter = PodFilter {
                id: filter.id,
                state: filter
                    .state
                    .and_then(|s| convert::pod_filter_state(s.state)),
                labels: filter.label_selector.into_iter().collect(),
            };
            let items = self
                .runtime
                .list_pods(&filter)
                .iter()
                .map(convert::pod_sandbox)
                .collect();
            Ok(Response::new(ListPodSandboxResponse { items }))
        })
        .await
    }

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Reply<CreateContainerResponse> {
        let req = req.into_inner();
        traced("CreateContainer", &req.pod_sandbox_id.clone(), async {
            let config = convert::container_config(req.config, req.sandbox_config.as_ref())?;
            let id = self
                .runtime
                .create_container(&req.pod_sandbox_id, config)
                .await
                .map_err(runtime_status)?;
            Ok(Response::new(CreateContainerResponse { container_id: id }))
        })
        .await
    }

    async fn start_container(
        &self,
        req: Request<StartContainerRequest>,
    ) -> Reply<StartContainerResponse> {
        let id = req.into_inner().container_id;
        traced("StartContainer", &id, async {
            self.runtime
                .start_container(&id)
                .await
                .map_err(runtime_status)?;
            Ok(Response::new(StartContainerResponse {}))
        })
        .await
    }

    async fn stop_container(
        &self,
        req: Request<StopContainerRequest>,
    ) -> Reply<StopContainerResponse> {
        let req = req.into_inner();
        traced("StopContainer", &req.container_id.clone(), async {
            let timeout = Duration::from_secs(req.timeout.max(0) as u64);
            self.runtime
                .stop_container(&req.container_id, timeout)
                .await
                .map_err(runtime_status)?;
            Ok(Response::new(StopContainerResponse {}))
        })
        .await
    }

    async fn remove_container(
        &self,
        req: Request<RemoveContainerRequest>,
    ) -> Reply<RemoveContainerResponse> {
        let id = req.into_inner().container_id;
        traced("RemoveContainer", &id, async {
            self.runtime
                .remove_container(&id)
                .await
                .map_err(runtime_status)?;
            Ok(Response::new(RemoveContainerResponse {}))
        })
        .await
    }

    async fn list_containers(
        &self,
        req: Request<ListContainersRequest>,
    ) -> Reply<ListContainersResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        traced("ListContainers", &filter.id.clone(), async {
            let filter = ContainerFilter {
                id: filter.id,
                pod_id: filter.pod_sandbox_id,
                state: filter
                    .state
                    .and_then(|s| convert::container_filter_state(s.state)),
                labels: filter.label_selector.into_iter().collect(),
            };
            let containers = self
                .runtime
                .list_containers(&filter)
                .iter()
                .map(|c| convert::container(c, &self.image_ref(&c.record.image_id)))
                .collect();
            Ok(Response::new(ListContainersResponse { containers }))
        })
        .await
    }

    async fn container_status(
        &self,
        req: Request<ContainerStatusRequest>,
    ) -> Reply<ContainerStatusResponse> {
        let req = req.into_inner();
        traced("ContainerStatus", &req.container_id.clone(), async {
            let c = self
                .runtime
                .container(&req.container_id)
                .map_err(runtime_status)?;
            let info = if req.verbose {
                let info = serde_json::json!({
                    "pid": c.status.init_pid,
                    "sandboxID": c.record.pod_id,
                    "record": c.record,
                });
                HashMap::from([("info".to_string(), info.to_string())])
            } else {
                HashMap::new()
            };
            Ok(Response::new(ContainerStatusResponse {
                status: Some(convert::container_status(
                    &c,
                    &self.image_ref(&c.record.image_id),
                )),
                info,
            }))
        })
        .await
    }

    async fn update_container_resources(
        &self,
        req: Request<UpdateContainerResourcesRequest>,
    ) -> Reply<UpdateContainerResourcesResponse> {
        let req = req.into_inner();
        traced(
            "UpdateContainerResources",
            &req.container_id.clone(),
            async {
                let linux = req
                    .linux
                    .ok_or_else(|| Status::invalid_argument("no linux resources in the request"))?;
                self.runtime
                    .update_resources(&req.container_id, convert::resources(linux))
                    .map_err(runtime_status)?;
                Ok(Response::new(UpdateContainerResourcesResponse {}))
            },
        )
        .await
    }

    async fn reopen_container_log(
        &self,
        req: Request<ReopenContainerLogRequest>,
    ) -> Reply<ReopenContainerLogResponse> {
        let id = req.into_inner().container_id;
        traced("ReopenContainerLog", &id, async {
            self.runtime.reopen_log(&id).await.map_err(runtime_status)?;
            Ok(Response::new(ReopenContainerLogResponse {}))
        })
        .await
    }

    async fn exec_sync(&self, req: Request<ExecSyncRequest>) -> Reply<ExecSyncResponse> {
        let req = req.into_inner();
        traced("ExecSync", &req.container_id.clone(), async {
            let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout as u64));
            let out = self
                .runtime
                .exec_sync(&req.container_id, req.cmd, timeout)
                .await
                .map_err(runtime_status)?;
            Ok(Response::new(ExecSyncResponse {
                stdout: out.stdout,
                stderr: out.stderr,
                exit_code: out.exit_code,
            }))
        })
        .await
    }

    async fn exec(&self, req: Request<ExecRequest>) -> Reply<ExecResponse> {
        let req = req.into_inner();
        traced("Exec", &req.container_id.clone(), async {
            let server = self.stream_server()?;
            let view = self
                .runtime
                .running_container(&req.container_id)
                .map_err(runtime_status)?;
            let url = server
                .exec(crate::stream::ExecRequest {
                    container_id: view.record.id,
                    cmd: req.cmd,
                    tty: req.tty,
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                })
                .map_err(stream_status)?;
            Ok(Response::new(ExecResponse { url }))
        })
        .await
    }

    async fn attach(&self, req: Request<AttachRequest>) -> Reply<AttachResponse> {
        let req = req.into_inner();
        traced("Attach", &req.container_id.clone(), async {
            let server = self.stream_server()?;
            let view = self
                .runtime
                .running_container(&req.container_id)
                .map_err(runtime_status)?;
            let url = server
                .attach(crate::stream::AttachRequest {
                    container_id: view.record.id,
                    tty: req.tty,
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                })
                .map_err(stream_status)?;
            Ok(Response::new(AttachResponse { url }))
        })
        .await
    }

    async fn port_forward(&self, req: Request<PortForwardRequest>) -> Reply<PortForwardResponse> {
        let req = req.into_inner();
        traced("PortForward", &req.pod_sandbox_id.clone(), async {
            let server = self.stream_server()?;
            // The pod must exist and be ready now; the session checks again.
            self.runtime
                .port_forward_target(&req.pod_sandbox_id)
                .map_err(runtime_status)?;
            let pod = self
                .runtime
                .pod(&req.pod_sandbox_id)
                .map_err(runtime_status)?;
            let url = server
                .port_forward(crate::stream::PortForwardRequest {
                    pod_id: pod.id,
                    ports: req.port,
                })
                .map_err(stream_status)?;
            Ok(Response::new(PortForwardResponse { url }))
        })
        .await
    }

    async fn container_stats(
        &self,
        req: Request<ContainerStatsRequest>,
    ) -> Reply<ContainerStatsResponse> {
        let id = req.into_inner().container_id;
        traced("ContainerStats", &id, async {
            let c = self.runtime.container(&id).map_err(runtime_status)?;
            Ok(Response::new(ContainerStatsResponse {
                stats: Some(self.container_stats_of(&c)),
            }))
        })
        .await
    }

    async fn list_container_stats(
        &self,
        req: Request<ListContainerStatsRequest>,
    ) -> Reply<ListContainerStatsResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        traced("ListContainerStats", &filter.id.clone(), async {
            let filter = ContainerFilter {
                id: filter.id,
                pod_id: filter.pod_sandbox_id,
                state: Some(ContainerState::Running),
                labels: filter.label_selector.into_iter().collect(),
            };
            let stats = self
                .runtime
                .list_containers(&filter)
                .iter()
                .map(|c| self.container_stats_of(c))
                .collect();
            Ok(Response::new(ListContainerStatsResponse { stats }))
        })
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<PodSandboxStatsRequest>,
    ) -> Reply<PodSandboxStatsResponse> {
        let id = req.into_inner().pod_sandbox_id;
        traced("PodSandboxStats", &id, async {
            let pod = self.runtime.pod(&id).map_err(runtime_status)?;
            Ok(Response::new(PodSandboxStatsResponse {
                stats: Some(self.pod_stats_of(&pod)),
            }))
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<ListPodSandboxStatsRequest>,
    ) -> Reply<ListPodSandboxStatsResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        traced("ListPodSandboxStats", &filter.id.clone(), async {
            let filter = PodFilter {
                id: filter.id,
                state: Some(PodState::Ready),
                labels: filter.label_selector.into_iter().collect(),
            };
            let stats = self
                .runtime
                .list_pods(&filter)
                .iter()
                .map(|p| self.pod_stats_of(p))
                .collect();
            Ok(Response::new(ListPodSandboxStatsResponse { stats }))
        })
        .await
    }

    async fn update_runtime_config(
        &self,
        req: Request<UpdateRuntimeConfigRequest>,
    ) -> Reply<UpdateRuntimeConfigResponse> {
        let pod_cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        traced("UpdateRuntimeConfig", &pod_cidr.clone(), async {
            let cidrs = convert::pod_cidrs(&pod_cidr)?;
            if !cidrs.is_empty() {
                let runtime = self.runtime.clone();
                tokio::task::spawn_blocking(move || runtime.network().set_pod_cidrs(&cidrs))
                    .await
                    .map_err(|e| Status::internal(format!("pod CIDR task failed: {e}")))?
                    .map_err(|e| runtime_status(e.into()))?;
            }
            Ok(Response::new(UpdateRuntimeConfigResponse {}))
        })
        .await
    }

    async fn checkpoint_container(
        &self,
        req: Request<CheckpointContainerRequest>,
    ) -> Reply<CheckpointContainerResponse> {
        let id = req.get_ref().container_id.clone();
        traced("CheckpointContainer", &id, async {
            Err(unimplemented("CheckpointContainer"))
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<ListMetricDescriptorsRequest>,
    ) -> Reply<ListMetricDescriptorsResponse> {
        traced("ListMetricDescriptors", "", async {
            Ok(Response::new(ListMetricDescriptorsResponse {
                descriptors: stats::metric_descriptors(),
            }))
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<ListPodSandboxMetricsRequest>,
    ) -> Reply<ListPodSandboxMetricsResponse> {
        traced("ListPodSandboxMetrics", "", async {
            let filter = PodFilter {
                state: Some(PodState::Ready),
                ..Default::default()
            };
            let pod_metrics = self
                .runtime
                .list_pods(&filter)
                .iter()
                .map(|p| stats::pod_metrics(&self.pod_stats_of(p)))
                .collect();
            Ok(Response::new(ListPodSandboxMetricsResponse { pod_metrics }))
        })
        .await
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

impl CriService {
    /// The image reference a container reports: a repo digest if the image has one, else its id.
    pub(super) fn image_ref(&self, image_id: &str) -> String {
        match self.images.find(image_id) {
            Ok(Some(image)) => image
                .repo_digests
                .iter()
                .next()
                .cloned()
                .unwrap_or_else(|| image_id.to_string()),
            _ => image_id.to_string(),
        }
    }

    fn status_reply(&self, verbose: bool) -> Result<StatusResponse, Status> {
        let runtime_condition = match self.runtime.readiness() {
            RuntimeReadiness::Ready => condition("RuntimeReady", None),
            RuntimeReadiness::NotReady { reason, message } => {
                condition("RuntimeReady", Some((reason, message)))
            }
        };
        let network_condition = match self.runtime.network().readiness() {
            NetworkReadiness::Ready => condition("NetworkReady", None),
            NetworkReadiness::NotReady { reason, message } => {
                condition("NetworkReady", Some((reason, message)))
            }
        };
        let runtime_handlers = handler::handlers(&self.config.runtime_handlers)
            .into_iter()
            .map(|h| RuntimeHandler {
                name: h.name,
                features: Some(RuntimeHandlerFeatures {
                    recursive_read_only_mounts: h.features.recursive_read_only_mounts,
                    user_namespaces: h.features.user_namespaces,
                }),
            })
            .collect();
        let info = if verbose {
            self.verbose_info()?
        } else {
            HashMap::new()
        };
        Ok(StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![runtime_condition, network_condition],
            }),
            info,
            runtime_handlers,
            features: Some(RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        })
    }

    /// `Status` verbose info: each value is a JSON document, as crictl and critest expect.
    fn verbose_info(&self) -> Result<HashMap<String, String>, Status> {
        let mut config = serde_json::to_value(&*self.config)
            .map_err(|e| Status::internal(format!("cannot encode config: {e}")))?;
        if let Some(obj) = config.as_object_mut() {
            // The names containerd uses, which tools read.
            obj.insert(
                "rootDir".into(),
                self.config.root.display().to_string().into(),
            );
            obj.insert(
                "stateDir".into(),
                self.config.state_dir.display().to_string().into(),
            );
        }
        let mut info = HashMap::new();
        info.insert("config".to_string(), config.to_string());
        info.insert(
            "network".to_string(),
            self.runtime.network().describe().to_string(),
        );
        info.insert(
            "cgroupVersion".to_string(),
            serde_json::to_string(&self.cgroup_version)
                .map_err(|e| Status::internal(format!("cannot encode cgroup version: {e}")))?,
        );
        Ok(info)
    }
}

fn condition(kind: &str, not_ready: Option<(String, String)>) -> RuntimeCondition {
    match not_ready {
        None => RuntimeCondition {
            r#type: kind.to_string(),
            status: true,
            reason: String::new(),
            message: String::new(),
        },
        Some((reason, message)) => RuntimeCondition {
            r#type: kind.to_string(),
            status: false,
            reason,
            message,
        },
    }
}

impl CriService {
    /// The streaming server behind Exec, Attach and PortForward URLs.
    fn stream_server(&self) -> Result<&std::sync::Arc<crate::stream::StreamServer>, Status> {
        self.stream
            .get()
            .ok_or_else(|| Status::unavailable("the streaming server is not running"))
    }
}

/// A refused streaming session: the request's fault, or no room for more.
fn stream_status(e: crate::stream::StreamError) -> Status {
    match e {
        crate::stream::StreamError::InvalidArgument(m) => Status::invalid_argument(m),
        other => Status::resource_exhausted(other.to_string()),
    }
}
