//! CRI RuntimeService.

use std::collections::HashMap;
use std::pin::Pin;

use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{CriService, traced, unimplemented};
use crate::cni::{self, NetworkReadiness};
use crate::runtime::{self, RuntimeReadiness, handler};

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
            Err(unimplemented("GetContainerEvents"))
        })
        .await
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<RunPodSandboxRequest>,
    ) -> Reply<RunPodSandboxResponse> {
        let id = req
            .get_ref()
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| m.name.clone())
            .unwrap_or_default();
        traced("RunPodSandbox", &id, async {
            Err(unimplemented("RunPodSandbox"))
        })
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<StopPodSandboxRequest>,
    ) -> Reply<StopPodSandboxResponse> {
        let id = req.get_ref().pod_sandbox_id.clone();
        traced("StopPodSandbox", &id, async {
            Err(unimplemented("StopPodSandbox"))
        })
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<RemovePodSandboxRequest>,
    ) -> Reply<RemovePodSandboxResponse> {
        let id = req.get_ref().pod_sandbox_id.clone();
        traced("RemovePodSandbox", &id, async {
            Err(unimplemented("RemovePodSandbox"))
        })
        .await
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<PodSandboxStatusRequest>,
    ) -> Reply<PodSandboxStatusResponse> {
        let id = req.get_ref().pod_sandbox_id.clone();
        traced("PodSandboxStatus", &id, async {
            Err(unimplemented("PodSandboxStatus"))
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        _req: Request<ListPodSandboxRequest>,
    ) -> Reply<ListPodSandboxResponse> {
        traced("ListPodSandbox", "", async {
            Err(unimplemented("ListPodSandbox"))
        })
        .await
    }

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Reply<CreateContainerResponse> {
        let id = req.get_ref().pod_sandbox_id.clone();
        traced("CreateContainer", &id, async {
            Err(unimplemented("CreateContainer"))
        })
        .await
    }

    async fn start_container(
        &self,
        req: Request<StartContainerRequest>,
    ) -> Reply<StartContainerResponse> {
        let id = req.get_ref().container_id.clone();
        traced("StartContainer", &id, async {
            Err(unimplemented("StartContainer"))
        })
        .await
    }

    async fn stop_container(
        &self,
        req: Request<StopContainerRequest>,
    ) -> Reply<StopContainerResponse> {
        let id = req.get_ref().container_id.clone();
        traced("StopContainer", &id, async {
            Err(unimplemented("StopContainer"))
        })
        .await
    }

    async fn remove_container(
        &self,
        req: Request<RemoveContainerRequest>,
    ) -> Reply<RemoveContainerResponse> {
        let id = req.get_ref().container_id.clone();
        traced("RemoveContainer", &id, async {
            Err(unimplemented("RemoveContainer"))
        })
        .await
    }

    async fn list_containers(
        &self,
        _req: Request<ListContainersRequest>,
    ) -> Reply<ListContainersResponse> {
        traced("ListContainers", "", async {
            Err(unimplemented("ListContainers"))
        })
        .await
    }

    async fn container_status(
        &self,
        req: Request<ContainerStatusRequest>,
    ) -> Reply<ContainerStatusResponse> {
        let id = req.get_ref().container_id.clone();
        traced("ContainerStatus", &id, async {
            Err(unimplemented("ContainerStatus"))
        })
        .await
    }

    async fn update_container_resources(
        &self,
        req: Request<UpdateContainerResourcesRequest>,
    ) -> Reply<UpdateContainerResourcesResponse> {
        let id = req.get_ref().container_id.clone();
        traced("UpdateContainerResources", &id, async {
            Err(unimplemented("UpdateContainerResources"))
        })
        .await
    }

    async fn reopen_container_log(
        &self,
        req: Request<ReopenContainerLogRequest>,
    ) -> Reply<ReopenContainerLogResponse> {
        let id = req.get_ref().container_id.clone();
        traced("ReopenContainerLog", &id, async {
            Err(unimplemented("ReopenContainerLog"))
        })
        .await
    }

    async fn exec_sync(&self, req: Request<ExecSyncRequest>) -> Reply<ExecSyncResponse> {
        let id = req.get_ref().container_id.clone();
        traced("ExecSync", &id, async { Err(unimplemented("ExecSync")) }).await
    }

    async fn exec(&self, req: Request<ExecRequest>) -> Reply<ExecResponse> {
        let id = req.get_ref().container_id.clone();
        traced("Exec", &id, async { Err(unimplemented("Exec")) }).await
    }

    async fn attach(&self, req: Request<AttachRequest>) -> Reply<AttachResponse> {
        let id = req.get_ref().container_id.clone();
        traced("Attach", &id, async { Err(unimplemented("Attach")) }).await
    }

    async fn port_forward(&self, req: Request<PortForwardRequest>) -> Reply<PortForwardResponse> {
        let id = req.get_ref().pod_sandbox_id.clone();
        traced("PortForward", &id, async {
            Err(unimplemented("PortForward"))
        })
        .await
    }

    async fn container_stats(
        &self,
        req: Request<ContainerStatsRequest>,
    ) -> Reply<ContainerStatsResponse> {
        let id = req.get_ref().container_id.clone();
        traced("ContainerStats", &id, async {
            Err(unimplemented("ContainerStats"))
        })
        .await
    }

    async fn list_container_stats(
        &self,
        _req: Request<ListContainerStatsRequest>,
    ) -> Reply<ListContainerStatsResponse> {
        traced("ListContainerStats", "", async {
            Err(unimplemented("ListContainerStats"))
        })
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<PodSandboxStatsRequest>,
    ) -> Reply<PodSandboxStatsResponse> {
        let id = req.get_ref().pod_sandbox_id.clone();
        traced("PodSandboxStats", &id, async {
            Err(unimplemented("PodSandboxStats"))
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        _req: Request<ListPodSandboxStatsRequest>,
    ) -> Reply<ListPodSandboxStatsResponse> {
        traced("ListPodSandboxStats", "", async {
            Err(unimplemented("ListPodSandboxStats"))
        })
        .await
    }

    async fn update_runtime_config(
        &self,
        _req: Request<UpdateRuntimeConfigRequest>,
    ) -> Reply<UpdateRuntimeConfigResponse> {
        traced("UpdateRuntimeConfig", "", async {
            Err(unimplemented("UpdateRuntimeConfig"))
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
            Err(unimplemented("ListMetricDescriptors"))
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<ListPodSandboxMetricsRequest>,
    ) -> Reply<ListPodSandboxMetricsResponse> {
        traced("ListPodSandboxMetrics", "", async {
            Err(unimplemented("ListPodSandboxMetrics"))
        })
        .await
    }
}

impl CriService {
    fn status_reply(&self, verbose: bool) -> Result<StatusResponse, Status> {
        let runtime_condition = match runtime::readiness() {
            RuntimeReadiness::Ready => condition("RuntimeReady", None),
            RuntimeReadiness::NotReady { reason, message } => {
                condition("RuntimeReady", Some((reason, message)))
            }
        };
        let network_condition = match cni::readiness() {
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
                supplemental_groups_policy: false,
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
