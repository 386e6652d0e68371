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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::berthd::{Berthd, BerthdOptions};
use common::cri_pod::{container_config, create, pod_config, run_pod, start, status_pid};
use common::fixtures::{self, Fixture};
use common::registry::Registry;
use k8s_cri::v1::*;
use nix::sys::signal::Signal;

/// The build to upgrade from: the last commit that landed before this test,
/// monitor protocol 2. Move it forward when the monitor protocol or the
/// records change, so the step a real upgrade takes is the one tested.
const UPGRADE_FROM: &str = "9e724333020db1f964d333f3188ebe40e3ede64a";

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

/// Writes a line every 0.1 s; exits 143 on SIGTERM (it is no PID 1 here,
/// but sh would otherwise wait for its sleep).
const TICKER: &str =
    "trap 'exit 143' TERM; i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.1; done";

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

    berthd.pull(&busybox).await;
    let mut rt = berthd.runtime().await;
    let config = pod_config("default", "upgraded", logs.path(), Vec::new());
    let pod = run_pod(&mut rt, &config).await;
    let ticker = create(
        &mut rt,
        &pod,
        &config,
        &container_config(&busybox, "ticker", &["sh", "-c", TICKER]),
    )
    .await
    .expect("create the ticker");
    start(&mut rt, &ticker).await;
    let waiting = create(
        &mut rt,
        &pod,
        &config,
        &container_config(
            &busybox,
            "waiting",
            &["sh", "-c", "echo started late; exit 3"],
        ),
    )
    .await
    .expect("create the waiting container");
    let (before, pid) = status_pid(&mut rt, &ticker).await.expect("status");
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

    let (after, pid_after) = status_pid(&mut rt, &ticker).await.expect("status");
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
        let (s, _) = status_pid(&mut rt, &waiting).await.expect("status");
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
    let (stopped, _) = status_pid(&mut rt, &ticker).await.expect("status");
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
