//! Pod networking behind one trait: the runtime asks for a pod's network to be
//! set up in its pinned network namespace and torn down again. Implemented by
//! the built-in bridge network and by CNI plugins.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use crate::runtime::pod::PortMapping;

pub mod bridge;
pub mod cache;
pub mod cni_network;
pub mod conf;
pub mod ipam;
pub mod netlink;
pub mod nft;
pub mod plugin;
pub mod portmap;

/// Whether pods can be given a network, with the reason when not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkReadiness {
    Ready,
    NotReady { reason: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network: {0}")]
    Setup(String),
    #[error("pod network config: {0}")]
    Config(String),
    #[error("invalid port mapping: {0}")]
    InvalidPortMapping(String),
    #[error("host port {port} is already published by pod {other_pod}")]
    HostPortTaken { port: String, other_pod: String },
    #[error("invalid pod CIDR: {0}")]
    InvalidPodCidr(String),
    #[error("no free address left in the pod subnet {subnet}")]
    AddressesExhausted { subnet: String },
    #[error("IPAM record {path}: {source}")]
    Ipam {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: std::io::Error,
    },
    #[error("nftables: {0}")]
    Nft(String),
    #[error("pod network record: {0}")]
    Record(#[from] crate::store::StoreError),
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Several(Vec<NetworkError>),
}

/// What the network needs to know of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetworkRequest {
    pub pod_id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The pod's pinned network namespace.
    pub netns: PathBuf,
    pub port_mappings: Vec<PortMapping>,
}

/// What a pod got: its addresses, first the primary one (IPv4 before IPv6).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNetworkStatus {
    pub ips: Vec<IpAddr>,
}

/// A pod network implementation (built-in bridge or CNI plugins).
pub trait PodNetwork: Send + Sync {
    fn readiness(&self) -> NetworkReadiness;
    /// Wires the pod's namespace; called on a blocking thread.
    fn set_up(&self, pod: &PodNetworkRequest) -> Result<PodNetworkStatus, NetworkError>;
    /// Releases what `set_up` made; repeatable, and works when the namespace is gone.
    fn tear_down(&self, pod: &PodNetworkRequest) -> Result<(), NetworkError>;
    /// Verbose status info: which network is in use, as JSON.
    fn describe(&self) -> serde_json::Value;
    /// After a restart: keeps what `live` pods use, removes every other pod's leftovers.
    fn reconcile(&self, live: &[PodNetworkRequest]) -> Result<(), NetworkError>;
    /// Removes the node-wide objects (bridge, table) once no pod is left.
    fn remove_all(&self) -> Result<(), NetworkError>;
    /// kubelet's pod CIDR (`UpdateRuntimeConfig`), one subnet per family at
    /// most, for pods set up from now on; an empty list changes nothing.
    fn set_pod_cidrs(&self, cidrs: &[IpNet]) -> Result<(), NetworkError>;
}
