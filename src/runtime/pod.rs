//! Pod sandboxes: what a pod asks for, the record berth keeps of it, and the
//! per-pod files (hostname, hosts, resolv.conf) made for its containers.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a pod shares a namespace kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceMode {
    /// One namespace for the whole pod.
    #[default]
    Pod,
    /// One per container (PID only).
    Container,
    /// The host's.
    Node,
    /// Another container's (PID only).
    Target,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceOptions {
    pub network: NamespaceMode,
    pub pid: NamespaceMode,
    pub ipc: NamespaceMode,
    pub target_id: String,
    /// The user namespace asked for; none means the host's.
    #[serde(default)]
    pub user: Option<UserNamespaceOptions>,
}

/// One range of ids: `length` ids from `container_id` inside are
/// `host_id`.. outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    pub container_id: u32,
    pub host_id: u32,
    pub length: u32,
}

/// A user namespace request as given; `runtime::userns` checks it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNamespaceOptions {
    pub mode: NamespaceMode,
    pub uids: Vec<IdMapping>,
    pub gids: Vec<IdMapping>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub protocol: String,
    pub container_port: i32,
    pub host_port: i32,
    pub host_ip: String,
}

/// What a pod asks for: the front end's request in berth's own terms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodConfig {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub hostname: String,
    pub log_directory: String,
    pub dns: Option<DnsConfig>,
    pub port_mappings: Vec<PortMapping>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub cgroup_parent: String,
    pub sysctls: BTreeMap<String, String>,
    pub namespaces: NamespaceOptions,
    pub runtime_handler: String,
    /// Privileged containers are allowed only in a privileged pod.
    pub privileged: bool,
    /// The sum of the containers' limits, as kubelet computes it.
    #[serde(default)]
    pub resources: super::resources::Resources,
    /// What the pod needs beyond its containers (its RuntimeClass overhead).
    #[serde(default)]
    pub overhead: super::resources::Resources,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodState {
    Ready,
    NotReady,
}

/// What berth records of a pod, in `<state>/pods/<id>/pod.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub config: PodConfig,
    pub state: PodState,
    /// Unix nanoseconds.
    pub created_at: i64,
    /// The pod's cgroup, relative to each hierarchy root.
    pub cgroup: String,
    /// Whether berth made the cgroup (and so removes it).
    pub owns_cgroup: bool,
    /// The primary address (IPv4 on a dual-stack network).
    pub ip: Option<String>,
    /// The pod's other addresses, such as its IPv6 one.
    #[serde(default)]
    pub additional_ips: Vec<String>,
    /// PID 1 of the pod's shared PID namespace, when it has one.
    #[serde(default)]
    pub infra_pid: Option<i32>,
    /// The id mapping of the pod's own user namespace, when it has one.
    #[serde(default)]
    pub user_namespace: Option<super::userns::IdMap>,
}

impl PodRecord {
    /// The unique name that a second pod may not take: name, namespace, uid, attempt.
    pub fn reserved_name(config: &PodConfig) -> String {
        format!(
            "{}_{}_{}_{}",
            config.name, config.namespace, config.uid, config.attempt
        )
    }
}

/// The resolv.conf of a pod: its DNS config, else the host's file.
pub fn resolv_conf(dns: Option<&DnsConfig>) -> String {
    match dns {
        Some(dns)
            if !(dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty()) =>
        {
            let mut out = String::new();
            if !dns.searches.is_empty() {
                out.push_str(&format!("search {}\n", dns.searches.join(" ")));
            }
            for server in &dns.servers {
                out.push_str(&format!("nameserver {server}\n"));
            }
            if !dns.options.is_empty() {
                out.push_str(&format!("options {}\n", dns.options.join(" ")));
            }
            out
        }
        _ => fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    }
}

/// The /etc/hosts of a pod with its own network: loopback names and its hostname.
pub fn hosts_file(hostname: &str, ip: Option<&str>) -> String {
    let mut out = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    if let Some(ip) = ip {
        out.push_str(&format!("{ip}\t{hostname}\n"));
    }
    out
}

/// Paths of a pod's files under the state dir.
#[derive(Debug, Clone)]
pub struct PodPaths {
    pub dir: PathBuf,
    pub ns: PathBuf,
}

impl PodPaths {
    pub fn new(state_dir: &Path, id: &str) -> PodPaths {
        PodPaths {
            dir: state_dir.join("pods").join(id),
            ns: state_dir.join("ns").join(id),
        }
    }

    pub fn record(&self) -> PathBuf {
        self.dir.join("pod.json")
    }

    pub fn hostname(&self) -> PathBuf {
        self.dir.join("hostname")
    }

    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    pub fn resolv_conf(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }

    pub fn shm(&self) -> PathBuf {
        self.dir.join("shm")
    }

    /// The empty root of the infra process of a pod with a user namespace.
    pub fn infra_root(&self) -> PathBuf {
        self.dir.join("infra-root")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_the_pod_dns_config() {
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&dns)),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
        assert_eq!(
            resolv_conf(None),
            fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
        );
    }

    #[test]
    fn hosts_file_names_the_pod() {
        let hosts = hosts_file("web-0", Some("10.66.0.5"));
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(hosts.ends_with("10.66.0.5\tweb-0\n"));
    }
}
