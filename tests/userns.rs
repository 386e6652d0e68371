//! Pods with their own user namespace, through CRI on a real berthd: root
//! inside is a mapped host uid outside, the rootfs and volumes are id-mapped,
//! the namespaces the pod owns work from inside (sysfs, net and IPC
//! sysctls), exec joins it, and what CRI forbids is refused.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use common::berthd::Berthd;
use common::cri_pod::{self, CriNode, run_container, run_pod};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

/// The host uid and gid the pod's root maps to, and the range's length.
const HOST_ID: u32 = 300_000;
const LENGTH: u32 = 65_536;

fn user_namespace(uids: Vec<IdMapping>) -> UserNamespace {
    UserNamespace {
        mode: NamespaceMode::Pod as i32,
        gids: uids.clone(),
        uids,
    }
}

fn mapping(container_id: u32) -> IdMapping {
    IdMapping {
        container_id,
        host_id: HOST_ID,
        length: LENGTH,
    }
}

fn pod_config(
    name: &str,
    logs: &std::path::Path,
    userns: UserNamespace,
    pid: NamespaceMode,
) -> PodSandboxConfig {
    PodSandboxConfig {
        linux: Some(LinuxPodSandboxConfig {
            sysctls: HashMap::from([
                (
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "100".to_string(),
                ),
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
            ]),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: pid as i32,
                    userns_options: Some(userns),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..cri_pod::pod_config("default", name, logs, Vec::new())
    }
}

async fn exec(rt: &mut RuntimeServiceClient<Channel>, id: &str, cmd: &str) -> String {
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: id.to_string(),
            cmd: vec!["sh".into(), "-c".into(), cmd.into()],
            timeout: 10,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    assert_eq!(
        out.exit_code,
        0,
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A long-running busybox container with the pod's namespace options, as
/// kubelet passes them.
fn app(image: &str, pc: &PodSandboxConfig) -> ContainerConfig {
    ContainerConfig {
        linux: pc.linux.as_ref().map(|l| LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: l
                    .security_context
                    .as_ref()
                    .and_then(|s| s.namespace_options.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..cri_pod::container_config(image, "app", &["sleep", "3600"])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_namespaced_pod_maps_root_its_rootfs_and_volumes() {
    let node = CriNode::start().await;
    let (berthd, busybox) = (&node.berthd, &node.busybox);
    let mut rt = berthd.runtime().await;
    let status = rt
        .status(StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner();
    assert!(
        status
            .runtime_handlers
            .iter()
            .any(|h| h.features.as_ref().is_some_and(|f| f.user_namespaces)),
        "the default handler advertises user namespaces: {:?}",
        status.runtime_handlers
    );

    let volume = tempfile::tempdir().expect("volume");
    // As kubelet asks by default: a PID namespace per container.
    let pc = pod_config(
        "userns",
        node.logs.path(),
        user_namespace(vec![mapping(0)]),
        NamespaceMode::Container,
    );
    let pod = run_pod(&mut rt, &pc).await;
    let config = ContainerConfig {
        // A terminal needs its own session in the PID 1 the init hands over to.
        tty: true,
        mounts: vec![Mount {
            container_path: "/vol".into(),
            host_path: volume.path().display().to_string(),
            ..Default::default()
        }],
        ..app(busybox, &pc)
    };
    let id = run_container(&mut rt, &pod, &pc, &config).await;

    // Root inside, a mapped uid outside.
    assert_eq!(exec(&mut rt, &id, "id -u").await, "0");
    assert_eq!(
        exec(&mut rt, &id, "cat /proc/self/uid_map")
            .await
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", &HOST_ID.to_string(), &LENGTH.to_string()]
    );
    // The image's root files are the container root's inside; the host sees
    // the rootfs with the mapped owner.
    assert_eq!(exec(&mut rt, &id, "stat -c %u:%g /etc/passwd").await, "0:0");
    let host_passwd = berthd
        .state_dir
        .join("containers")
        .join(&id)
        .join("rootfs/etc/passwd");
    let meta = std::fs::metadata(&host_passwd).expect("rootfs seen from the host");
    assert_eq!((meta.uid(), meta.gid()), (HOST_ID, HOST_ID));
    // The container's own PID 1, and namespaces it owns: sysfs mounts, the
    // pod's net and IPC sysctls were set inside.
    assert_eq!(exec(&mut rt, &id, "cat /proc/1/comm").await, "sleep");
    assert!(exec(&mut rt, &id, "ls /sys/class/net").await.contains("lo"));
    assert_eq!(
        exec(
            &mut rt,
            &id,
            "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shm_rmid_forced"
        )
        .await,
        "100\n1"
    );

    // The volume is id-mapped too: the host's root-owned directory is the
    // container root's, and a file the container writes is its root's
    // inside and, seen through the container's mount from the host, the
    // mapped host uid. On disk it keeps the container's ids (root's: 0), as
    // Kubernetes' id-mapped volumes do.
    assert_eq!(
        exec(
            &mut rt,
            &id,
            "stat -c %u /vol && echo hi > /vol/from-pod && stat -c %u:%g /vol/from-pod"
        )
        .await,
        "0\n0:0"
    );
    let verbose = rt
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .expect("ContainerStatus")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(&verbose.info["info"]).expect("verbose info");
    let pid = info["pid"].as_i64().expect("init pid");
    let through_mount = std::fs::metadata(format!("/proc/{pid}/root/vol/from-pod"))
        .expect("the volume through the container's mount");
    assert_eq!(
        (through_mount.uid(), through_mount.gid()),
        (HOST_ID, HOST_ID)
    );
    let on_disk = std::fs::metadata(volume.path().join("from-pod")).expect("written file");
    assert_eq!((on_disk.uid(), on_disk.gid()), (0, 0));
    assert_eq!(
        std::fs::read_to_string(volume.path().join("from-pod")).expect("read"),
        "hi\n"
    );

    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
    // Dropping berthd checks that no pin, mount or cgroup of the pod is left.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cri_forbids_for_user_namespaces_is_invalid() {
    let berthd = Berthd::start();
    let mut rt = berthd.runtime().await;
    let logs = tempfile::tempdir().expect("log dir");
    let refused = [
        ("two", user_namespace(vec![mapping(0), mapping(0)])),
        ("unmapped-root", user_namespace(vec![mapping(1)])),
        (
            "container",
            UserNamespace {
                mode: NamespaceMode::Container as i32,
                ..Default::default()
            },
        ),
        (
            "target",
            UserNamespace {
                mode: NamespaceMode::Target as i32,
                ..Default::default()
            },
        ),
    ];
    for (name, userns) in refused {
        let err = rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config(
                    name,
                    logs.path(),
                    userns,
                    NamespaceMode::Container,
                )),
                runtime_handler: String::new(),
            })
            .await
            .expect_err(name);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err}");
    }
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "nothing half-made: {pods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pid_namespace_has_a_jailed_infra_owned_by_the_user_namespace() {
    let node = CriNode::start().await;
    let (berthd, busybox) = (&node.berthd, &node.busybox);
    let mut rt = berthd.runtime().await;
    let pc = pod_config(
        "shared",
        node.logs.path(),
        user_namespace(vec![mapping(0)]),
        NamespaceMode::Pod,
    );
    let pod = run_pod(&mut rt, &pc).await;
    let id = run_container(&mut rt, &pod, &pc, &app(busybox, &pc)).await;
    // The container's /proc mounted: the pod's PID namespace is owned by
    // its user namespace. PID 1 is berth's infra, as the pod's root with no
    // capability, and its root (an empty directory) is closed to the pod.
    assert_eq!(exec(&mut rt, &id, "cat /proc/1/comm").await, "berthd");
    let status = exec(&mut rt, &id, "grep -E '^(Uid|CapEff)' /proc/1/status").await;
    let fields: Vec<Vec<&str>> = status
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        fields,
        [
            vec!["Uid:", "0", "0", "0", "0"],
            vec!["CapEff:", "0000000000000000"]
        ]
    );
    assert_eq!(
        exec(
            &mut rt,
            &id,
            "ls /proc/1/root/ >/dev/null 2>&1 || echo closed"
        )
        .await,
        "closed"
    );
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
}
