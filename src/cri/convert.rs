//! Translation between CRI messages and the runtime's own types, and runtime
//! errors to gRPC statuses. No decisions are made here.

use std::collections::{BTreeMap, HashMap};

use k8s_cri::v1 as cri;
use tonic::Status;

use crate::cni::NetworkError;
use crate::runtime::cdi::CdiError;
use crate::runtime::container::{
    self, ContainerConfig, ContainerState, Device, GroupsPolicy, Propagation, SeccompChoice,
};
use crate::runtime::pod::{
    DnsConfig, IdMapping, NamespaceMode, NamespaceOptions, PodConfig, PodRecord, PodState,
    PortMapping, UserNamespaceOptions,
};
use crate::runtime::resources::Resources;
use crate::runtime::{ContainerView, RuntimeError};

pub fn runtime_status(e: RuntimeError) -> Status {
    let message = e.to_string();
    match e {
        RuntimeError::InvalidArgument(_) => Status::invalid_argument(message),
        RuntimeError::NotFound(_) => Status::not_found(message),
        RuntimeError::AlreadyExists(_) => Status::already_exists(message),
        RuntimeError::FailedPrecondition(_) => Status::failed_precondition(message),
        RuntimeError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
        RuntimeError::Network(NetworkError::HostPortTaken { .. }) => {
            Status::already_exists(message)
        }
        RuntimeError::Network(
            NetworkError::InvalidPortMapping(_) | NetworkError::InvalidPodCidr(_),
        ) => Status::invalid_argument(message),
        RuntimeError::Network(NetworkError::AddressesExhausted { .. }) => {
            Status::resource_exhausted(message)
        }
        RuntimeError::Cdi(CdiError::BadName { .. } | CdiError::UnknownDevice { .. }) => {
            Status::invalid_argument(message)
        }
        // The node's spec files, not the request, are at fault.
        RuntimeError::Cdi(_) => Status::failed_precondition(message),
        _ => Status::internal(message),
    }
}

/// kubelet's pod CIDR: subnets separated by commas (one per family on a
/// dual-stack node); empty for none.
pub fn pod_cidrs(text: &str) -> Result<Vec<ipnet::IpNet>, Status> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<ipnet::IpNet>().map_err(|e| {
                Status::invalid_argument(format!("pod CIDR {text:?}: {c:?} is not a CIDR ({e})"))
            })
        })
        .collect()
}

fn sorted(map: &HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn unsorted(map: &BTreeMap<String, String>) -> HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn namespace_mode(value: i32) -> NamespaceMode {
    match cri::NamespaceMode::try_from(value).unwrap_or(cri::NamespaceMode::Pod) {
        cri::NamespaceMode::Pod => NamespaceMode::Pod,
        cri::NamespaceMode::Container => NamespaceMode::Container,
        cri::NamespaceMode::Node => NamespaceMode::Node,
        cri::NamespaceMode::Target => NamespaceMode::Target,
    }
}

fn cri_namespace_mode(mode: NamespaceMode) -> i32 {
    (match mode {
        NamespaceMode::Pod => cri::NamespaceMode::Pod,
        NamespaceMode::Container => cri::NamespaceMode::Container,
        NamespaceMode::Node => cri::NamespaceMode::Node,
        NamespaceMode::Target => cri::NamespaceMode::Target,
    }) as i32
}

fn user_namespace(userns: cri::UserNamespace) -> UserNamespaceOptions {
    let mappings = |list: Vec<cri::IdMapping>| {
        list.into_iter()
            .map(|m| IdMapping {
                container_id: m.container_id,
                host_id: m.host_id,
                length: m.length,
            })
            .collect()
    };
    UserNamespaceOptions {
        mode: namespace_mode(userns.mode),
        uids: mappings(userns.uids),
        gids: mappings(userns.gids),
    }
}

fn cri_user_namespace(userns: &UserNamespaceOptions) -> cri::UserNamespace {
    let mappings = |list: &[IdMapping]| {
        list.iter()
            .map(|m| cri::IdMapping {
                container_id: m.container_id,
                host_id: m.host_id,
                length: m.length,
            })
            .collect()
    };
    cri::UserNamespace {
        mode: cri_namespace_mode(userns.mode),
        uids: mappings(&userns.uids),
        gids: mappings(&userns.gids),
    }
}

pub fn pod_config(
    config: Option<cri::PodSandboxConfig>,
    runtime_handler: String,
) -> Result<PodConfig, Status> {
    let config = config.ok_or_else(|| Status::invalid_argument("no pod sandbox config"))?;
    let metadata = config
        .metadata
        .ok_or_else(|| Status::invalid_argument("no pod sandbox metadata"))?;
    if metadata.name.is_empty() {
        return Err(Status::invalid_argument("pod sandbox metadata has no name"));
    }
    let linux = config.linux.unwrap_or_default();
    let pod_security = linux.security_context.unwrap_or_default();
    let ns = pod_security.namespace_options.clone().unwrap_or_default();
    Ok(PodConfig {
        name: metadata.name,
        namespace: metadata.namespace,
        uid: metadata.uid,
        attempt: metadata.attempt,
        hostname: config.hostname,
        log_directory: config.log_directory,
        dns: config.dns_config.map(|d| DnsConfig {
            servers: d.servers,
            searches: d.searches,
            options: d.options,
        }),
        port_mappings: config
            .port_mappings
            .into_iter()
            .map(|p| PortMapping {
                protocol: cri::Protocol::try_from(p.protocol)
                    .map(|p| p.as_str_name().to_string())
                    .unwrap_or_default(),
                container_port: p.container_port,
                host_port: p.host_port,
                host_ip: p.host_ip,
            })
            .collect(),
        labels: sorted(&config.labels),
        annotations: sorted(&config.annotations),
        cgroup_parent: linux.cgroup_parent,
        sysctls: sorted(&linux.sysctls),
        namespaces: NamespaceOptions {
            network: namespace_mode(ns.network),
            pid: namespace_mode(ns.pid),
            ipc: namespace_mode(ns.ipc),
            target_id: ns.target_id,
            user: ns.userns_options.map(user_namespace),
        },
        runtime_handler,
        privileged: pod_security.privileged,
        resources: linux.resources.map(resources).unwrap_or_default(),
        overhead: linux.overhead.map(resources).unwrap_or_default(),
    })
}

fn pod_metadata(pod: &PodRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: pod.config.name.clone(),
        uid: pod.config.uid.clone(),
        namespace: pod.config.namespace.clone(),
        attempt: pod.config.attempt,
    }
}

fn pod_state(state: PodState) -> i32 {
    (match state {
        PodState::Ready => cri::PodSandboxState::SandboxReady,
        PodState::NotReady => cri::PodSandboxState::SandboxNotready,
    }) as i32
}

pub fn pod_filter_state(value: i32) -> Option<PodState> {
    match cri::PodSandboxState::try_from(value).ok()? {
        cri::PodSandboxState::SandboxReady => Some(PodState::Ready),
        cri::PodSandboxState::SandboxNotready => Some(PodState::NotReady),
    }
}

pub fn pod_sandbox(pod: &PodRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: pod.id.clone(),
        metadata: Some(pod_metadata(pod)),
        state: pod_state(pod.state),
        created_at: pod.created_at,
        labels: unsorted(&pod.config.labels),
        annotations: unsorted(&pod.config.annotations),
        runtime_handler: pod.config.runtime_handler.clone(),
    }
}

pub fn pod_status(pod: &PodRecord) -> cri::PodSandboxStatus {
    let ns = &pod.config.namespaces;
    cri::PodSandboxStatus {
        id: pod.id.clone(),
        metadata: Some(pod_metadata(pod)),
        state: pod_state(pod.state),
        created_at: pod.created_at,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: pod.ip.clone().unwrap_or_default(),
            additional_ips: pod
                .additional_ips
                .iter()
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                // kubelet compares these with what it asked for.
                options: Some(cri::NamespaceOption {
                    network: cri_namespace_mode(ns.network),
                    pid: cri_namespace_mode(ns.pid),
                    ipc: cri_namespace_mode(ns.ipc),
                    target_id: ns.target_id.clone(),
                    userns_options: ns.user.as_ref().map(cri_user_namespace),
                }),
            }),
        }),
        labels: unsorted(&pod.config.labels),
        annotations: unsorted(&pod.config.annotations),
        runtime_handler: pod.config.runtime_handler.clone(),
    }
}

fn propagation(value: i32) -> Propagation {
    match cri::MountPropagation::try_from(value)
        .unwrap_or(cri::MountPropagation::PropagationPrivate)
    {
        cri::MountPropagation::PropagationPrivate => Propagation::Private,
        cri::MountPropagation::PropagationHostToContainer => Propagation::HostToContainer,
        cri::MountPropagation::PropagationBidirectional => Propagation::Bidirectional,
    }
}

fn cri_propagation(p: Propagation) -> i32 {
    (match p {
        Propagation::Private => cri::MountPropagation::PropagationPrivate,
        Propagation::HostToContainer => cri::MountPropagation::PropagationHostToContainer,
        Propagation::Bidirectional => cri::MountPropagation::PropagationBidirectional,
    }) as i32
}

fn id_value(v: Option<&cri::Int64Value>, what: &str) -> Result<Option<u32>, Status> {
    v.map(|v| {
        u32::try_from(v.value)
            .map_err(|_| Status::invalid_argument(format!("{what} {} is out of range", v.value)))
    })
    .transpose()
}

/// The container's config; `pod` supplies namespace modes the container leaves out.
// Older kubelets still send the deprecated seccomp and AppArmor path fields.
#[allow(deprecated)]
pub fn container_config(
    config: Option<cri::ContainerConfig>,
    pod: Option<&cri::PodSandboxConfig>,
) -> Result<ContainerConfig, Status> {
    let config = config.ok_or_else(|| Status::invalid_argument("no container config"))?;
    let metadata = config
        .metadata
        .ok_or_else(|| Status::invalid_argument("no container metadata"))?;
    if metadata.name.is_empty() {
        return Err(Status::invalid_argument("container metadata has no name"));
    }
    let image = config
        .image
        .ok_or_else(|| Status::invalid_argument("no image in the container config"))?;
    if image.image.is_empty() {
        return Err(Status::invalid_argument("no image in the container config"));
    }
    let linux = config.linux.unwrap_or_default();
    let config_resources = linux.resources.unwrap_or_default();
    let security = linux.security_context.unwrap_or_default();
    let container_ns = security
        .namespace_options
        .clone()
        .or_else(|| {
            pod.and_then(|p| p.linux.as_ref())
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.namespace_options.clone())
        })
        .unwrap_or_default();
    check_lsm(
        security.apparmor.as_ref(),
        &security.apparmor_profile,
        security.selinux_options.as_ref(),
    )?;
    if security.run_as_group.is_some()
        && security.run_as_user.is_none()
        && security.run_as_username.is_empty()
    {
        return Err(Status::invalid_argument(
            "run_as_group needs run_as_user or run_as_username",
        ));
    }
    Ok(ContainerConfig {
        name: metadata.name,
        attempt: metadata.attempt,
        user_specified_image: if image.user_specified_image.is_empty() {
            image.image.clone()
        } else {
            image.user_specified_image
        },
        image: image.image,
        command: config.command,
        args: config.args,
        working_dir: config.working_dir,
        envs: config
            .envs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect(),
        mounts: config
            .mounts
            .into_iter()
            .map(|m| container::Mount {
                container_path: m.container_path,
                host_path: m.host_path,
                readonly: m.readonly,
                recursive_read_only: m.recursive_read_only,
                selinux_relabel: m.selinux_relabel,
                propagation: propagation(m.propagation),
            })
            .collect(),
        labels: sorted(&config.labels),
        annotations: sorted(&config.annotations),
        log_path: config.log_path,
        stdin: config.stdin,
        stdin_once: config.stdin_once,
        tty: config.tty,
        run_as_user: id_value(security.run_as_user.as_ref(), "run_as_user")?,
        run_as_username: security.run_as_username,
        run_as_group: id_value(security.run_as_group.as_ref(), "run_as_group")?,
        supplemental_groups: security
            .supplemental_groups
            .iter()
            .map(|g| {
                u32::try_from(*g).map_err(|_| {
                    Status::invalid_argument(format!("supplemental group {g} is out of range"))
                })
            })
            .collect::<Result<_, _>>()?,
        readonly_rootfs: security.readonly_rootfs,
        privileged: security.privileged,
        resources: resources(config_resources),
        pid_mode: namespace_mode(container_ns.pid),
        pid_target: container_ns.target_id,
        add_capabilities: security
            .capabilities
            .as_ref()
            .map(|c| c.add_capabilities.clone())
            .unwrap_or_default(),
        drop_capabilities: security
            .capabilities
            .as_ref()
            .map(|c| c.drop_capabilities.clone())
            .unwrap_or_default(),
        add_ambient_capabilities: security
            .capabilities
            .as_ref()
            .map(|c| c.add_ambient_capabilities.clone())
            .unwrap_or_default(),
        no_new_privs: security.no_new_privs,
        masked_paths: security.masked_paths.clone(),
        readonly_paths: security.readonly_paths.clone(),
        seccomp: seccomp(security.seccomp.as_ref(), &security.seccomp_profile_path)?,
        groups_policy: match cri::SupplementalGroupsPolicy::try_from(
            security.supplemental_groups_policy,
        ) {
            Ok(cri::SupplementalGroupsPolicy::Strict) => GroupsPolicy::Strict,
            _ => GroupsPolicy::Merge,
        },
        devices: config
            .devices
            .into_iter()
            .map(|d| Device {
                container_path: d.container_path,
                host_path: d.host_path,
                permissions: d.permissions,
            })
            .collect(),
        cdi_devices: config.cdi_devices.into_iter().map(|d| d.name).collect(),
    })
}

fn container_metadata(c: &ContainerView) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: c.record.config.name.clone(),
        attempt: c.record.config.attempt,
    }
}

fn container_state(state: ContainerState) -> i32 {
    (match state {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown,
    }) as i32
}

pub fn container_filter_state(value: i32) -> Option<ContainerState> {
    Some(match cri::ContainerState::try_from(value).ok()? {
        cri::ContainerState::ContainerCreated => ContainerState::Created,
        cri::ContainerState::ContainerRunning => ContainerState::Running,
        cri::ContainerState::ContainerExited => ContainerState::Exited,
        cri::ContainerState::ContainerUnknown => ContainerState::Unknown,
    })
}

fn image_spec(c: &ContainerView) -> cri::ImageSpec {
    cri::ImageSpec {
        image: c.record.config.user_specified_image.clone(),
        user_specified_image: c.record.config.user_specified_image.clone(),
        ..Default::default()
    }
}

pub fn container(c: &ContainerView, image_ref: &str) -> cri::Container {
    cri::Container {
        id: c.record.id.clone(),
        pod_sandbox_id: c.record.pod_id.clone(),
        metadata: Some(container_metadata(c)),
        image: Some(image_spec(c)),
        image_ref: image_ref.to_string(),
        state: container_state(c.state()),
        created_at: c.record.created_at,
        labels: unsorted(&c.record.config.labels),
        annotations: unsorted(&c.record.config.annotations),
        image_id: c.record.image_id.clone(),
    }
}

pub fn container_status(c: &ContainerView, image_ref: &str) -> cri::ContainerStatus {
    let s = &c.status;
    cri::ContainerStatus {
        id: c.record.id.clone(),
        metadata: Some(container_metadata(c)),
        state: container_state(c.state()),
        created_at: c.record.created_at,
        started_at: s.started_at,
        finished_at: s.finished_at,
        exit_code: s.exit_code,
        image: Some(image_spec(c)),
        image_ref: image_ref.to_string(),
        reason: s.reason.clone(),
        message: s.message.clone(),
        labels: unsorted(&c.record.config.labels),
        annotations: unsorted(&c.record.config.annotations),
        mounts: c
            .record
            .config
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                selinux_relabel: m.selinux_relabel,
                propagation: cri_propagation(m.propagation),
                recursive_read_only: m.recursive_read_only,
                ..Default::default()
            })
            .collect(),
        log_path: c.record.log_path.clone(),
        resources: Some(cri_resources(&c.record.config.resources)),
        image_id: c.record.image_id.clone(),
        user: Some(cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: c.record.uid.into(),
                gid: c.record.gid.into(),
                supplemental_groups: c.record.groups.iter().map(|g| (*g).into()).collect(),
            }),
        }),
    }
}

pub fn resources(r: cri::LinuxContainerResources) -> Resources {
    Resources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit_in_bytes: r.memory_limit_in_bytes,
        memory_swap_limit_in_bytes: r.memory_swap_limit_in_bytes,
        cpuset_cpus: r.cpuset_cpus,
        cpuset_mems: r.cpuset_mems,
        oom_score_adj: r.oom_score_adj,
        hugepage_limits: r
            .hugepage_limits
            .into_iter()
            .map(|h| (h.page_size, h.limit))
            .collect(),
        unified: r.unified.into_iter().collect(),
    }
}

fn cri_resources(r: &Resources) -> cri::ContainerResources {
    cri::ContainerResources {
        linux: Some(cri::LinuxContainerResources {
            cpu_period: r.cpu_period,
            cpu_quota: r.cpu_quota,
            cpu_shares: r.cpu_shares,
            memory_limit_in_bytes: r.memory_limit_in_bytes,
            oom_score_adj: r.oom_score_adj,
            cpuset_cpus: r.cpuset_cpus.clone(),
            cpuset_mems: r.cpuset_mems.clone(),
            hugepage_limits: r
                .hugepage_limits
                .iter()
                .map(|(page_size, limit)| cri::HugepageLimit {
                    page_size: page_size.clone(),
                    limit: *limit,
                })
                .collect(),
            unified: r.unified.clone().into_iter().collect(),
            memory_swap_limit_in_bytes: r.memory_swap_limit_in_bytes,
        }),
        windows: None,
    }
}

/// The seccomp profile asked for, by the field or by the deprecated path.
fn seccomp(profile: Option<&cri::SecurityProfile>, path: &str) -> Result<SeccompChoice, Status> {
    use cri::security_profile::ProfileType;
    if let Some(p) = profile {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(SeccompChoice::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(SeccompChoice::Unconfined),
            Ok(ProfileType::Localhost) if !p.localhost_ref.is_empty() => {
                Ok(SeccompChoice::Localhost(p.localhost_ref.clone()))
            }
            Ok(ProfileType::Localhost) => Err(Status::invalid_argument(
                "seccomp profile type Localhost needs a localhost_ref",
            )),
            Err(_) => Err(Status::invalid_argument(format!(
                "unknown seccomp profile type {}",
                p.profile_type
            ))),
        };
    }
    match path {
        "" | "unconfined" => Ok(SeccompChoice::Unconfined),
        "runtime/default" | "docker/default" => Ok(SeccompChoice::RuntimeDefault),
        other => match other.strip_prefix("localhost/") {
            Some(file) => Ok(SeccompChoice::Localhost(file.to_string())),
            None => Err(Status::invalid_argument(format!(
                "unknown seccomp profile path {other:?}"
            ))),
        },
    }
}

/// AppArmor and SELinux: this host has neither, so a request that needs one
/// is refused; unconfined, runtime default and empty ones are accepted.
fn check_lsm(
    apparmor: Option<&cri::SecurityProfile>,
    apparmor_profile: &str,
    selinux: Option<&cri::SeLinuxOption>,
) -> Result<(), Status> {
    use cri::security_profile::ProfileType;
    let apparmor_host = std::path::Path::new("/sys/kernel/security/apparmor").exists();
    let wants_apparmor = match apparmor {
        Some(p) => ProfileType::try_from(p.profile_type) == Ok(ProfileType::Localhost),
        None => apparmor_profile.starts_with("localhost/"),
    };
    if wants_apparmor && !apparmor_host {
        return Err(Status::invalid_argument(
            "an AppArmor profile was requested, but AppArmor is not enabled on this host",
        ));
    }
    let selinux_host = std::path::Path::new("/sys/fs/selinux/enforce").exists();
    let wants_selinux = selinux.is_some_and(|o| {
        !(o.user.is_empty() && o.role.is_empty() && o.r#type.is_empty() && o.level.is_empty())
    });
    if wants_selinux && !selinux_host {
        return Err(Status::invalid_argument(
            "SELinux options were requested, but SELinux is not enabled on this host",
        ));
    }
    Ok(())
}
