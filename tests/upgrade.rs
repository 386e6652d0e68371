//! Upgrade: containers started by an older berthd build run on when a newer
//! one takes over the same root and state dir. The older build is built
//! here from the repository's history (`git archive` of UPGRADE_FROM into
//! `target/upgrade/`, kept between runs), started on a fresh instance, and
//! then replaced by this build's berthd, which must adopt its monitors:
//! the running container keeps its pid and its log, exec reaches it, a
//! created container starts, and stops give the right exit codes.
//!
//! The harness's generated config must stay valid for the older build
//! (berthd refuses unknown keys): the test starts it with the keys it has.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::berthd::{Berthd, BerthdOptions};
use common::fixtures::{self, Fixture};
use common::registry::Registry;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use nix::sys::signal::Signal;
use tonic::transport::Channel;

/// The build to upgrade from: the last commit that landed before this test,
/// monitor protocol 2. Move it forward when the monitor protocol or the
/// records change, so the step a real upgrade takes is the one tested.
const UPGRADE_FROM: &str = "9e724333020db1f964d333f3188ebe40e3ede64a";

type Rt = RuntimeServiceClient<Channel>;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// berthd as built from UPGRADE_FROM; built once and kept in `target/upgrade/`.
fn old_berthd() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = repo.join("target/upgrade").join(UPGRADE_FROM);
    let exe = dir.join("build/debug/berthd");
    if exe.exists() {
        return exe;
    }
    let src = dir.join("src");
    if !src.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&src).expect("make the old source dir");
        let archive = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["archive", "--format=tar", UPGRADE_FROM])
            .output()
            .expect("run git archive");
        assert!(
            archive.status.success(),
            "git archive {UPGRADE_FROM} (the repository's history must hold it): {}",
            String::from_utf8_lossy(&archive.stderr)
        );
        let tar = dir.join("src.tar");
        std::fs::write(&tar, &archive.stdout).expect("write the archive");
        run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&src));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let began = Instant::now();
    run(Command::new(cargo)
        .args(["build", "--bin", "berthd", "--target-dir"])
        .arg(dir.join("build"))
        .current_dir(&src));
    println!("built berthd {UPGRADE_FROM} in {:?}", began.elapsed());
    exe
}

fn pod_config(logs: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "upgraded".to_string(),
            uid: "uid-upgraded".to_string(),
            namespace: "default".to_string(),
            attempt: 0,
        }),
        log_directory: logs.display().to_string(),
        ..Default::default()
    }
}

fn container_config(image: &str, name: &str, script: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..Default::default()
    }
}

/// Writes a line every 0.1 s; exits 143 on SIGTERM (it is no PID 1 here,
/// but sh would otherwise wait for its sleep).
const TICKER: &str =
    "trap 'exit 143' TERM; i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.1; done";

async fn create(rt: &mut Rt, pod: &str, config: &PodSandboxConfig, c: ContainerConfig) -> String {
    rt.create_container(CreateContainerRequest {
        pod_sandbox_id: pod.to_string(),
        config: Some(c),
        sandbox_config: Some(config.clone()),
    })
    .await
    .expect("CreateContainer")
    .into_inner()
    .container_id
}

async fn start(rt: &mut Rt, id: &str) {
    rt.start_container(StartContainerRequest {
        container_id: id.to_string(),
    })
    .await
    .expect("StartContainer");
}

/// State, exit code and the init's host pid (from the verbose info).
async fn status(rt: &mut Rt, id: &str) -> (ContainerStatus, i64) {
    let reply = rt
        .container_status(ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: true,
        })
        .await
        .expect("ContainerStatus")
        .into_inner();
    let pid = reply
        .info
        .get("info")
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
        .and_then(|v| v["pid"].as_i64())
        .unwrap_or(0);
    (reply.status.expect("a status"), pid)
}

fn log_lines(path: &str) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_berthd_adopts_the_monitors_of_an_older_build() {
    let old = tokio::task::spawn_blocking(old_berthd)
        .await
        .expect("build the old berthd");
    let registry = Registry::start().expect("registry");
    let busybox = fixtures::push(&registry, Fixture::BusyboxLatest)
        .expect("push busybox")
        .reference;
    let logs = tempfile::tempdir().expect("log dir");
    let mut berthd = Berthd::prepare(BerthdOptions::default(), "");
    berthd.exe = old.clone();
    tokio::task::block_in_place(|| berthd.spawn());

    berthd
        .images()
        .await
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: busybox.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull busybox with the old build");
    let mut rt = berthd.runtime().await;
    let config = pod_config(logs.path());
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let ticker = create(
        &mut rt,
        &pod,
        &config,
        container_config(&busybox, "ticker", TICKER),
    )
    .await;
    start(&mut rt, &ticker).await;
    let waiting = create(
        &mut rt,
        &pod,
        &config,
        container_config(&busybox, "waiting", "echo started late; exit 3"),
    )
    .await;
    let (before, pid) = status(&mut rt, &ticker).await;
    assert_eq!(before.state, ContainerState::ContainerRunning as i32);
    assert!(pid > 0, "the old build reports the init's pid");
    let monitor_exe = |id: &str| -> PathBuf {
        let status = std::fs::read_to_string(
            berthd
                .state_dir
                .join("containers")
                .join(id)
                .join("status.json"),
        )
        .expect("status.json");
        let v: serde_json::Value = serde_json::from_str(&status).expect("status json");
        let monitor = v["monitor_pid"].as_i64().expect("monitor pid");
        std::fs::read_link(format!("/proc/{monitor}/exe")).expect("the monitor runs")
    };
    assert_eq!(
        monitor_exe(&ticker),
        old,
        "the old build's monitor runs the container"
    );
    drop(rt);

    // The upgrade: the old berthd stops (live restore), the new one starts.
    let stopped = tokio::task::block_in_place(|| berthd.stop_with(Signal::SIGTERM));
    assert!(stopped.success(), "old berthd exits 0: {stopped}");
    berthd.exe = PathBuf::from(common::berthd::BERTHD);
    tokio::task::block_in_place(|| berthd.spawn());
    let mut rt = berthd.runtime().await;

    let (after, pid_after) = status(&mut rt, &ticker).await;
    assert_eq!(after.state, ContainerState::ContainerRunning as i32);
    assert_eq!(pid_after, pid, "the same process runs on");
    assert_eq!(after.started_at, before.started_at);
    let lines = log_lines(&after.log_path);
    let deadline = Instant::now() + Duration::from_secs(5);
    while log_lines(&after.log_path) <= lines + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log_lines(&after.log_path) > lines + 2,
        "the old monitor still writes the log"
    );
    let exec = rt
        .exec_sync(ExecSyncRequest {
            container_id: ticker.clone(),
            cmd: vec!["cat".into(), "/etc/hostname".into()],
            timeout: 10,
        })
        .await
        .expect("ExecSync after the upgrade")
        .into_inner();
    assert_eq!(
        exec.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );

    // The created container starts through the old monitor, and exits.
    start(&mut rt, &waiting).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let waited = loop {
        let (s, _) = status(&mut rt, &waiting).await;
        if s.state == ContainerState::ContainerExited as i32 || Instant::now() >= deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (waited.state, waited.exit_code),
        (ContainerState::ContainerExited as i32, 3),
        "{}: {}",
        waited.reason,
        waited.message
    );
    assert!(
        std::fs::read_to_string(&waited.log_path)
            .unwrap_or_default()
            .contains("started late"),
        "its output is logged"
    );

    rt.stop_container(StopContainerRequest {
        container_id: ticker.clone(),
        timeout: 10,
    })
    .await
    .expect("StopContainer");
    let (stopped, _) = status(&mut rt, &ticker).await;
    assert_eq!(
        (stopped.state, stopped.exit_code),
        (ContainerState::ContainerExited as i32, 143),
        "{}: {}",
        stopped.reason,
        stopped.message
    );
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
    // Dropping the instance stops berthd and fails on anything left behind.
}
