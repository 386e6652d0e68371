//! berth: a container engine for one node. `berthd` serves the Kubernetes CRI
//! over a unix socket and runs pods and containers on Linux primitives.

pub mod cni;
pub mod config;
pub mod cri;
pub mod daemon;
pub mod image;
pub mod monitor;
pub mod procs;
pub mod runtime;
pub mod store;
pub mod stream;
