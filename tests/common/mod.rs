//! Shared helpers of the integration tests: a real berthd in a fresh temporary
//! root, a real registry on 127.0.0.1, fixture images, and leak checks.
//! Each test binary uses a part of them, hence the allowance.
#![allow(dead_code)]

pub mod berthd;
pub mod bundle;
pub mod cri_pod;
pub mod cri_stream;
pub mod fixtures;
pub mod host_nat;
pub mod registry;
pub mod token_server;
