//! The daemons under test, each in a temporary directory of its own with its
//! own config file, socket, CNI config dir and pod subnet, so neither picks up
//! the other's objects: berthd (the binary of this build) and Debian's
//! containerd with its CRI plugin. Both are served through the same CRI v1
//! client code. A daemon runs in its own process group (a Ctrl-C reaches only
//! the harness, which then stops it) and in a cgroup of its own (see
//! [`procfs::Hierarchy`]), so whatever it forks and leaves there —
//! containerd's shims — is found by cgroup however it was reparented (berth
//! moves its monitors under its own cgroup parent, which is the daemon's
//! too). It is stopped by its pid; after it exits, anything still in
//! its cgroup or in its pods' cgroups is reported and killed by pid, and its
//! mounts, cgroups, network objects and directory are removed.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{VersionRequest, VersionResponse};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::common::berthd::{InstanceNames, force_clean, leaks_of};
use crate::procfs::{self, Hierarchy};

/// berthd as cargo built it for this benchmark (the release profile).
pub const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");

/// The berthd under test: [`BERTHD`], or the executable named by
/// `BERTH_BENCH_BERTHD` (to compare another build of it, e.g. one linked
/// differently; the table's header names it).
pub fn berthd() -> PathBuf {
    std::env::var_os("BERTH_BENCH_BERTHD").map_or_else(|| PathBuf::from(BERTHD), PathBuf::from)
}
/// containerd from Debian, found on PATH.
pub const CONTAINERD: &str = "containerd";
/// Where Debian's containernetworking-plugins live (Debian's containerd
/// config points there too).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Where containerd 1.6 pins pod network namespaces (a fixed path).
const NETNS_DIR: &str = "/run/netns";
/// Where containerd 1.6 puts its shims' sockets (a fixed path).
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// containerd's CNI network, named in the comments of the plugins' rules.
const CONTAINERD_CNI_NETWORK: &str = "berth-bench-containerd";
/// The cgroup runc puts containerd's CRI containers under when the pod
/// names no cgroup parent: containerd's namespace.
const CONTAINERD_CGROUP: &str = "k8s.io";

/// Pod subnets: neither berth's default (10.66/16) nor the 10.88/16 of
/// containerd's sample config, and not each other's.
pub const BERTH_SUBNET: &str = "10.67.0.0/16";
pub const CONTAINERD_SUBNET: &str = "10.77.0.0/16";

/// How long a daemon may take to answer CRI Version after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SIGTERM may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Berth,
    Containerd,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Berth => "berth",
            Runtime::Containerd => "containerd",
        }
    }

    /// Both runtimes, the one that goes first alternating with `sample`, so
    /// that neither always runs on a page cache or disk the other just warmed.
    pub fn in_turn(sample: usize) -> [Runtime; 2] {
        if sample.is_multiple_of(2) {
            [Runtime::Berth, Runtime::Containerd]
        } else {
            [Runtime::Containerd, Runtime::Berth]
        }
    }
}

/// What every daemon of a run is configured with.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The local registry, "127.0.0.1:PORT": both runtimes pull from it over
    /// plain HTTP, configured as a mirror of itself.
    pub registry: String,
    /// RUST_LOG for berthd (empty: its config's `log_level: info`).
    pub berth_rust_log: String,
    /// Where each daemon's log is copied when it stops (None: not kept).
    pub keep_logs: Option<PathBuf>,
    /// containerd's `sandbox_image` (the pause image in the registry); None
    /// leaves containerd's default, which the image benchmarks never use.
    pub sandbox_image: Option<String>,
    /// Where each daemon gets a cgroup of its own.
    pub hierarchy: Hierarchy,
}

/// One running daemon.
pub struct Daemon {
    pub runtime: Runtime,
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
    root: PathBuf,
    state: PathBuf,
    /// berthd's host-wide names, checked for leftovers after it stops.
    names: Option<InstanceNames>,
    /// containerd's CNI bridge (the bridge plugin never removes it).
    cni_bridge: Option<String>,
    /// The daemon's own cgroup: its path in the hierarchy ("/berth-bench-daemon-…")
    /// and its directory.
    cgroup: String,
    cgroup_dir: PathBuf,
    hierarchy: Hierarchy,
    /// Pod and container ids made through this daemon, to find their
    /// processes and cgroups.
    ids: Mutex<BTreeSet<String>>,
    /// Entries of the fixed host paths containerd uses, before it started.
    netns_before: BTreeSet<String>,
    shim_dir_existed: bool,
    /// The hierarchies' [`CONTAINERD_CGROUP`] directories that existed before.
    cgroups_before: Vec<PathBuf>,
    dir: Option<tempfile::TempDir>,
    /// Where to copy the log on stop, as "<dir>/<runtime>-<n>.log".
    keep_log: Option<PathBuf>,
}

impl Daemon {
    /// Starts `runtime` in a fresh, empty directory and waits until it
    /// answers CRI Version.
    pub async fn start(runtime: Runtime, setup: &Setup) -> Result<Daemon, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{n}", std::process::id() % 100_000);
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-bench-{}-", runtime.name()))
            .tempdir()
            .map_err(|e| format!("temp dir for {}: {e}", runtime.name()))?;
        let path = dir.path().to_path_buf();
        let root = path.join("root");
        let state = path.join("state");
        let log = path.join("daemon.log");
        let cni_conf_dir = path.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf_dir)
            .map_err(|e| format!("mkdir {}: {e}", cni_conf_dir.display()))?;
        let config = path.join("config");
        let cgroup = format!("/berth-bench-daemon-{tag}");
        let cgroup_dir = setup.hierarchy.mount.join(cgroup.trim_start_matches('/'));
        std::fs::create_dir(&cgroup_dir)
            .map_err(|e| format!("mkdir {}: {e}", cgroup_dir.display()))?;
        let procs = CString::new(cgroup_dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|e| format!("cgroup path: {e}"))?;
        let mut cni_bridge = None;
        let (mut command, socket, names) = match runtime {
            Runtime::Berth => {
                let names = InstanceNames {
                    subnet: BERTH_SUBNET.to_string(),
                    bridge: format!("bb{tag}"),
                    nft_table: format!("berth_bench_{}", tag.replace('-', "_")),
                    cgroup_parent: format!("berth-bench-{tag}"),
                };
                let socket = state.join("berth.sock");
                let yaml = berth_config(&root, &state, &socket, &cni_conf_dir, &names, setup);
                write(&config, &yaml)?;
                let mut command = Command::new(berthd());
                command.arg("--config").arg(&config);
                command.env_remove("RUST_LOG");
                if !setup.berth_rust_log.is_empty() {
                    command.env("RUST_LOG", &setup.berth_rust_log);
                }
                (command, socket, Some(names))
            }
            Runtime::Containerd => {
                let socket = state.join("containerd.sock");
                let bridge = format!("bc{tag}");
                write(
                    &cni_conf_dir.join("10-berth-bench.conflist"),
                    &containerd_cni_conflist(&bridge, &path.join("cni/ipam")),
                )?;
                cni_bridge = Some(bridge);
                let toml = containerd_config(&root, &state, &socket, &path, &cni_conf_dir, setup);
                write(&config, &toml)?;
                let mut command = Command::new(CONTAINERD);
                command.arg("--config").arg(&config);
                (command, socket, None)
            }
        };
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| format!("clone log fd: {e}"))?;
        command
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0);
        // SAFETY: prctl, open, write and close are async-signal-safe, and
        // `procs` was allocated before the fork. The daemons are spawned from
        // the harness's main thread (a current-thread runtime), which lives as
        // long as the run, so the signal comes only when the harness itself dies.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Join the daemon's own cgroup: "0" names the writer.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            });
        }
        let netns_before = list_dir(Path::new(NETNS_DIR));
        let shim_dir_existed = Path::new(SHIM_SOCKET_DIR).exists();
        let cgroups_before: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join(CONTAINERD_CGROUP))
            .chain([Path::new("/sys/fs/cgroup").join(CONTAINERD_CGROUP)])
            .filter(|p| p.exists())
            .collect();
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir(&cgroup_dir);
                return Err(format!("spawn {}: {e}", runtime.name()));
            }
        };
        let mut daemon = Daemon {
            runtime,
            pid: child.id(),
            child: Some(child),
            socket,
            log,
            root,
            state,
            names,
            cni_bridge,
            cgroup,
            cgroup_dir,
            hierarchy: setup.hierarchy.clone(),
            ids: Mutex::new(BTreeSet::new()),
            netns_before,
            shim_dir_existed,
            cgroups_before,
            dir: Some(dir),
            keep_log: setup
                .keep_logs
                .as_ref()
                .map(|d| d.join(format!("{}-{n}.log", runtime.name()))),
        };
        daemon.wait_ready().await?;
        Ok(daemon)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no socket yet");
        while Instant::now() < deadline {
            procfs::check_interrupted()?;
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "{} exited with {status} before serving; its log ends:\n{}",
                    self.runtime.name(),
                    self.log_tail(30)
                ));
            }
            if self.socket.exists() {
                match self.version().await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "{} did not answer CRI Version within {READY_TIMEOUT:?} ({last}); its log ends:\n{}",
            self.runtime.name(),
            self.log_tail(30)
        ))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The hierarchy the daemon's own cgroup is in.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Whether a process in `cgroup` (as /proc/<pid>/cgroup names it) was
    /// put there by the daemon for itself rather than for a pod: the
    /// daemon's own cgroup (containerd's shims stay in it), and for berth
    /// anything under its cgroup parent (its monitors move to
    /// `<parent>/monitors`). Ask about pods' and containers' cgroups first.
    pub fn is_daemon_cgroup(&self, cgroup: &str) -> bool {
        cgroup == self.cgroup
            || self.names.as_ref().is_some_and(|n| {
                cgroup
                    .strip_prefix('/')
                    .and_then(|c| c.strip_prefix(n.cgroup_parent.as_str()))
                    .is_some_and(|rest| rest.starts_with('/'))
            })
    }

    /// Remembers a pod or container id made through this daemon: after the
    /// daemon stops, processes and cgroups named by it are looked for.
    pub fn track(&self, id: &str) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
    }

    fn tracked(&self) -> BTreeSet<String> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn images(&self) -> Result<ImageServiceClient<Channel>, String> {
        Ok(ImageServiceClient::new(connect(&self.socket).await?))
    }

    pub async fn runtime_client(&self) -> Result<RuntimeServiceClient<Channel>, String> {
        Ok(RuntimeServiceClient::new(connect(&self.socket).await?))
    }

    /// CRI Version: runtime name and version as the daemon reports them.
    pub async fn version(&self) -> Result<VersionResponse, String> {
        self.runtime_client()
            .await?
            .version(VersionRequest {
                version: "v1".to_string(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|e| format!("CRI Version: {e}"))
    }

    /// The last `lines` lines of the daemon's stdout and stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Bytes the daemon's root takes on disk (allocated blocks, each file once).
    pub fn disk_usage(&self) -> u64 {
        fn walk(dir: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
            use std::os::unix::fs::MetadataExt;
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            let mut total = 0;
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    total += meta.blocks() * 512 + walk(&entry.path(), seen);
                } else if seen.insert((meta.dev(), meta.ino())) {
                    total += meta.blocks() * 512;
                }
            }
            total
        }
        walk(&self.root, &mut Default::default())
    }

    /// Stops the daemon (SIGTERM, SIGKILL after [`STOP_TIMEOUT`]), unmounts
    /// what it left mounted, removes its directory. Returns what it left
    /// behind on the host (mounts, and for berthd its bridge, nftables table
    /// and cgroups): nothing, normally. Async so that the harness's CRI
    /// connections, which live on this thread, close while the daemon drains.
    pub async fn stop(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        if self.child.is_some() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !self.reap(deadline, &mut left) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.clean_up(left)
    }

    /// [`Daemon::stop`] for drop: blocks the thread while it waits.
    fn stop_blocking(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        if self.child.is_some() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !self.reap(deadline, &mut left) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.clean_up(left)
    }

    /// True once the child is gone: exited, or killed after `deadline`.
    fn reap(&mut self, deadline: Instant, left: &mut Vec<String>) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        let name = self.runtime.name();
        match child.try_wait() {
            Ok(None) if Instant::now() < deadline => return false,
            Ok(Some(status)) => {
                if !status.success() {
                    left.push(format!("{name} exited with {status} on SIGTERM"));
                }
            }
            _ => {
                left.push(format!(
                    "{name} outlived SIGTERM by {STOP_TIMEOUT:?}: killed"
                ));
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.child = None;
        true
    }

    /// After the daemon exited: processes it left (in its cgroup or its
    /// pods'), its host-wide objects, mounts, cgroups and directory.
    fn clean_up(&mut self, mut left: Vec<String>) -> Vec<String> {
        let Some(dir) = self.dir.take() else {
            return left;
        };
        if let Some(keep) = &self.keep_log
            && let Err(e) = std::fs::copy(&self.log, keep)
        {
            left.push(format!("copy log to {}: {e}", keep.display()));
        }
        let ids = self.tracked();
        let stray = self.processes_left(&ids);
        for (pid, cgroup) in &stray {
            left.push(format!(
                "process {pid} ({}) in cgroup {cgroup}: killed",
                procfs::comm(*pid)
            ));
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.processes_left(&ids).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(names) = &self.names {
            // Mounts are reported by leaks_of too; they are unmounted below.
            let leaks = leaks_of(&self.root, &self.state, names);
            if !leaks.is_empty() {
                force_clean(&self.root, &self.state, names);
            }
            left.extend(leaks);
        }
        for point in mounts_under(dir.path()) {
            let entry = format!("mount {}", point.display());
            if !left.contains(&entry) {
                left.push(entry);
            }
            if let Err(e) = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
                left.push(format!("unmount {}: {e}", point.display()));
            }
        }
        if self.runtime == Runtime::Containerd {
            left.extend(self.clean_up_containerd(&ids));
        }
        // The cgroup goes once the last process in it is reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.cgroup_dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    if Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    left.push(format!("remove cgroup {}: {e}", self.cgroup_dir.display()));
                }
                _ => {}
            }
            break;
        }
        let path = dir.path().to_path_buf();
        if let Err(e) = dir.close() {
            left.push(format!("remove {}: {e}", path.display()));
        }
        left
    }

    /// Processes in the daemon's own cgroup or in a cgroup named by one of
    /// its pods or containers, with that cgroup.
    fn processes_left(&self, ids: &BTreeSet<String>) -> Vec<(u32, String)> {
        self.hierarchy
            .processes()
            .into_iter()
            .filter(|(pid, cgroup)| {
                *pid != self.pid
                    && (*cgroup == self.cgroup || cgroup.split('/').any(|part| ids.contains(part)))
            })
            .collect()
    }

    /// What containerd and its CNI plugins leave on the host: cgroups of its
    /// pods and containers (and their parent, which runc never removes, when
    /// this daemon made it), network namespaces under /run/netns, its shims'
    /// socket directory; and the CNI bridge, which the bridge plugin never
    /// removes by design (deleted without a report).
    fn clean_up_containerd(&self, ids: &BTreeSet<String>) -> Vec<String> {
        let mut left = Vec::new();
        // With no cgroup parent in the pod config, runc puts containerd's
        // containers at /<namespace>/<id> ("/k8s.io/<id>") of every hierarchy
        // (the directories right under /sys/fs/cgroup, or it on a v2 host).
        let mut hierarchies: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        hierarchies.push(PathBuf::from("/sys/fs/cgroup"));
        for hierarchy in &hierarchies {
            for id in ids {
                let dir = hierarchy.join(CONTAINERD_CGROUP).join(id);
                if dir.join("cgroup.procs").exists() {
                    left.push(format!("cgroup {}", dir.display()));
                    let _ = std::fs::remove_dir(&dir);
                }
            }
            let parent = hierarchy.join(CONTAINERD_CGROUP);
            if !self.cgroups_before.contains(&parent) && parent.join("cgroup.procs").exists() {
                // Made for this daemon's pods; fails (and stays) if in use.
                let _ = std::fs::remove_dir(&parent);
            }
        }
        left.extend(crate::network::remove_cni_rules(CONTAINERD_CNI_NETWORK));
        if let Some(bridge) = &self.cni_bridge
            && Path::new("/sys/class/net").join(bridge).exists()
        {
            let deleted = Command::new("ip")
                .args(["link", "del", bridge])
                .output()
                .is_ok_and(|o| o.status.success());
            if !deleted {
                left.push(format!("bridge {bridge}: cannot delete it"));
            }
        }
        for name in list_dir(Path::new(NETNS_DIR)).difference(&self.netns_before) {
            let pin = Path::new(NETNS_DIR).join(name);
            left.push(format!("network namespace {}", pin.display()));
            let _ = nix::mount::umount2(&pin, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&pin);
        }
        let shim_dir = Path::new(SHIM_SOCKET_DIR);
        if !self.shim_dir_existed && shim_dir.exists() {
            let sockets = list_dir(shim_dir);
            if sockets.is_empty() {
                let _ = std::fs::remove_dir(shim_dir);
                if let Some(parent) = shim_dir.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            } else {
                left.push(format!(
                    "{} shim sockets in {SHIM_SOCKET_DIR}",
                    sockets.len()
                ));
            }
        }
        left
    }
}

/// The names in a directory (empty when it is missing).
fn list_dir(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for leftover in self.stop_blocking() {
            eprintln!("warning: {}: {leftover}", self.runtime.name());
        }
    }
}

/// Mount points at or under `dir`, deepest first (the order to unmount them).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// mountinfo writes space, tab, newline and backslash as \ooo octal.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = field
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// A tonic channel on a unix socket (the URI is a placeholder tonic needs).
pub async fn connect(socket: &Path) -> Result<Channel, String> {
    let path = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .map_err(|e| format!("endpoint: {e}"))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| format!("connect to {}: {e}", socket.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

/// berthd's config: everything in its own directory, its own host-wide
/// names and subnet, the registry as a plain-HTTP mirror of itself. Image
/// durability is berthd's default (blobs and records fsynced, one syncfs for
/// the unpacked files).
fn berth_config(
    root: &Path,
    state: &Path,
    socket: &Path,
    cni_conf_dir: &Path,
    names: &InstanceNames,
    setup: &Setup,
) -> String {
    format!(
        "root: {root}\n\
         state_dir: {state}\n\
         socket: {socket}\n\
         log_level: info\n\
         cgroup:\n  parent: {cgroup}\n\
         network:\n  bridge: {bridge}\n  subnet: {BERTH_SUBNET}\n  nft_table: {table}\n  \
         cni_conf_dir: {cni}\n\
         registries:\n  mirrors:\n    \"{reg}\":\n      endpoint: [\"http://{reg}\"]\n",
        root = root.display(),
        state = state.display(),
        socket = socket.display(),
        cgroup = names.cgroup_parent,
        bridge = names.bridge,
        table = names.nft_table,
        cni = cni_conf_dir.display(),
        reg = setup.registry,
    )
}

/// containerd's config: Debian's (`/etc/containerd/config.toml`: defaults,
/// CNI binaries in /usr/lib/cni) with root, state, sockets, the `opt` plugin,
/// runc's state (`Root`, else /run/containerd/runc) and the CNI config dir
/// moved into the daemon's own directory, the registry as a plain-HTTP
/// mirror of itself, and the benchmark's pause image as `sandbox_image`.
/// Durability is containerd's default (content blobs fsynced on commit, bolt
/// metadata synced); cgroups are cgroupfs (`SystemdCgroup` false), as berth's.
/// `restrict_oom_score_adj`: root on the benchmark's VM lacks
/// CAP_SYS_RESOURCE, so runc cannot give the pause process containerd's
/// oom_score_adj of -998 and every RunPodSandbox fails; restricted, the pause
/// gets containerd's own score (0) instead, which changes nothing measured.
/// Its stream server (Exec URLs) is containerd's default, written out: plain
/// HTTP on 127.0.0.1, port 0 (a free one each start, which the URLs name),
/// as berth's stream server by default.
fn containerd_config(
    root: &Path,
    state: &Path,
    socket: &Path,
    dir: &Path,
    cni_conf_dir: &Path,
    setup: &Setup,
) -> String {
    let sandbox_image = setup
        .sandbox_image
        .as_ref()
        .map(|image| format!("\x20   sandbox_image = \"{image}\"\n"))
        .unwrap_or_default();
    format!(
        "version = 2\n\
         root = \"{root}\"\n\
         state = \"{state}\"\n\
         [grpc]\n  address = \"{socket}\"\n\
         [ttrpc]\n  address = \"{socket}.ttrpc\"\n\
         [plugins]\n\
         \x20 [plugins.\"io.containerd.grpc.v1.cri\"]\n\
         \x20   restrict_oom_score_adj = true\n\
         \x20   stream_server_address = \"127.0.0.1\"\n\
         \x20   stream_server_port = \"0\"\n\
         \x20   enable_tls_streaming = false\n\
         {sandbox_image}\
         \x20   [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         \x20     bin_dir = \"{CNI_BIN_DIR}\"\n\
         \x20     conf_dir = \"{cni}\"\n\
         \x20   [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         \x20     runtime_type = \"io.containerd.runc.v2\"\n\
         \x20     [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
         \x20       Root = \"{runc_root}\"\n\
         \x20   [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{reg}\"]\n\
         \x20     endpoint = [\"http://{reg}\"]\n\
         \x20 [plugins.\"io.containerd.internal.v1.opt\"]\n\
         \x20   path = \"{opt}\"\n",
        root = root.display(),
        state = state.display(),
        socket = socket.display(),
        cni = cni_conf_dir.display(),
        reg = setup.registry,
        opt = dir.join("opt").display(),
        runc_root = dir.join("runc").display(),
    )
}

/// containerd's pod network: a bridge of its own on [`CONTAINERD_SUBNET`],
/// IPAM state in the daemon's directory, egress masqueraded, and `portmap`
/// chained as in containerd's sample config (containerd adds `loopback`
/// itself). The image benchmarks make no pods; it makes containerd's network
/// ready the way a node's would be.
fn containerd_cni_conflist(bridge: &str, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": CONTAINERD_CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": CONTAINERD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}
