//! Pods and containers on namespaces, overlayfs and cgroups: the core that the
//! CRI front end (and later the Docker API) drives.

pub mod cgroup;
pub mod handler;

/// Whether the runtime can run pods, with the reason when not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeReadiness {
    Ready,
    NotReady { reason: String, message: String },
}

/// The pod and container lifecycle is not built yet, so berth cannot run pods.
pub fn readiness() -> RuntimeReadiness {
    RuntimeReadiness::NotReady {
        reason: "PodLifecycleNotImplemented".to_string(),
        message: "berth cannot run pod sandboxes or containers yet".to_string(),
    }
}
