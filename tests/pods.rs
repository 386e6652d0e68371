//! Pod sandboxes and containers through CRI on a real berthd: namespaces,
//! records, the create/start split, logs, exit codes, exec, stop and removal,
//! name reservation, and a berthd killed while containers run.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cri_pod::{CriNode, create, run_container, run_pod, run_to_exit, status, wait_exited};
use k8s_cri::v1::*;
use nix::sys::signal::Signal;

/// How long a container may take to exit.
const WAIT: Duration = Duration::from_secs(10);

/// A pod labelled `app=<name>`.
fn pod_config(node: &CriNode, name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        ..node.pod_config(name)
    }
}

/// A busybox container labelled `c=<name>`, logging to `<name>/0.log`.
fn container_config(node: &CriNode, name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("c".to_string(), name.to_string())]),
        ..node.busybox_config(name, command)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_names_namespaces_and_idempotence() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let config = pod_config(&node, "web");
    let id = run_pod(&mut rt, &config).await;

    let status = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id[..12].to_string(),
            verbose: false,
        })
        .await
        .expect("status by prefix")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(status.id, id);
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    let options = status
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .expect("namespace options echoed");
    assert_eq!(options.network, NamespaceMode::Pod as i32);

    // The pinned network namespace is a new one with loopback up and eth0 on the bridge.
    let pin = node.berthd.state_dir.join("ns").join(&id).join("net");
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", pin.display()))
        .args(["ip", "-o", "link", "show"])
        .output()
        .expect("nsenter");
    let links = String::from_utf8_lossy(&out.stdout);
    assert!(
        links.contains("lo:") && links.contains("eth0@") && links.lines().count() == 2,
        "{links}"
    );
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    let prefix = node
        .berthd
        .names
        .subnet
        .rsplit_once(".0/")
        .map(|(p, _)| p)
        .expect("subnet");
    assert!(
        ip.starts_with(prefix),
        "pod IP {ip} in {}",
        node.berthd.names.subnet
    );

    let err = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("same name twice");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(
        err.message().contains(&id),
        "names the holder: {}",
        err.message()
    );

    let err = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config(&node, "other")),
            runtime_handler: "kata".into(),
        })
        .await
        .expect_err("unknown handler");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let mut bad_sysctl = pod_config(&node, "sysctl");
    bad_sysctl.linux = Some(LinuxPodSandboxConfig {
        sysctls: HashMap::from([("vm.swappiness".to_string(), "10".to_string())]),
        ..Default::default()
    });
    let err = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(bad_sysctl),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("non-namespaced sysctl");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("vm.swappiness"));

    let listed = rt
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: HashMap::from([("app".to_string(), "web".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .expect("list")
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);

    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("stop");
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("stop again");
    let ready = rt
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                state: Some(PodSandboxStateValue {
                    state: PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("list ready")
        .into_inner()
        .items;
    assert!(ready.is_empty());
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("remove");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("remove again");
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: "f".repeat(64),
    })
    .await
    .expect("stop unknown");
    rt.stop_container(StopContainerRequest {
        container_id: "f".repeat(64),
        timeout: 0,
    })
    .await
    .expect("stop unknown container");
    rt.remove_container(RemoveContainerRequest {
        container_id: "f".repeat(64),
    })
    .await
    .expect("remove unknown container");
    assert!(!pin.exists(), "namespace pin removed");
    let err = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect_err("removed pod");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_create_start_log_and_exit() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "jobs");
    let pod = run_pod(&mut rt, &pc).await;

    // Created is not started: the command has not run.
    let marker = node.logs.path().join("ran");
    let mut cfg = container_config(
        &node,
        "split",
        &["sh", "-c", "echo out; echo err >&2; touch /mnt/ran"],
    );
    cfg.mounts = vec![Mount {
        container_path: "/mnt".into(),
        host_path: node.logs.path().display().to_string(),
        ..Default::default()
    }];
    let id = create(&mut rt, &pod, &pc, &cfg).await.expect("create");
    let created = status(&mut rt, &id).await;
    assert_eq!(created.state, ContainerState::ContainerCreated as i32);
    assert_eq!(created.mounts.len(), 1, "exactly the CRI mounts");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!marker.exists(), "ran before start");
    rt.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("start");
    let exited = wait_exited(&mut rt, &id, WAIT).await;
    assert!(marker.exists());
    assert_eq!((exited.exit_code, exited.reason.as_str()), (0, "Completed"));
    assert!(exited.started_at > 0 && exited.finished_at >= exited.started_at);
    let log = std::fs::read_to_string(&exited.log_path).expect("log file");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    for (line, stream, text) in [
        (
            lines.iter().find(|l| l.contains(" stdout ")),
            "stdout",
            "out",
        ),
        (
            lines.iter().find(|l| l.contains(" stderr ")),
            "stderr",
            "err",
        ),
    ] {
        let parts: Vec<&str> = line.expect("stream line").splitn(4, ' ').collect();
        assert!(
            parts[0].ends_with('Z') && parts[0].contains('T'),
            "RFC3339Nano: {}",
            parts[0]
        );
        assert_eq!(&parts[1..], &[stream, "F", text]);
    }

    let ok = run_to_exit(
        &mut rt,
        &pod,
        &pc,
        &container_config(&node, "expr-ok", &["expr", "3", "+", "5"]),
    )
    .await;
    assert_eq!((ok.exit_code, ok.reason.as_str()), (0, "Completed"));
    let bad = run_to_exit(
        &mut rt,
        &pod,
        &pc,
        &container_config(&node, "expr-bad", &["expr", "three", "+", "5"]),
    )
    .await;
    assert_eq!((bad.exit_code, bad.reason.as_str()), (2, "Error"));

    // An entrypoint that cannot run: StartContainer fails, the container is StartError.
    let id = create(
        &mut rt,
        &pod,
        &pc,
        &container_config(&node, "missing", &["/no/such/binary"]),
    )
    .await
    .expect("create");
    let err = rt
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect_err("cannot exec");
    assert!(
        err.message().contains("no such file") || err.message().contains("not found"),
        "{}",
        err.message()
    );
    let s = wait_exited(&mut rt, &id, WAIT).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (128, "StartError"));

    // Name reservation: same name and attempt in the pod.
    let err = create(
        &mut rt,
        &pod,
        &pc,
        &container_config(&node, "missing", &["true"]),
    )
    .await
    .expect_err("reserved");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(err.message().contains(&id));

    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_sync_stop_and_reopen_log() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "svc");
    let pod = run_pod(&mut rt, &pc).await;
    let id = run_container(
        &mut rt,
        &pod,
        &pc,
        &container_config(
            &node,
            "loop",
            &["sh", "-c", "while true; do echo tick; sleep 0.1; done"],
        ),
    )
    .await;
    assert_eq!(
        status(&mut rt, &id).await.state,
        ContainerState::ContainerRunning as i32
    );

    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "hostname; echo oops >&2; exit 7".into(),
            ],
            timeout: 5,
        })
        .await
        .expect("exec")
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "svc\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.exit_code, 7);
    let err = rt
        .exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: 1,
        })
        .await
        .expect_err("timeout");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);

    let log_path = status(&mut rt, &id).await.log_path;
    let rotated = format!("{log_path}.1");
    std::fs::rename(&log_path, &rotated).expect("rotate");
    rt.reopen_container_log(ReopenContainerLogRequest {
        container_id: id.clone(),
    })
    .await
    .expect("reopen");
    assert!(
        std::path::Path::new(&log_path).exists(),
        "new log file exists when reopen returns"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        std::fs::read_to_string(&log_path)
            .expect("new log")
            .contains("tick")
    );

    let started = Instant::now();
    rt.stop_container(StopContainerRequest {
        container_id: id.clone(),
        timeout: 10,
    })
    .await
    .expect("stop");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "sh dies of SIGTERM at once"
    );
    let s = status(&mut rt, &id).await;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert_eq!(s.exit_code, 128 + libc::SIGTERM);
    rt.remove_container(RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("remove");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_outlive_a_killed_berthd() {
    let mut node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "durable");
    let pod = run_pod(&mut rt, &pc).await;
    let id = run_container(
        &mut rt,
        &pod,
        &pc,
        &container_config(
            &node,
            "ticker",
            &[
                "sh",
                "-c",
                "i=0; while true; do i=$((i+1)); echo n$i; sleep 0.1; done",
            ],
        ),
    )
    .await;
    let short = run_container(
        &mut rt,
        &pod,
        &pc,
        &container_config(&node, "short", &["sh", "-c", "sleep 1; exit 4"]),
    )
    .await;
    let log_path = status(&mut rt, &id).await.log_path;
    drop(rt);

    assert!(!node.berthd.stop_with(Signal::SIGKILL).success());
    let before = std::fs::read_to_string(&log_path)
        .expect("log")
        .lines()
        .count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = std::fs::read_to_string(&log_path)
        .expect("log")
        .lines()
        .count();
    assert!(
        after > before,
        "still logging while berthd is down: {before} -> {after}"
    );

    node.berthd.spawn();
    let mut rt = node.berthd.runtime().await;
    assert_eq!(
        status(&mut rt, &id).await.state,
        ContainerState::ContainerRunning as i32
    );
    let s = status(&mut rt, &short).await;
    assert_eq!(
        (s.state, s.exit_code),
        (ContainerState::ContainerExited as i32, 4),
        "exit while down is recorded"
    );
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_reports_every_container_exited() {
    let mut node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "rebooted");
    let pod = run_pod(&mut rt, &pc).await;
    let id = run_container(
        &mut rt,
        &pod,
        &pc,
        &container_config(&node, "sleeper", &["sleep", "600"]),
    )
    .await;
    let info = rt
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .expect("verbose status")
        .into_inner()
        .info;
    let info: serde_json::Value = serde_json::from_str(&info["info"]).expect("info JSON");
    let init_pid = info["pid"].as_i64().expect("init pid") as i32;
    drop(rt);
    assert!(node.berthd.stop_with(Signal::SIGTERM).success());

    // What a reboot does: every process and mount of the old boot is gone.
    // The monitors go first, or one might record its container's exit.
    let monitor = format!("monitor\0--bundle\0{}", node.berthd.state_dir.display());
    let monitors: Vec<i32> = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&monitor)
        })
        .collect();
    for pid in monitors.iter().chain(std::iter::once(&init_pid)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::berthd::force_clean(
        &node.berthd.root,
        &node.berthd.state_dir,
        &node.berthd.names,
    );
    std::fs::write(node.berthd.state_dir.join("boot_id"), "an-earlier-boot\n").expect("boot id");

    node.berthd.spawn();
    let mut rt = node.berthd.runtime().await;
    let s = status(&mut rt, &id).await;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert!(s.message.contains("rebooted"), "{}", s.message);
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert_eq!(pods[0].state, PodSandboxState::SandboxNotready as i32);
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pid_namespace_and_no_log_directory() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    // critest's default: no namespace options (PID shared by the pod), no log directory.
    let mut pc = pod_config(&node, "shared");
    pc.log_directory = String::new();
    let pod = run_pod(&mut rt, &pc).await;
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let mut cfg = container_config(&node, name, &["sleep", "600"]);
        cfg.log_path = String::new();
        let id = create(&mut rt, &pod, &pc, &cfg).await.expect("create");
        rt.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("start");
        ids.push(id);
    }
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: ids[1].clone(),
            cmd: vec!["ps".into(), "-o".into(), "pid,args".into()],
            timeout: 5,
        })
        .await
        .expect("ps")
        .into_inner();
    let ps = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        ps.matches("sleep 600").count(),
        2,
        "each sees the other: {ps}"
    );
    assert!(
        ps.lines().any(|l| l.trim_start().starts_with("1 ")),
        "a PID 1 in the pod: {ps}"
    );
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_image_keeps_its_layers_while_a_container_uses_them() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "holder");
    let pod = run_pod(&mut rt, &pc).await;
    let id = run_container(
        &mut rt,
        &pod,
        &pc,
        &container_config(&node, "user", &["sleep", "600"]),
    )
    .await;
    node.berthd
        .images()
        .await
        .remove_image(RemoveImageRequest {
            image: Some(ImageSpec {
                image: node.busybox.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("remove the image");
    let snapshots = node.berthd.root.join("snapshots");
    // Garbage collection runs after RemoveImage; give it time to (wrongly) act.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(std::fs::read_dir(&snapshots).expect("snapshots").count() > 0);
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["ls".into(), "/bin/busybox".into()],
            timeout: 5,
        })
        .await
        .expect("exec")
        .into_inner();
    assert_eq!(out.exit_code, 0);
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove pod");
    // Removing the container lets the layers go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&snapshots).expect("snapshots").count() > 0 {
        assert!(
            Instant::now() < deadline,
            "layers collected after the container went"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
