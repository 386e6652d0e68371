//! Pod networking: the built-in bridge network and CNI plugin support.
//! Until the network lands, a pod only has loopback, and readiness says so.

/// Whether pods can be given a network, with the reason when not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkReadiness {
    Ready,
    NotReady { reason: String, message: String },
}

/// berth has no pod network yet: pods get a namespace with loopback only.
pub fn readiness() -> NetworkReadiness {
    NetworkReadiness::NotReady {
        reason: "NetworkNotImplemented".to_string(),
        message: "berth's pod network is not implemented yet: pods would get loopback only"
            .to_string(),
    }
}
