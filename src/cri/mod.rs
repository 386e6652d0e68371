//! The CRI front end: RuntimeService and ImageService. It validates and
//! translates requests into calls on `runtime` and `image`, and holds no logic.

mod convert;
pub mod deadline;
mod image_service;
mod runtime_service;
mod stats;

use std::sync::Arc;
use std::time::Instant;

use tonic::Status;

use crate::config::Config;
use crate::image::ImageStore;
use crate::runtime::Runtime;
use crate::runtime::cgroup::CgroupVersion;

/// What the CRI services need of the node; shared by both services.
pub struct CriService {
    config: Arc<Config>,
    cgroup_version: CgroupVersion,
    images: Arc<ImageStore>,
    runtime: Arc<Runtime>,
    /// The streaming server of Exec, Attach and PortForward, once started.
    stream: std::sync::OnceLock<Arc<crate::stream::StreamServer>>,
    /// A handle on itself for tasks that outlive a request (event streams).
    this: std::sync::Weak<CriService>,
}

impl CriService {
    pub fn new(
        config: Arc<Config>,
        cgroup_version: CgroupVersion,
        images: Arc<ImageStore>,
        runtime: Arc<Runtime>,
    ) -> Arc<CriService> {
        Arc::new_cyclic(|this| CriService {
            config,
            cgroup_version,
            images,
            runtime,
            stream: std::sync::OnceLock::new(),
            this: this.clone(),
        })
    }

    /// Hands Exec, Attach and PortForward the streaming server (once).
    pub fn set_stream_server(&self, server: Arc<crate::stream::StreamServer>) {
        let _ = self.stream.set(server);
    }
}

impl CriService {
    fn self_ref(&self) -> std::sync::Weak<CriService> {
        self.this.clone()
    }
}

/// The answer for every RPC berth does not implement yet: never a fake success.
fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!("berth does not implement {rpc} yet"))
}

/// Logs one line per request at debug: method, the ids it names, duration, outcome.
async fn traced<T>(
    method: &'static str,
    id: &str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let start = Instant::now();
    let result = call.await;
    let micros = start.elapsed().as_micros() as u64;
    match &result {
        Ok(_) => tracing::debug!(method, id, micros, "cri request"),
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            tracing::debug!(method, id, micros, "cri request unimplemented")
        }
        Err(status) => {
            tracing::warn!(method, id, micros, code = ?status.code(), error = status.message(), "cri request failed")
        }
    }
    result
}
