//! A container bundle made by hand, as berthd makes one, for tests that drive
//! the real `berthd monitor` and `berthd exec-in` without a berthd: a rootfs
//! of Debian's static busybox plus any files a test adds, a spec like
//! berthd's, monitor.json without cgroups. On drop it checks that no process
//! and no mount is left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::monitor::{self, MonitorConnection, MonitorError, MonitorStatus};
use serde_json::{Value, json};

pub const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");
/// Debian's `busybox-static`.
const BUSYBOX_STATIC: &str = "/bin/busybox";

pub struct Bundle {
    dir: tempfile::TempDir,
    pids: Vec<i32>,
}

impl Bundle {
    /// A bundle whose rootfs has /bin/busybox and a few of its applets.
    pub fn new(prefix: &str) -> Bundle {
        assert!(nix::unistd::geteuid().is_root(), "bundle tests need root");
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        for sub in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
            fs::create_dir_all(rootfs.join(sub)).expect("mkdir rootfs");
        }
        fs::copy(BUSYBOX_STATIC, rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "sleep", "true", "cat", "grep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("symlink applet");
        }
        Bundle {
            dir,
            pids: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.path().join("rootfs")
    }

    pub fn log_path(&self) -> PathBuf {
        self.path().join("logs/ctr/0.log")
    }

    /// Copies an executable into the rootfs's /bin.
    pub fn add_program(&self, host: &Path, name: &str) {
        fs::copy(host, self.rootfs().join("bin").join(name)).expect("copy program");
    }

    /// Writes config.json (the spec given, its root set) and monitor.json.
    pub fn write(&self, mut spec: Value) {
        spec["root"]["path"] = json!(self.rootfs());
        fs::write(
            self.path().join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("spec json"),
        )
        .expect("write config.json");
        let monitor = json!({
            "id": "ctr",
            "log_path": self.log_path(),
            "tty": false,
        });
        fs::write(
            self.path().join("monitor.json"),
            serde_json::to_vec(&monitor).expect("monitor json"),
        )
        .expect("write monitor.json");
    }

    /// Creates the container (the init waits for start).
    pub async fn launch(&mut self) -> Result<MonitorStatus, MonitorError> {
        let bundle = self.path().to_path_buf();
        tokio::task::spawn_blocking(move || monitor::launch(Path::new(BERTHD), &bundle))
            .await
            .expect("join")?;
        let status = monitor::read_status(self.path()).expect("status after create");
        self.pids.push(status.monitor_pid);
        self.pids.push(status.init_pid);
        Ok(status)
    }

    pub async fn connect(&self) -> MonitorConnection {
        MonitorConnection::connect(self.path())
            .await
            .expect("connect to the monitor")
    }

    /// The text of every CRI log line, in order, stdout and stderr mixed.
    pub fn log_text(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let mut text = String::new();
        for line in log.lines() {
            if let Some(rest) = line.splitn(4, ' ').nth(3) {
                text.push_str(rest);
                text.push('\n');
            }
        }
        text
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
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let here = self.path().to_string_lossy().into_owned();
        let mounts: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&here)).collect();
        if !std::thread::panicking() {
            assert!(left.is_empty(), "processes left behind: {left:?}");
            assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        }
    }
}

/// containerd's default capability set.
pub fn default_caps() -> Vec<String> {
    [
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
    ]
    .iter()
    .map(|c| c.to_string())
    .collect()
}

/// A spec like the one berthd writes: new pid, ipc, uts, mount and network
/// namespaces, the default capabilities, running `args` as `uid`.
pub fn spec(args: &[&str], uid: u32, no_new_privileges: bool) -> Value {
    let caps = default_caps();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": uid, "gid": uid },
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "noNewPrivileges": no_new_privileges,
        },
        "root": { "path": "" },
        "hostname": "bundle",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"] },
        ],
        "linux": {
            "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }, { "type": "network" }],
        },
    })
}
