//! CRI stats, metrics and events: the runtime's usage figures and life events
//! in CRI messages.

use k8s_cri::v1 as cri;

use super::CriService;
use super::convert;
use crate::runtime::pod::PodRecord;
use crate::runtime::{ContainerFilter, ContainerView, Event, EventKind, stats};

fn value(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

fn cpu(c: &stats::CpuUsage) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: c.timestamp,
        usage_core_nano_seconds: value(c.usage_core_nanos),
        usage_nano_cores: value(c.usage_nano_cores),
    }
}

fn memory(m: &stats::MemoryUsage, timestamp: i64) -> cri::MemoryUsage {
    cri::MemoryUsage {
        timestamp,
        working_set_bytes: value(m.working_set_bytes),
        available_bytes: None,
        usage_bytes: value(m.usage_bytes),
        rss_bytes: value(m.rss_bytes),
        page_faults: value(m.page_faults),
        major_page_faults: value(m.major_page_faults),
    }
}

fn interface(i: &stats::InterfaceStats) -> cri::NetworkInterfaceUsage {
    cri::NetworkInterfaceUsage {
        name: i.name.clone(),
        rx_bytes: value(i.rx_bytes),
        rx_errors: value(i.rx_errors),
        tx_bytes: value(i.tx_bytes),
        tx_errors: value(i.tx_errors),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

impl CriService {
    pub(super) fn container_stats_of(&self, c: &ContainerView) -> cri::ContainerStats {
        let usage = self.runtime.container_usage(c);
        let timestamp = now();
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: c.record.id.clone(),
                metadata: Some(cri::ContainerMetadata {
                    name: c.record.config.name.clone(),
                    attempt: c.record.config.attempt,
                }),
                labels: c.record.config.labels.clone().into_iter().collect(),
                annotations: c.record.config.annotations.clone().into_iter().collect(),
            }),
            cpu: usage.cpu.as_ref().map(cpu),
            memory: usage.memory.as_ref().map(|m| memory(m, timestamp)),
            writable_layer: Some(cri::FilesystemUsage {
                timestamp,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: usage.layer_dir.display().to_string(),
                }),
                used_bytes: value(usage.layer.bytes),
                inodes_used: value(usage.layer.inodes),
            }),
            swap: None,
        }
    }

    pub(super) fn pod_stats_of(&self, pod: &PodRecord) -> cri::PodSandboxStats {
        let usage = self.runtime.pod_usage(pod);
        let timestamp = now();
        let containers = self
            .runtime
            .list_containers(&ContainerFilter {
                pod_id: pod.id.clone(),
                ..Default::default()
            })
            .iter()
            .filter(|c| c.state() == crate::runtime::container::ContainerState::Running)
            .map(|c| self.container_stats_of(c))
            .collect();
        let interfaces: Vec<cri::NetworkInterfaceUsage> = usage
            .interfaces
            .iter()
            .filter(|i| i.name != "lo")
            .map(interface)
            .collect();
        cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: pod.id.clone(),
                metadata: convert::pod_status(pod).metadata,
                labels: pod.config.labels.clone().into_iter().collect(),
                annotations: pod.config.annotations.clone().into_iter().collect(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: usage.cpu.as_ref().map(cpu),
                memory: usage.memory.as_ref().map(|m| memory(m, timestamp)),
                network: Some(cri::NetworkUsage {
                    timestamp,
                    default_interface: interfaces.iter().find(|i| i.name == "eth0").cloned(),
                    interfaces,
                }),
                process: None,
                containers,
            }),
            windows: None,
        }
    }

    /// The CRI event for a runtime event, with the pod's and containers' statuses.
    pub(super) fn event_of(&self, e: &Event) -> cri::ContainerEventResponse {
        let kind = match e.kind {
            EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
            EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
            EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
            EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
        };
        let pod = self.runtime.pod(&e.pod_id).ok();
        let containers_statuses = self
            .runtime
            .list_containers(&ContainerFilter {
                pod_id: e.pod_id.clone(),
                ..Default::default()
            })
            .iter()
            .map(|c| convert::container_status(c, &self.image_ref(&c.record.image_id)))
            .collect();
        cri::ContainerEventResponse {
            container_id: e.id.clone(),
            container_event_type: kind as i32,
            created_at: e.at,
            pod_sandbox_status: pod.as_ref().map(convert::pod_status),
            containers_statuses,
        }
    }
}

/// The metrics berth reports per pod and container.
pub fn metric_descriptors() -> Vec<cri::MetricDescriptor> {
    let d = |name: &str, help: &str, labels: &[&str]| cri::MetricDescriptor {
        name: name.to_string(),
        help: help.to_string(),
        label_keys: labels.iter().map(|l| l.to_string()).collect(),
    };
    vec![
        d(
            "container_cpu_usage_seconds_total",
            "Cumulative cpu time consumed in seconds.",
            &["id", "name"],
        ),
        d(
            "container_memory_working_set_bytes",
            "Current working set in bytes.",
            &["id", "name"],
        ),
        d(
            "container_network_receive_bytes_total",
            "Cumulative count of bytes received.",
            &["interface"],
        ),
        d(
            "container_network_transmit_bytes_total",
            "Cumulative count of bytes transmitted.",
            &["interface"],
        ),
    ]
}

/// One pod's metrics from its stats.
pub fn pod_metrics(s: &cri::PodSandboxStats) -> cri::PodSandboxMetrics {
    let id = s
        .attributes
        .as_ref()
        .map(|a| a.id.clone())
        .unwrap_or_default();
    let metric = |name: &str, labels: Vec<String>, v: u64, kind: cri::MetricType| cri::Metric {
        name: name.to_string(),
        timestamp: now(),
        metric_type: kind as i32,
        label_values: labels,
        value: value(v),
    };
    let linux = s.linux.clone().unwrap_or_default();
    let metrics = linux
        .network
        .iter()
        .flat_map(|n| n.interfaces.iter())
        .flat_map(|i| {
            [
                metric(
                    "container_network_receive_bytes_total",
                    vec![i.name.clone()],
                    i.rx_bytes.as_ref().map_or(0, |v| v.value),
                    cri::MetricType::Counter,
                ),
                metric(
                    "container_network_transmit_bytes_total",
                    vec![i.name.clone()],
                    i.tx_bytes.as_ref().map_or(0, |v| v.value),
                    cri::MetricType::Counter,
                ),
            ]
        })
        .collect();
    let container_metrics = linux
        .containers
        .iter()
        .map(|c| {
            let attrs = c.attributes.clone().unwrap_or_default();
            let name = attrs.metadata.map(|m| m.name).unwrap_or_default();
            let labels = vec![attrs.id.clone(), name];
            cri::ContainerMetrics {
                container_id: attrs.id,
                metrics: vec![
                    metric(
                        "container_cpu_usage_seconds_total",
                        labels.clone(),
                        c.cpu
                            .as_ref()
                            .and_then(|u| u.usage_core_nano_seconds.as_ref())
                            .map_or(0, |v| v.value / 1_000_000_000),
                        cri::MetricType::Counter,
                    ),
                    metric(
                        "container_memory_working_set_bytes",
                        labels,
                        c.memory
                            .as_ref()
                            .and_then(|m| m.working_set_bytes.as_ref())
                            .map_or(0, |v| v.value),
                        cri::MetricType::Gauge,
                    ),
                ],
            }
        })
        .collect();
    cri::PodSandboxMetrics {
        pod_sandbox_id: id,
        metrics,
        container_metrics,
    }
}
