//! The security context and resource limits of containers, seen from inside,
//! through CRI on a real berthd: dropped capabilities (CHOWN, MKNOD, NET_RAW)
//! fail their syscalls, a readonly rootfs and readonly paths refuse writes,
//! masked paths read empty, a memory hog is OOM-killed (by its own limit or
//! its pod's, overhead included), a pids limit on the pod's cgroup parent
//! stops a fork bomb, a device passed in opens while an unlisted one is
//! denied by the device cgroup, and a CDI device of a spec file arrives with
//! its edits.

mod common;

use std::path::{Path, PathBuf};

use common::berthd::BerthdOptions;
use common::cri_pod::{CriNode, create, remove_pod, run_pod, run_to_exit};
use k8s_cri::v1::*;

fn security(c: &mut ContainerConfig) -> &mut LinuxContainerSecurityContext {
    c.linux
        .get_or_insert_default()
        .security_context
        .get_or_insert_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_capability_fails_its_syscall() {
    let node = CriNode::start().await;
    let mut rt = node.runtime().await;
    let pc = node.pod_config("caps");
    let pod = run_pod(&mut rt, &pc).await;
    let script = "touch /tmp/f; chown 1:1 /tmp/f && echo chown=ok; \
                  mknod /tmp/n c 1 3 && echo mknod=ok; \
                  ping -c 1 -W 2 127.0.0.1 > /tmp/ping 2>&1 && echo ping=ok; cat /tmp/ping; true";
    let default = node.container_config("default", script);
    let mut dropped = node.container_config("dropped", script);
    security(&mut dropped).capabilities = Some(Capability {
        drop_capabilities: vec!["CHOWN".into(), "CAP_MKNOD".into(), "net_raw".into()],
        ..Default::default()
    });
    for c in [&default, &dropped] {
        let s = run_to_exit(&mut rt, &pod, &pc, c).await;
        assert_eq!(s.exit_code, 0, "{s:?}");
    }
    let log = node.log(&pc, &default);
    assert!(
        log.contains("chown=ok") && log.contains("mknod=ok") && log.contains("ping=ok"),
        "{log}"
    );
    let log = node.log(&pc, &dropped);
    assert!(!log.contains("=ok"), "{log}");
    assert!(
        log.contains("chown: /tmp/f: Operation not permitted")
            && log.contains("mknod: /tmp/n: Operation not permitted")
            && log.contains("ping: permission denied"),
        "{log}"
    );
    remove_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_rootfs_and_paths_refuse_writes_and_masked_paths_read_empty() {
    let node = CriNode::start().await;
    let mut rt = node.runtime().await;
    let pc = node.pod_config("readonly");
    let pod = run_pod(&mut rt, &pc).await;
    // Both masked files have content on the host (/proc/kcore, the usual
    // example, is not built into this kernel). The write to domainname would succeed (it is the pod's UTS namespace)
    // were /proc/sys not read-only.
    let mut c = node.container_config(
        "ro",
        "touch /newfile; echo root=$?; \
         echo timer_list=$(wc -c < /proc/timer_list) keys=$(wc -c < /proc/keys); \
         echo berth > /proc/sys/kernel/domainname; echo domainname=$?",
    );
    security(&mut c).readonly_rootfs = true;
    let s = run_to_exit(&mut rt, &pod, &pc, &c).await;
    assert_eq!(s.exit_code, 0, "{s:?}");
    let log = node.log(&pc, &c);
    for want in [
        "touch: /newfile: Read-only file system",
        "root=1",
        "timer_list=0 keys=0",
        "can't create /proc/sys/kernel/domainname: Read-only file system",
        "domainname=1",
    ] {
        assert!(log.contains(want), "{want:?} not in:\n{log}");
    }
    remove_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_oom_killed() {
    let node = CriNode::start().await;
    let mut rt = node.runtime().await;
    let pc = node.pod_config("oom");
    let pod = run_pod(&mut rt, &pc).await;
    // The shell keeps all of yes's output.
    let mut c = node.container_config("hog", "x=$(yes); echo never");
    c.linux.get_or_insert_default().resources = Some(LinuxContainerResources {
        memory_limit_in_bytes: 32 << 20,
        ..Default::default()
    });
    let s = run_to_exit(&mut rt, &pod, &pc, &c).await;
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "{s:?}"
    );
    assert!(!node.log(&pc, &c).contains("never"));
    remove_pod(&mut rt, &pod).await;
}

/// A pod cgroup made the way kubelet makes one, below berth's own cgroup
/// parent (so a failed test's leak check finds it); removed on drop, after
/// berth removed its containers' cgroups below it.
struct KubeletCgroup {
    /// Relative to each hierarchy's root.
    rel: String,
}

impl KubeletCgroup {
    fn new(berth_parent: &str, pids_max: u32) -> KubeletCgroup {
        let rel = format!("{berth_parent}/kubepods/pod-pids");
        let cgroup = KubeletCgroup { rel };
        let pids = cgroup.pids_dir();
        std::fs::create_dir_all(&pids).expect("pod cgroup");
        std::fs::write(pids.join("pids.max"), pids_max.to_string()).expect("pids.max");
        cgroup
    }

    fn pids_dir(&self) -> PathBuf {
        Path::new("/sys/fs/cgroup/pids").join(&self.rel)
    }
}

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        let Some((parent, _)) = self.rel.rsplit_once('/') else {
            return;
        };
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten() {
            let Ok(hierarchy) = hierarchy else { continue };
            for rel in [self.rel.as_str(), parent] {
                let _ = std::fs::remove_dir(hierarchy.path().join(rel));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pids_limit_on_the_cgroup_parent_stops_a_fork_bomb() {
    let node = CriNode::start().await;
    let cgroup = KubeletCgroup::new(&node.berthd.names.cgroup_parent, 16);
    let mut rt = node.runtime().await;
    let mut pc = node.pod_config("pids");
    pc.linux.get_or_insert_default().cgroup_parent = format!("/{}", cgroup.rel);
    let pod = run_pod(&mut rt, &pc).await;
    // Its own PID namespace, so the sleepers die with the shell.
    let mut c = node.container_config(
        "bomb",
        "i=0; while [ $i -lt 64 ]; do sleep 60 & i=$((i+1)); echo started=$i; done",
    );
    security(&mut c).namespace_options = Some(NamespaceOption {
        pid: NamespaceMode::Container as i32,
        ..Default::default()
    });
    let s = run_to_exit(&mut rt, &pod, &pc, &c).await;
    let log = node.log(&pc, &c);
    let started: u32 = log
        .lines()
        .filter_map(|l| l.strip_prefix("started="))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0);
    assert!(log.contains("can't fork"), "{s:?}\n{log}");
    // The shell and the pod's infra process count too.
    assert!((1..16).contains(&started), "{started} sleepers:\n{log}");
    // v1 counts a refused fork in the forking task's cgroup: the container's.
    let container = cgroup.pids_dir().join(&s.id);
    let events = std::fs::read_to_string(container.join("pids.events")).expect("events");
    assert!(
        events
            .lines()
            .any(|l| l.strip_prefix("max ").is_some_and(|n| n.trim() != "0")),
        "pids.events: {events}"
    );
    remove_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_passed_in_opens_and_an_unlisted_one_is_denied() {
    let node = CriNode::start().await;
    let mut rt = node.runtime().await;
    let pc = node.pod_config("devices");
    let pod = run_pod(&mut rt, &pc).await;
    // /dev/net/tun (10:200) is outside the standard set, and opening it needs
    // no capability: only the device cgroup decides.
    let script = "true < /dev/mytun && echo mytun=ok; \
                  mknod /dev/tun2 c 10 200 && true < /dev/tun2 && echo tun2=ok; \
                  mknod /dev/fuse2 c 10 229 && true < /dev/fuse2 && echo fuse2=ok; true";
    let mut listed = node.container_config("listed", script);
    listed.devices = vec![Device {
        container_path: "/dev/mytun".into(),
        host_path: "/dev/net/tun".into(),
        permissions: "rw".into(),
    }];
    let unlisted = node.container_config("unlisted", script);
    for c in [&listed, &unlisted] {
        let s = run_to_exit(&mut rt, &pod, &pc, c).await;
        assert_eq!(s.exit_code, 0, "{s:?}");
    }
    let log = node.log(&pc, &listed);
    assert!(log.contains("mytun=ok") && log.contains("tun2=ok"), "{log}");
    assert!(
        !log.contains("fuse2=ok") && log.contains("/dev/fuse2: Operation not permitted"),
        "{log}"
    );
    let log = node.log(&pc, &unlisted);
    assert!(!log.contains("=ok"), "{log}");
    assert!(log.contains("can't open /dev/mytun: no such file"), "{log}");
    assert!(log.contains("/dev/tun2: Operation not permitted"), "{log}");
    remove_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdi_device_arrives_with_its_edits() {
    let cdi = tempfile::tempdir().expect("cdi dir");
    let specs = cdi.path().join("specs");
    let data = cdi.path().join("data");
    std::fs::create_dir_all(&specs).expect("specs dir");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("hello"), "from the vendor\n").expect("data");
    std::fs::write(
        specs.join("tun.yaml"),
        format!(
            "cdiVersion: \"0.6.0\"\nkind: berth.test/net\n\
             containerEdits:\n  env: [BERTH_CDI_VENDOR=berth]\n\
             devices:\n- name: tun0\n  containerEdits:\n    env: [BERTH_CDI_DEVICE=tun0]\n    \
             deviceNodes:\n    - {{path: /dev/cdi-tun, hostPath: /dev/net/tun}}\n    \
             mounts:\n    - {{hostPath: {data}, containerPath: /cdi-data, options: [ro, bind]}}\n",
            data = data.display()
        ),
    )
    .expect("spec");
    let node = CriNode::start_with(BerthdOptions {
        extra_config: format!("cdi:\n  spec_dirs: [{}]\n", specs.display()),
    })
    .await;
    let mut rt = node.runtime().await;
    let pc = node.pod_config("cdi");
    let pod = run_pod(&mut rt, &pc).await;
    let script = "echo env=$BERTH_CDI_VENDOR/$BERTH_CDI_DEVICE; \
                  true < /dev/cdi-tun && echo tun=ok; cat /cdi-data/hello; \
                  touch /cdi-data/x; true";
    let mut by_field = node.container_config("field", script);
    by_field.cdi_devices = vec![CdiDevice {
        name: "berth.test/net=tun0".into(),
    }];
    let mut by_annotation = node.container_config("annotation", script);
    by_annotation
        .annotations
        .insert("cdi.k8s.io/berth-test".into(), "berth.test/net=tun0".into());
    for c in [&by_field, &by_annotation] {
        let s = run_to_exit(&mut rt, &pod, &pc, c).await;
        assert_eq!(s.exit_code, 0, "{s:?}");
        let log = node.log(&pc, c);
        for want in [
            "env=berth/tun0",
            "tun=ok",
            "from the vendor",
            "/cdi-data/x: Read-only file system",
        ] {
            assert!(log.contains(want), "{want:?} not in:\n{log}");
        }
    }
    let mut unknown = node.container_config("unknown", "true");
    unknown.cdi_devices = vec![CdiDevice {
        name: "berth.test/net=tun9".into(),
    }];
    let err = create(&mut rt, &pod, &pc, &unknown)
        .await
        .expect_err("unknown CDI device");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("berth.test/net=tun9"), "{err:?}");
    remove_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_overhead_is_added_to_the_pod_cgroup_berth_makes() {
    let node = CriNode::start().await;
    let mut rt = node.runtime().await;
    let mut pc = node.pod_config("overhead");
    let linux = pc.linux.get_or_insert_default();
    linux.resources = Some(LinuxContainerResources {
        cpu_shares: 512,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        memory_limit_in_bytes: 24 << 20,
        ..Default::default()
    });
    linux.overhead = Some(LinuxContainerResources {
        cpu_shares: 128,
        cpu_quota: 25_000,
        cpu_period: 100_000,
        memory_limit_in_bytes: 8 << 20,
        ..Default::default()
    });
    let pod = run_pod(&mut rt, &pc).await;
    let rel = format!("{}/{pod}", node.berthd.names.cgroup_parent);
    let read = |controller: &str, file: &str| {
        std::fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(&rel)
                .join(file),
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("{file}: {e}"))
    };
    assert_eq!(
        [
            read("cpu", "cpu.shares"),
            read("cpu", "cpu.cfs_quota_us"),
            read("memory", "memory.limit_in_bytes"),
        ],
        ["640".to_string(), "75000".into(), (32u64 << 20).to_string()]
    );
    // A container without limits of its own is held by the pod's.
    let hog = node.container_config("hog", "x=$(yes); echo never");
    let s = run_to_exit(&mut rt, &pod, &pc, &hog).await;
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "{s:?}"
    );
    remove_pod(&mut rt, &pod).await;
}
