//! Containers: what a container asks for, the record berth keeps of it, and
//! the Kubernetes rules that combine its command with the image's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Propagation {
    #[default]
    Private,
    HostToContainer,
    Bidirectional,
}

/// A bind mount asked for by the container's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    pub recursive_read_only: bool,
    pub selinux_relabel: bool,
    pub propagation: Propagation,
}

/// A seccomp profile choice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompChoice {
    /// No filter (also what an empty request means, as in Kubernetes).
    #[default]
    Unconfined,
    RuntimeDefault,
    /// A profile file in the OCI seccomp JSON format.
    Localhost(String),
}

/// How supplemental groups are computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupsPolicy {
    /// The image's groups for the user plus the requested ones.
    #[default]
    Merge,
    /// Only the requested groups and the primary group.
    Strict,
}

/// A host device given to the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub container_path: String,
    pub host_path: String,
    /// Of "r", "w", "m".
    pub permissions: String,
}

/// What a container asks for: the front end's request in berth's own terms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    pub name: String,
    pub attempt: u32,
    /// The image as resolved (id, tag or digest).
    pub image: String,
    /// The name the user asked for, reported back as the container's image.
    pub user_specified_image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub envs: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Relative to the pod's log directory.
    pub log_path: String,
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
    pub run_as_user: Option<u32>,
    pub run_as_username: String,
    pub run_as_group: Option<u32>,
    pub supplemental_groups: Vec<u32>,
    pub readonly_rootfs: bool,
    pub privileged: bool,
    pub resources: super::resources::Resources,
    /// The container's PID namespace: the pod's, its own, the node's, or a target's.
    pub pid_mode: super::pod::NamespaceMode,
    /// The container whose PID namespace a TARGET mode joins.
    pub pid_target: String,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    pub add_ambient_capabilities: Vec<String>,
    pub no_new_privs: bool,
    /// Empty means berth's defaults.
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub seccomp: SeccompChoice,
    pub groups_policy: GroupsPolicy,
    pub devices: Vec<Device>,
    /// Fully qualified CDI device names (`vendor.com/class=name`).
    #[serde(default)]
    pub cdi_devices: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// What berth records of a container, in `<state>/containers/<id>/container.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub config: ContainerConfig,
    /// The image id (config digest).
    pub image_id: String,
    /// Chain ids of the image's layers: its rootfs, kept while it exists.
    #[serde(default)]
    pub layers: Vec<crate::image::digest::Digest>,
    /// Unix nanoseconds.
    pub created_at: i64,
    /// Absolute path of the CRI log file; empty if the pod has no log directory.
    pub log_path: String,
    /// The container's cgroup, relative to each hierarchy root.
    pub cgroup: String,
    /// The image's stop signal, or SIGTERM.
    pub stop_signal: i32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Paths of a container under the state and root dirs.
#[derive(Debug, Clone)]
pub struct ContainerPaths {
    /// The bundle: record, OCI spec, monitor files.
    pub bundle: PathBuf,
    /// Writable layer (upper and work dirs), persistent.
    pub layer: PathBuf,
}

impl ContainerPaths {
    pub fn new(state_dir: &Path, root: &Path, id: &str) -> ContainerPaths {
        ContainerPaths {
            bundle: state_dir.join("containers").join(id),
            layer: root.join("containers").join(id),
        }
    }

    pub fn record(&self) -> PathBuf {
        self.bundle.join("container.json")
    }

    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }
}

/// The process to run, by the Kubernetes rules: a command replaces the image's
/// ENTRYPOINT and CMD; args alone replace only its CMD.
pub fn process_args(
    command: &[String],
    args: &[String],
    entrypoint: &[String],
    cmd: &[String],
) -> Vec<String> {
    match (command.is_empty(), args.is_empty()) {
        (false, _) => command.iter().chain(args).cloned().collect(),
        (true, false) => entrypoint.iter().chain(args).cloned().collect(),
        (true, true) => entrypoint.iter().chain(cmd).cloned().collect(),
    }
}

/// The image's env overlaid with the container's, keeping the image's order.
pub fn merge_env(image: &[String], container: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<(String, String)> = image
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    for (key, value) in container {
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => out.push((key.clone(), value.clone())),
        }
    }
    if !out.iter().any(|(k, _)| k == "PATH") {
        out.insert(
            0,
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
        );
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// A signal name from an image config (`SIGUSR1`, `USR1`, `10`) as a number.
pub fn parse_signal(name: &str) -> Option<i32> {
    if name.is_empty() {
        return None;
    }
    if let Ok(n) = name.parse::<i32>() {
        return Some(n);
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kubernetes_command_rules() {
        let ep = v(&["/ep"]);
        let cmd = v(&["default"]);
        assert_eq!(process_args(&[], &[], &ep, &cmd), v(&["/ep", "default"]));
        assert_eq!(process_args(&[], &v(&["a"]), &ep, &cmd), v(&["/ep", "a"]));
        assert_eq!(process_args(&v(&["/c"]), &[], &ep, &cmd), v(&["/c"]));
        assert_eq!(
            process_args(&v(&["/c"]), &v(&["x"]), &ep, &cmd),
            v(&["/c", "x"])
        );
    }

    #[test]
    fn container_env_overrides_the_image() {
        let env = merge_env(
            &v(&["PATH=/bin", "A=1", "B=2"]),
            &[("B".into(), "3".into()), ("C".into(), "4".into())],
        );
        assert_eq!(env, v(&["PATH=/bin", "A=1", "B=3", "C=4"]));
        assert!(merge_env(&[], &[])[0].starts_with("PATH=/usr/local/sbin"));
    }

    #[test]
    fn stop_signals_parse() {
        assert_eq!(parse_signal("SIGUSR1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("usr1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("15"), Some(15));
        assert_eq!(parse_signal(""), None);
        assert_eq!(parse_signal("SIGNOPE"), None);
    }
}
