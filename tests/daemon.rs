//! The daemon as a whole: CRI on its socket, Version/Status/RuntimeConfig,
//! explicit UNIMPLEMENTED answers, the root lock, config errors and shutdown.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::berthd::{BERTHD, Berthd};
use k8s_cri::v1::*;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_names_berth_and_cri_v1() {
    let berthd = Berthd::start();
    let reply = berthd
        .runtime()
        .await
        .version(VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(reply.runtime_name, "berth");
    assert_eq!(reply.runtime_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(reply.runtime_api_version, "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_conditions_handlers_and_config() {
    let berthd = Berthd::start();
    let reply = berthd
        .runtime()
        .await
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    let conditions = reply.status.expect("status").conditions;
    for kind in ["RuntimeReady", "NetworkReady"] {
        let c = conditions
            .iter()
            .find(|c| c.r#type == kind)
            .unwrap_or_else(|| panic!("no {kind} condition in {conditions:?}"));
        if !c.status {
            assert!(
                !c.reason.is_empty() && !c.message.is_empty(),
                "{kind} is false without reason and message: {c:?}"
            );
        }
    }
    let default = reply
        .runtime_handlers
        .iter()
        .find(|h| h.name.is_empty())
        .expect("the default handler has the empty name");
    assert!(default.features.is_some());
    assert!(reply.features.is_some());

    let config: serde_json::Value =
        serde_json::from_str(reply.info.get("config").expect("config in verbose info"))
            .expect("config info is JSON");
    assert_eq!(config["stateDir"], berthd.state_dir.display().to_string());
    assert_eq!(config["rootDir"], berthd.root.display().to_string());
    assert_eq!(config["network"]["bridge"], berthd.names.bridge.as_str());

    let terse = berthd
        .runtime()
        .await
        .status(StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner();
    assert!(terse.info.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_config_names_the_cgroupfs_driver() {
    let berthd = Berthd::start();
    let reply = berthd
        .runtime()
        .await
        .runtime_config(RuntimeConfigRequest::default())
        .await
        .expect("RuntimeConfig")
        .into_inner();
    let linux = reply.linux.expect("linux runtime config");
    assert_eq!(linux.cgroup_driver(), CgroupDriver::Cgroupfs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_rpcs_say_so_by_name() {
    let berthd = Berthd::start();
    let err = berthd
        .runtime()
        .await
        .checkpoint_container(CheckpointContainerRequest::default())
        .await
        .expect_err("CheckpointContainer is not implemented");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(
        err.message().contains("CheckpointContainer"),
        "{}",
        err.message()
    );
}

#[test]
fn socket_is_mode_0660() {
    let berthd = Berthd::start();
    let mode = std::fs::metadata(&berthd.socket)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

#[test]
fn a_second_berthd_on_the_same_root_is_refused_naming_the_pid() {
    let berthd = Berthd::start();
    let other_state = berthd.dir.path().join("other-state");
    let out = Command::new(BERTHD)
        .arg("--config")
        .arg(&berthd.config_path)
        .arg("--state-dir")
        .arg(&other_state)
        .arg("--socket")
        .arg(other_state.join("other.sock"))
        .output()
        .expect("run second berthd");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&berthd.pid().to_string()),
        "the refusal names the holder's pid: {stderr}"
    );
    assert!(!other_state.join("other.sock").exists());
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket() {
    let mut berthd = Berthd::start();
    let status = berthd.stop_with(Signal::SIGTERM);
    assert!(status.success(), "berthd exited with {status}");
    assert!(!berthd.socket.exists(), "socket left behind");
    assert!(berthd.log().contains("berthd stopped"));
}

#[test]
fn sigint_exits_zero_and_a_new_berthd_takes_over() {
    let mut berthd = Berthd::start();
    assert!(berthd.stop_with(Signal::SIGINT).success());
    assert!(!berthd.socket.exists());
    berthd.spawn();
    assert!(berthd.socket.exists());
}

#[test]
fn default_config_is_accepted_back_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BERTHD)
        .args(["config", "default"])
        .output()
        .expect("berthd config default");
    assert!(out.status.success());
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, &out.stdout).expect("write config");
    let shown = Command::new(BERTHD)
        .arg("--config")
        .arg(&path)
        .args(["config", "show"])
        .output()
        .expect("berthd config show");
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_bad_config_names_key_and_line_and_berthd_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("berth.sock");
    for (yaml, key, line) in [
        ("root: /tmp/x\nnetwork:\n  brigde: b0\n", "brigde", "line 3"),
        ("network:\n  mtu: huge\n", "mtu", "line 2"),
    ] {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let out = Command::new(BERTHD)
            .arg("--config")
            .arg(&path)
            .arg("--socket")
            .arg(&socket)
            .output()
            .expect("run berthd");
        assert!(!out.status.success(), "{yaml} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key) && stderr.contains(line), "{stderr}");
        assert!(!socket.exists());
    }
}

#[test]
fn the_systemd_driver_without_systemd_as_init_is_refused_naming_the_key() {
    if std::path::Path::new("/run/systemd/system").exists() {
        eprintln!("skipped: systemd is this host's init");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    let root = dir.path().join("root");
    let state = dir.path().join("state");
    std::fs::write(
        &path,
        format!(
            "root: {}\nstate_dir: {}\ncgroup:\n  driver: systemd\n  parent: berth.slice\n",
            root.display(),
            state.display()
        ),
    )
    .expect("write config");
    let socket = dir.path().join("berth.sock");
    let out = Command::new(BERTHD)
        .arg("--config")
        .arg(&path)
        .arg("--socket")
        .arg(&socket)
        .output()
        .expect("run berthd");
    assert!(!out.status.success(), "berthd started without systemd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cgroup.driver") && stderr.contains("/run/systemd/system"),
        "{stderr}"
    );
    assert!(!socket.exists() && !state.exists(), "nothing was made");
}
