//! The OCI runtime spec (`config.json`) of a container: berth's defaults, as
//! containerd's, combined with the image config, the pod and the request.

use std::path::Path;

use serde_json::{Value, json};

use super::container::{ContainerConfig, Propagation};
use super::pod::{NamespaceMode, PodPaths, PodRecord};

/// containerd's default capability set.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability the kernel knows; a privileged container gets those
/// berthd holds (the init drops what the bounding set lacks).
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// `NET_ADMIN`, `cap_net_admin` and `CAP_NET_ADMIN` all name one capability.
fn cap_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

/// The capability set, as containerd computes it: ALL in add or drop first,
/// then single additions, then single drops.
pub fn capabilities(c: &ContainerConfig) -> Vec<String> {
    let all = || {
        ALL_CAPABILITIES
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let mut caps: Vec<String> = if c.privileged {
        all()
    } else {
        DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect()
    };
    let is_all = |n: &String| n.eq_ignore_ascii_case("ALL");
    if c.add_capabilities.iter().any(is_all) {
        caps = all();
    }
    if c.drop_capabilities.iter().any(is_all) {
        caps.clear();
    }
    for add in c.add_capabilities.iter().filter(|n| !is_all(n)) {
        let name = cap_name(add);
        if !caps.contains(&name) {
            caps.push(name);
        }
    }
    for drop in c.drop_capabilities.iter().filter(|n| !is_all(n)) {
        let name = cap_name(drop);
        caps.retain(|c| c != &name);
    }
    caps
}

pub const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Everything resolved before the spec is written.
pub struct SpecInput<'a> {
    pub config: &'a ContainerConfig,
    pub pod: &'a PodRecord,
    pub pod_paths: &'a PodPaths,
    pub rootfs: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub cgroup: &'a str,
    /// A PID namespace to join (the pod's or a target container's).
    pub pid_namespace: Option<std::path::PathBuf>,
    /// Device nodes to create: the requested ones, or every host device when privileged.
    pub devices: Vec<Value>,
}

/// `/` must propagate as the container's mounts ask: shared for a
/// bidirectional one, at least slave for host-to-container ones.
fn rootfs_propagation(c: &ContainerConfig) -> &'static str {
    if c.mounts
        .iter()
        .any(|m| m.propagation == Propagation::Bidirectional)
    {
        "rshared"
    } else {
        "rslave"
    }
}

fn bind(destination: &str, source: &str, options: &[&str]) -> Value {
    json!({"destination": destination, "type": "bind", "source": source, "options": options})
}

/// The spec as JSON, ready for `config.json`.
pub fn build(input: &SpecInput) -> Value {
    let c = input.config;
    let pod = &input.pod.config;
    // In a pod's own user namespace, bind mounts are id-mapped through it:
    // files keep their host owners inside (root's stay root's).
    let idmap = input.pod.user_namespace.is_some();
    let mapped_bind = |destination: &str, source: &str, options: &[&str]| {
        let mut options = options.to_vec();
        if idmap {
            options.push("idmap");
        }
        bind(destination, source, &options)
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", if c.privileged { "rw" } else { "ro" }]}),
    ];
    let shm = if pod.namespaces.ipc == NamespaceMode::Node {
        "/dev/shm".to_string()
    } else {
        input.pod_paths.shm().display().to_string()
    };
    // Not id-mapped: a tmpfs berthd made, writable by every uid.
    mounts.push(
        json!({"destination": "/dev/shm", "type": "bind", "source": shm,
        "options": ["rbind", "nosuid", "nodev", "noexec"]}),
    );
    let requested: Vec<&str> = c.mounts.iter().map(|m| m.container_path.as_str()).collect();
    for (dest, source) in [
        ("/etc/hostname", input.pod_paths.hostname()),
        ("/etc/hosts", input.pod_paths.hosts()),
        ("/etc/resolv.conf", input.pod_paths.resolv_conf()),
    ] {
        if !requested.contains(&dest) {
            mounts.push(mapped_bind(
                dest,
                &source.display().to_string(),
                &["rbind", "rw"],
            ));
        }
    }
    for m in &c.mounts {
        let mut options = vec!["rbind"];
        options.push(if m.readonly { "ro" } else { "rw" });
        if m.recursive_read_only {
            options.push("rro");
        }
        options.push(match m.propagation {
            Propagation::Private => "rprivate",
            Propagation::HostToContainer => "rslave",
            Propagation::Bidirectional => "rshared",
        });
        mounts.push(mapped_bind(&m.container_path, &m.host_path, &options));
    }

    let pin = |kind: &str| input.pod_paths.ns.join(kind).display().to_string();
    // The user namespace first: it owns every other one of the pod's.
    let mut namespaces = Vec::new();
    if idmap {
        namespaces.push(json!({"type": "user", "path": pin("user")}));
    }
    namespaces.push(json!({"type": "mount"}));
    if pod.namespaces.network != NamespaceMode::Node {
        namespaces.push(json!({"type": "network", "path": pin("net")}));
    }
    if pod.namespaces.ipc != NamespaceMode::Node {
        namespaces.push(json!({"type": "ipc", "path": pin("ipc")}));
    }
    if pod.namespaces.network != NamespaceMode::Node {
        namespaces.push(json!({"type": "uts", "path": pin("uts")}));
    }
    match (&input.pid_namespace, c.pid_mode) {
        (Some(path), _) => namespaces.push(json!({"type": "pid", "path": path})),
        (None, NamespaceMode::Node) => {}
        (None, _) => namespaces.push(json!({"type": "pid"})),
    }

    let caps = capabilities(c);
    let ambient: Vec<String> = c
        .add_ambient_capabilities
        .iter()
        .map(|n| cap_name(n))
        .collect();
    let mut permitted = caps.clone();
    for a in &ambient {
        if !permitted.contains(a) {
            permitted.push(a.clone());
        }
    }
    let masked: Vec<String> = match (c.privileged, c.masked_paths.is_empty()) {
        (true, _) => vec![],
        (false, true) => MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
        (false, false) => c.masked_paths.clone(),
    };
    let readonly: Vec<String> = match (c.privileged, c.readonly_paths.is_empty()) {
        (true, _) => vec![],
        (false, true) => READONLY_PATHS.iter().map(|s| s.to_string()).collect(),
        (false, false) => c.readonly_paths.clone(),
    };
    let hostname = if pod.hostname.is_empty() {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        pod.hostname.clone()
    };
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": c.tty,
            "user": {"uid": input.uid, "gid": input.gid, "additionalGids": input.groups},
            "args": input.args,
            "env": input.env,
            "cwd": input.cwd,
            "capabilities": {
                "bounding": permitted, "effective": permitted, "permitted": permitted,
                "inheritable": ambient, "ambient": ambient,
            },
            "noNewPrivileges": c.no_new_privs,
            "oomScoreAdj": c.resources.oom_score_adj,
        },
        "root": {"path": input.rootfs, "readonly": c.readonly_rootfs},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": format!("/{}", input.cgroup),
            "maskedPaths": masked,
            "readonlyPaths": readonly,
            "devices": input.devices,
            "rootfsPropagation": rootfs_propagation(c),
        },
        "annotations": c.annotations,
    });
    if let Some(map) = &input.pod.user_namespace {
        let mapping = |m: &super::pod::IdMapping| json!([{"containerID": m.container_id, "hostID": m.host_id, "size": m.length}]);
        spec["linux"]["uidMappings"] = mapping(&map.uids);
        spec["linux"]["gidMappings"] = mapping(&map.gids);
    }
    spec
}
