//! The per-container monitor and container init, driven the way berthd
//! drives them: a bundle made by hand (busybox rootfs unpacked from the
//! fixture layers, a hand-written OCI spec, monitor.json, own cgroups), the
//! real `berthd monitor` and `berthd exec-in`, checked through the control
//! socket, status.json, the CRI log and /proc. Needs root.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth::monitor::{
    self, ContainerState, MonitorConnection, MonitorError, MonitorStatus, exec_sync,
};
use common::fixtures::{self, Fixture};
use serde_json::{Value, json};

const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");
const WAIT: Duration = Duration::from_secs(20);

/// A container bundle with its rootfs, log dir and cgroups; on drop checks
/// that no process is left, then removes cgroups, pinned namespaces and files.
struct Bundle {
    dir: tempfile::TempDir,
    cgroups: Vec<PathBuf>,
    pinned: Vec<PathBuf>,
    pids: Vec<i32>,
}

impl Bundle {
    fn new() -> Bundle {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the monitor tests need root"
        );
        let dir = tempfile::Builder::new()
            .prefix("berth-monitor-")
            .tempdir()
            .expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        fs::create_dir(&rootfs).expect("mkdir rootfs");
        for layer in &fixtures::info(Fixture::BusyboxLatest).layers {
            let hex = layer.trim_start_matches("sha256:");
            let blob = fixtures::layout().join("blobs/sha256").join(hex);
            let status = Command::new("tar")
                .arg("xzf")
                .arg(&blob)
                .arg("-C")
                .arg(&rootfs)
                .status()
                .expect("run tar");
            assert!(status.success(), "untar {}", blob.display());
        }
        fs::write(dir.path().join("hostname"), "from-bind\n").expect("write hostname");
        let name = dir
            .path()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let memory_parent = fs::read_to_string("/proc/self/cgroup")
            .expect("read /proc/self/cgroup")
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .unwrap_or_else(|| "/".into());
        let cgroups = vec![
            PathBuf::from("/sys/fs/cgroup/pids").join(&name),
            Path::new("/sys/fs/cgroup/memory")
                .join(memory_parent.trim_start_matches('/'))
                .join(&name),
        ];
        for cg in &cgroups {
            fs::create_dir(cg).unwrap_or_else(|e| panic!("mkdir {}: {e}", cg.display()));
        }
        Bundle {
            dir,
            cgroups,
            pinned: Vec::new(),
            pids: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.path().join("logs/ctr/0.log")
    }

    /// A namespace of a helper process bind-mounted on a file, like a pod's.
    fn pin(&mut self, kind: &str, setup: &[&str]) -> PathBuf {
        let file = self.path().join(format!("ns-{kind}"));
        fs::write(&file, "").expect("create ns file");
        let status = Command::new("unshare")
            .arg(format!("--{kind}={}", file.display()))
            .args(setup)
            .status()
            .expect("run unshare");
        assert!(status.success(), "unshare --{kind}");
        self.pinned.push(file.clone());
        file
    }

    /// Writes config.json (the spec given, completed) and monitor.json.
    fn write(&self, mut spec: Value, tty: bool) {
        spec["root"]["path"] = json!(self.path().join("rootfs"));
        spec["process"]["terminal"] = json!(tty);
        fs::write(
            self.path().join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("spec json"),
        )
        .expect("write config.json");
        let monitor = json!({
            "id": "ctr",
            "log_path": self.log_path(),
            "stdin": false,
            "stdin_once": false,
            "tty": tty,
            "cgroup_procs": self.cgroups.iter().map(|c| c.join("cgroup.procs")).collect::<Vec<_>>(),
        });
        fs::write(
            self.path().join("monitor.json"),
            serde_json::to_vec(&monitor).expect("monitor json"),
        )
        .expect("write monitor.json");
    }

    async fn launch(&mut self) -> Result<MonitorStatus, MonitorError> {
        let bundle = self.path().to_path_buf();
        tokio::task::spawn_blocking(move || monitor::launch(Path::new(BERTHD), &bundle))
            .await
            .expect("join")?;
        let status = monitor::read_status(self.path()).expect("status after create");
        self.pids.push(status.monitor_pid);
        self.pids.push(status.init_pid);
        Ok(status)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = |pid: &i32| Path::new(&format!("/proc/{pid}")).exists();
        while self.pids.iter().any(alive) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left: Vec<i32> = self.pids.iter().copied().filter(alive).collect();
        for pid in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for cg in &self.cgroups {
            let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(cg).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for file in &self.pinned {
            let _ = nix::mount::umount2(file, nix::mount::MntFlags::MNT_DETACH);
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let here = self.path().to_string_lossy().into_owned();
        let mounts: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&here)).collect();
        if !std::thread::panicking() {
            assert!(left.is_empty(), "processes left behind: {left:?}");
            assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        }
    }
}

/// A spec like the one berthd writes, with `args` and a few knobs.
fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": default_caps(),
                "effective": default_caps(),
                "permitted": default_caps(),
            },
            "noNewPrivileges": true,
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024 }],
            "oomScoreAdj": 500,
        },
        "root": { "path": "" },
        "hostname": "testhost",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] },
            { "destination": "/etc/hostname", "type": "bind", "source": "HOSTNAME_FILE", "options": ["rbind", "ro"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"] },
        ],
        "linux": {
            "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }, { "type": "network" }],
            "maskedPaths": ["/proc/kcore", "/proc/kallsyms", "/proc/acpi", "/proc/nonexistent", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/nonexistent"],
            "sysctl": { "net.ipv4.ip_unprivileged_port_start": "80" },
        },
    })
}

fn default_caps() -> Value {
    json!([
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
        "CAP_AUDIT_WRITE"
    ])
}

/// The spec with the hostname bind's source pointing into this bundle.
fn bundle_spec(bundle: &Bundle, args: &[&str]) -> Value {
    let mut s = spec(args);
    for m in s["mounts"].as_array_mut().expect("mounts") {
        if m["source"] == "HOSTNAME_FILE" {
            m["source"] = json!(bundle.path().join("hostname"));
        }
    }
    s
}

async fn connect(bundle: &Bundle) -> MonitorConnection {
    MonitorConnection::connect(bundle.path())
        .await
        .expect("connect to the monitor")
}

/// Waits for the exit notification (EOF) and returns the recorded status.
async fn wait_exit(bundle: &Bundle, watch: MonitorConnection) -> MonitorStatus {
    tokio::time::timeout(WAIT, watch.wait_closed())
        .await
        .expect("the container did not exit in time");
    let status = monitor::read_status(bundle.path()).expect("status");
    assert_eq!(status.state, ContainerState::Exited, "{status:?}");
    assert!(status.finished_at >= status.created_at, "{status:?}");
    status
}

async fn exec(bundle: &Bundle, init_pid: i32, args: &[&str]) -> monitor::ExecOutput {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    exec_sync(
        Path::new(BERTHD),
        bundle.path(),
        init_pid,
        &args,
        Some(WAIT),
    )
    .await
    .unwrap_or_else(|e| panic!("exec {args:?}: {e}"))
}

/// Checks one CRI log line: "<RFC3339Nano> <stream> <P|F> <text>".
fn parse_log_line(line: &str) -> (&str, &str, &str) {
    let mut parts = line.splitn(4, ' ');
    let ts = parts.next().expect("timestamp");
    assert_eq!(ts.len(), "2016-10-06T00:17:09.669794202Z".len(), "{line}");
    assert!(
        ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.',
        "{line}"
    );
    let stream = parts.next().expect("stream");
    let tag = parts.next().expect("tag");
    (stream, tag, parts.next().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_container_waits_then_runs_logs_and_exits_with_its_code() {
    let mut bundle = Bundle::new();
    let script = "echo out1; echo err1 >&2; echo out2; printf partial; exit 3";
    bundle.write(bundle_spec(&bundle, &["sh", "-c", script]), false);
    let created = bundle.launch().await.expect("create");
    assert_eq!(created.state, ContainerState::Created);
    assert!(created.created_at > 0 && created.started_at == 0);

    // Created: the init exists, is in the container's cgroups, has not run sh.
    let init = created.init_pid;
    let cmdline = fs::read(format!("/proc/{init}/cmdline")).expect("init cmdline");
    assert!(
        cmdline.starts_with(BERTHD.as_bytes()),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    let cgroup = fs::read_to_string(format!("/proc/{init}/cgroup")).expect("init cgroup");
    let name = bundle
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        cgroup
            .lines()
            .any(|l| l.contains(":pids:") && l.ends_with(&name)),
        "{cgroup}"
    );
    assert!(
        cgroup
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&name)),
        "{cgroup}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(bundle.log(), "", "nothing runs before start");

    let watch = connect(&bundle).await;
    assert_eq!(watch.protocol_version(), berth::monitor::PROTOCOL_VERSION);
    assert_eq!(watch.init_pid(), init);
    let mut control = connect(&bundle).await;
    assert_eq!(
        control.status().await.expect("status").state,
        ContainerState::Created
    );
    let started = control.start().await.expect("start");
    assert!(started.started_at > 0);
    assert!(
        matches!(
            started.state,
            ContainerState::Running | ContainerState::Exited
        ),
        "{started:?}"
    );

    let status = wait_exit(&bundle, watch).await;
    assert_eq!((status.exit_code, status.signal), (3, 0));
    assert_eq!(status.reason, "Error");
    assert!(!status.oom_killed);

    let log = bundle.log();
    let records: Vec<(&str, &str, &str)> = log.lines().map(parse_log_line).collect();
    let stdout: Vec<_> = records.iter().filter(|r| r.0 == "stdout").collect();
    assert_eq!(
        stdout,
        vec![
            &("stdout", "F", "out1"),
            &("stdout", "F", "out2"),
            &("stdout", "P", "partial")
        ],
        "{log}"
    );
    assert!(records.contains(&("stderr", "F", "err1")), "{log}");
    // The control connection was closed as well.
    assert!(control.status().await.is_err());
    assert!(!bundle.path().join("monitor.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn true_completes_with_zero() {
    let mut bundle = Bundle::new();
    bundle.write(bundle_spec(&bundle, &["true"]), false);
    bundle.launch().await.expect("create");
    let watch = connect(&bundle).await;
    connect(&bundle).await.start().await.expect("start");
    let status = wait_exit(&bundle, watch).await;
    assert_eq!((status.exit_code, status.reason.as_str()), (0, "Completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_executable_is_a_start_error() {
    let mut bundle = Bundle::new();
    bundle.write(bundle_spec(&bundle, &["no-such-command", "x"]), false);
    bundle.launch().await.expect("create");
    let watch = connect(&bundle).await;
    let err = connect(&bundle)
        .await
        .start()
        .await
        .expect_err("start must fail");
    let expected = "exec: \"no-such-command\": executable file not found in $PATH";
    assert!(err.to_string().contains(expected), "{err}");
    let status = wait_exit(&bundle, watch).await;
    assert_eq!(status.exit_code, 128);
    assert_eq!(status.reason, "StartError");
    assert_eq!(status.message, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_setup_fails_create_with_the_reason() {
    let mut bundle = Bundle::new();
    let mut s = bundle_spec(&bundle, &["true"]);
    s["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({ "destination": "/data", "type": "bind", "source": "/nonexistent/berth", "options": ["rbind"] }));
    bundle.write(s, false);
    let err = bundle.launch().await.expect_err("create must fail");
    let text = err.to_string();
    assert!(text.contains("/nonexistent/berth"), "{text}");
    let status = monitor::read_status(bundle.path()).expect("status");
    assert_eq!(
        (status.state, status.reason.as_str()),
        (ContainerState::Exited, "StartError")
    );
    bundle.pids.push(status.monitor_pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_in_runs_inside_and_sigkill_gives_137() {
    let mut bundle = Bundle::new();
    bundle.write(bundle_spec(&bundle, &["sleep", "1000"]), false);
    let created = bundle.launch().await.expect("create");
    let watch = connect(&bundle).await;
    let mut control = connect(&bundle).await;
    assert_eq!(
        control.start().await.expect("start").state,
        ContainerState::Running
    );
    let init = created.init_pid;

    // The monitor's footprint, for the record.
    let rollup = fs::read_to_string(format!("/proc/{}/smaps_rollup", created.monitor_pid))
        .unwrap_or_default();
    let field = |name: &str| {
        rollup
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
            .unwrap_or_default()
    };
    eprintln!(
        "idle monitor: Rss {} kB, Pss {} kB",
        field("Rss:"),
        field("Pss:")
    );

    let out = exec(&bundle, init, &["cat", "/etc/hostname"]).await;
    assert_eq!(
        (out.stdout.as_slice(), out.exit_code),
        (&b"from-bind\n"[..], 0)
    );
    let out = exec(&bundle, init, &["hostname"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "testhost\n");
    let out = exec(&bundle, init, &["id"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("uid=0(root) gid=0(root)"),
        "{out:?}"
    );
    // Inside the container's pid namespace: its PID 1 is the sleep.
    let out = exec(&bundle, init, &["cat", "/proc/1/cmdline"]).await;
    assert_eq!(out.stdout, b"sleep\x001000\x00");
    let out = exec(&bundle, init, &["sh", "-c", "echo to-err >&2; exit 7"]).await;
    assert_eq!(
        (out.stderr.as_slice(), out.exit_code),
        (&b"to-err\n"[..], 7)
    );
    // The container's settings: caps, no_new_privs, rlimits, masks, sysctl.
    let out = exec(
        &bundle,
        init,
        &[
            "sh",
            "-c",
            "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ulimit -n; \
             wc -c < /proc/kallsyms; ls /sys/firmware | wc -l; \
             cat /proc/sys/net/ipv4/ip_unprivileged_port_start; \
             echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo ro-sys; \
             cat /proc/self/oom_score_adj",
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CapEff:\t00000000a80425fb"), "{text}");
    assert!(text.contains("CapBnd:\t00000000a80425fb"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    let tail: Vec<&str> = text.lines().skip(3).collect();
    assert_eq!(
        tail,
        vec!["1024", "0", "0", "80", "ro-sys", "500"],
        "{text}"
    );

    let err = exec_sync(
        Path::new(BERTHD),
        bundle.path(),
        init,
        &["no-such-command".to_string()],
        Some(WAIT),
    )
    .await
    .expect_err("missing command");
    assert!(
        matches!(&err, MonitorError::ExecStart(m) if m.contains("executable file not found")),
        "{err}"
    );
    let started = Instant::now();
    let err = exec_sync(
        Path::new(BERTHD),
        bundle.path(),
        init,
        &["sleep".to_string(), "30".to_string()],
        Some(Duration::from_millis(300)),
    )
    .await
    .expect_err("timeout");
    assert!(matches!(err, MonitorError::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The container sees only its own cgroups, read-only.
    let out = exec(
        &bundle,
        init,
        &[
            "sh",
            "-c",
            "ls /sys/fs/cgroup; touch /sys/fs/cgroup/pids/x 2>/dev/null || echo ro",
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "memory\npids\nro\n");

    // Kill with `all` reaches every process of the cgroup; the init, PID 1
    // of its namespace without a handler, ignores SIGTERM.
    exec(&bundle, init, &["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"]).await;
    let procs = bundle.cgroups[0].join("cgroup.procs");
    let count = || fs::read_to_string(&procs).expect("procs").lines().count();
    assert_eq!(count(), 2);
    control.kill(15, true).await.expect("kill all");
    let deadline = Instant::now() + WAIT;
    while count() != 1 {
        assert!(Instant::now() < deadline, "background process survived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(control.kill(1234, false).await.is_err(), "invalid signal");
    control.kill(9, false).await.expect("kill");
    let status = wait_exit(&bundle, watch).await;
    assert_eq!(
        (status.exit_code, status.signal, status.reason.as_str()),
        (137, 9, "Error")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_log_writes_to_the_new_file_after_a_rename() {
    let mut bundle = Bundle::new();
    let script = "echo one; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo two";
    bundle.write(bundle_spec(&bundle, &["sh", "-c", script]), false);
    let created = bundle.launch().await.expect("create");
    let watch = connect(&bundle).await;
    let mut control = connect(&bundle).await;
    control.start().await.expect("start");
    let deadline = Instant::now() + WAIT;
    while !bundle.log().contains("one") {
        assert!(Instant::now() < deadline, "no output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rotated = bundle.log_path().with_extension("log.1");
    fs::rename(bundle.log_path(), &rotated).expect("rotate");
    control.reopen_log().await.expect("reopen");
    assert!(bundle.log_path().exists(), "reopen creates the file");
    exec(&bundle, created.init_pid, &["touch", "/tmp/go"]).await;
    let status = wait_exit(&bundle, watch).await;
    assert_eq!(status.exit_code, 0);
    let old = fs::read_to_string(&rotated).expect("rotated log");
    assert!(
        old.ends_with(" stdout F one\n") && !old.contains("two"),
        "{old}"
    );
    assert!(
        bundle.log().ends_with(" stdout F two\n"),
        "{}",
        bundle.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_is_the_containers_own_pty_and_logs_as_stdout() {
    let mut bundle = Bundle::new();
    let script = "tty; ls -l /dev/console | cut -c1; echo hi";
    bundle.write(bundle_spec(&bundle, &["sh", "-c", script]), true);
    bundle.launch().await.expect("create");
    let watch = connect(&bundle).await;
    connect(&bundle).await.start().await.expect("start");
    let status = wait_exit(&bundle, watch).await;
    assert_eq!(status.exit_code, 0);
    let log = bundle.log();
    let records: Vec<_> = log.lines().map(parse_log_line).collect();
    assert_eq!(
        records,
        vec![
            ("stdout", "F", "/dev/pts/0"),
            ("stdout", "F", "c"),
            ("stdout", "F", "hi")
        ],
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_namespaces_are_joined_and_the_user_is_set() {
    let mut bundle = Bundle::new();
    let uts = bundle.pin("uts", &["hostname", "pod-host"]);
    let net = bundle.pin("net", &["true"]);
    let mut s = bundle_spec(
        &bundle,
        &[
            "sh",
            "-c",
            "hostname; id; cat /proc/net/dev | wc -l; \
             sed -n 's|^[^ ]* / [^ ]* \\(r[ow]\\).*|root-\\1|p' /proc/self/mounts",
        ],
    );
    s["process"]["user"] = json!({ "uid": 1002, "gid": 1002, "additionalGids": [100, 2000] });
    s["root"]["readonly"] = json!(true);
    s["linux"]["namespaces"] = json!([
        { "type": "pid" }, { "type": "ipc" }, { "type": "mount" },
        { "type": "uts", "path": uts }, { "type": "network", "path": net },
    ]);
    s["linux"]["sysctl"] = json!({});
    bundle.write(s, false);
    bundle.launch().await.expect("create");
    let watch = connect(&bundle).await;
    connect(&bundle).await.start().await.expect("start");
    let status = wait_exit(&bundle, watch).await;
    assert_eq!(status.exit_code, 0, "{}", bundle.log());
    let log = bundle.log();
    let lines: Vec<&str> = log.lines().map(|l| parse_log_line(l).2).collect();
    assert_eq!(lines[0], "pod-host", "{log}");
    assert_eq!(
        lines[1], "uid=1002(user1002) gid=1002(user1002) groups=100(users),2000(extra)",
        "{log}"
    );
    // A fresh network namespace has only lo (2 header lines + lo).
    assert_eq!(lines[2], "3", "{log}");
    assert_eq!(lines[3], "root-ro", "{log}");
    // The pinned namespace files are the ones joined.
    let pinned_net = fs::metadata(&net).expect("net ns").ino();
    assert_ne!(
        pinned_net,
        fs::metadata("/proc/self/ns/net").expect("own ns").ino()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_is_recorded() {
    let mut bundle = Bundle::new();
    let memory = bundle.cgroups[1].clone();
    fs::write(memory.join("memory.limit_in_bytes"), "16777216").expect("set memory limit");
    // The shell keeps all of yes's output.
    bundle.write(
        bundle_spec(&bundle, &["sh", "-c", "x=$(yes); echo never"]),
        false,
    );
    bundle.launch().await.expect("create");
    let watch = connect(&bundle).await;
    connect(&bundle).await.start().await.expect("start");
    let status = wait_exit(&bundle, watch).await;
    assert_eq!((status.exit_code, status.signal), (137, 9), "{status:?}");
    assert!(status.oom_killed, "{status:?}");
    assert_eq!(status.reason, "OOMKilled");
}
