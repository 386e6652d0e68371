//! A real berthd for one test: its own temporary root, state dir, socket and
//! host-wide names, a CRI client on its socket, and on drop a stop followed by
//! a check that nothing of the instance is left on the host.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Channel, Endpoint, Uri};

pub const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");

/// Host-wide names of one instance: unique per test process and instance, so
/// tests run in parallel without touching each other's objects.
#[derive(Debug, Clone)]
pub struct InstanceNames {
    pub bridge: String,
    /// A /24 of the instance's own, so parallel bridges never share routes.
    pub subnet: String,
    pub nft_table: String,
    pub cgroup_parent: String,
}

impl InstanceNames {
    fn unique() -> InstanceNames {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names are at most 15 bytes: "bt" + pid + "-" + n fits.
        let tag = format!("{}-{n}", std::process::id() % 1_000_000);
        InstanceNames {
            subnet: format!("10.{}.{}.0/24", 100 + std::process::id() % 50, n % 256),
            bridge: format!("bt{tag}"),
            nft_table: format!("berth_test_{}", tag.replace('-', "_")),
            cgroup_parent: format!("berth-test-{tag}"),
        }
    }
}

/// Options for one berthd; extra YAML is appended to the generated config.
#[derive(Default)]
pub struct BerthdOptions {
    pub extra_config: String,
}

pub struct Berthd {
    child: Option<Child>,
    /// The executable `spawn` runs: this build's berthd unless a test
    /// (the upgrade test) switches it.
    pub exe: PathBuf,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub names: InstanceNames,
    pub log_path: PathBuf,
}

impl Berthd {
    pub fn start() -> Berthd {
        Berthd::start_with(BerthdOptions::default())
    }

    pub fn start_with(options: BerthdOptions) -> Berthd {
        Berthd::start_with_network(options, "")
    }

    /// Like [`Berthd::start_with`], with `network_keys` (YAML lines indented
    /// by two spaces, e.g. `"  mode: cni\n"`) added under `network:`.
    pub fn start_with_network(options: BerthdOptions, network_keys: &str) -> Berthd {
        let mut berthd = Berthd::prepare(options, network_keys);
        berthd.spawn();
        berthd
    }

    /// An instance with its config written and nothing started yet.
    pub fn prepare(options: BerthdOptions, network_keys: &str) -> Berthd {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .expect("temp dir for berthd");
        let names = InstanceNames::unique();
        let root = dir.path().join("root");
        let state_dir = dir.path().join("state");
        let socket = state_dir.join("berth.sock");
        let config_path = dir.path().join("config.yaml");
        let config = format!(
            "root: {root}\nstate_dir: {state}\nsocket: {socket}\nlog_level: berth=debug,info\n\
             cgroup:\n  parent: {cg}\nnetwork:\n  bridge: {br}\n  subnet: {subnet}\n  nft_table: {nft}\n  \
             cni_conf_dir: {cni}\n{network_keys}{extra}",
            root = root.display(),
            state = state_dir.display(),
            socket = socket.display(),
            cg = names.cgroup_parent,
            br = names.bridge,
            nft = names.nft_table,
            subnet = names.subnet,
            cni = dir.path().join("cni").display(),
            extra = options.extra_config,
        );
        std::fs::write(&config_path, config).expect("write berthd config");
        let log_path = dir.path().join("berthd.log");
        Berthd {
            child: None,
            exe: PathBuf::from(BERTHD),
            dir,
            root,
            state_dir,
            socket,
            config_path,
            names,
            log_path,
        }
    }

    /// Starts (or restarts) the berthd process on this instance's config.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "berthd is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open berthd log");
        let child = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn berthd");
        self.child = Some(child);
        self.wait_for_socket();
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "berthd exited with {status} before serving:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("berthd did not serve within 20 s:\n{}", self.log());
    }

    pub fn pid(&self) -> Pid {
        let child = self.child.as_ref().expect("berthd is running");
        Pid::from_raw(child.id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `signal` to this berthd and waits for it to exit.
    pub fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("berthd is running");
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
        wait_bounded(&mut child, Duration::from_secs(30))
    }

    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(connect(&self.socket).await)
    }

    pub async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(connect(&self.socket).await)
    }

    /// Pulls `reference` (a fixture pushed to the test registry).
    pub async fn pull(&self, reference: &str) {
        self.images()
            .await
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: reference.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("pull {reference}: {e}"));
    }

    /// Everything of this instance still on the host; empty when all is clean.
    pub fn leaks(&self) -> Vec<String> {
        leaks_of(&self.root, &self.state_dir, &self.names)
    }
}

impl Drop for Berthd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            wait_bounded(&mut child, Duration::from_secs(30));
        }
        let leaks = self.leaks();
        if leaks.is_empty() {
            return;
        }
        // Whatever the verdict, the next test gets a clean host.
        force_clean(&self.root, &self.state_dir, &self.names);
        if !std::thread::panicking() {
            panic!("berthd left objects on the host:\n  {}", leaks.join("\n  "));
        }
    }
}

/// Waits for `child`, killing it if it outlives `limit`.
fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait().unwrap_or(ExitStatus::from_raw(9));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A tonic channel on a unix socket.
pub async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .expect("static endpoint uri")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to berthd socket")
}

/// Lists what an instance with these paths and names left on the host:
/// mounts under its root or state dir, its bridge, veths, nftables table, cgroups.
pub fn leaks_of(root: &Path, state_dir: &Path, names: &InstanceNames) -> Vec<String> {
    let mut leaks = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        if let Some(point) = line.split(' ').nth(4)
            && (Path::new(point).starts_with(root) || Path::new(point).starts_with(state_dir))
        {
            leaks.push(format!("mount {point}"));
        }
    }
    if Path::new("/sys/class/net").join(&names.bridge).exists() {
        leaks.push(format!("bridge {}", names.bridge));
    }
    if let Ok(out) = Command::new("nft").args(["list", "tables"]).output() {
        let tables = String::from_utf8_lossy(&out.stdout);
        if tables
            .lines()
            .any(|l| l.split_whitespace().last() == Some(names.nft_table.as_str()))
        {
            leaks.push(format!("nftables table {}", names.nft_table));
        }
    }
    if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
        for controller in controllers.flatten() {
            let dir = controller.path().join(&names.cgroup_parent);
            if dir.exists() {
                leaks.push(format!("cgroup {}", dir.display()));
            }
        }
    }
    for (pid, cmdline) in processes_naming(state_dir) {
        leaks.push(format!("process {pid}: {cmdline}"));
    }
    let ns_dir = state_dir.join("ns");
    if let Ok(pins) = std::fs::read_dir(&ns_dir) {
        for pin in pins.flatten() {
            leaks.push(format!("namespace pin {}", pin.path().display()));
        }
    }
    leaks
}

/// Live processes with `state_dir` in their command line: berthd's monitors
/// and pod infra processes name their bundle or pin under it. Zombies have
/// an empty command line.
fn processes_naming(state_dir: &Path) -> Vec<(i32, String)> {
    let state = format!(" {}/", state_dir.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&state) {
            found.push((pid, cmdline.trim_end().to_string()));
        }
    }
    found
}

/// Removes what a failed test's berthd left: kills the processes in its
/// cgroups (containers, pod infra) and its monitors (found by their bundle
/// under `state_dir`), unmounts its mounts, deletes its bridge, veths,
/// nftables table and cgroups.
pub fn force_clean(root: &Path, state_dir: &Path, names: &InstanceNames) {
    for (pid, _) in processes_naming(state_dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let mut cgroups: Vec<PathBuf> = Vec::new();
    for controller in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let top = controller.path().join(&names.cgroup_parent);
        let mut stack = vec![top];
        while let Some(dir) = stack.pop() {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            for child in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if child.path().is_dir() {
                    stack.push(child.path());
                }
            }
            cgroups.push(dir);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(root) || Path::new(p).starts_with(state_dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
    // Deepest cgroups first: a parent goes only once it is empty.
    cgroups.sort_by_key(|c| std::cmp::Reverse(c.components().count()));
    for dir in cgroups {
        let _ = std::fs::remove_dir(dir);
    }
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", &names.nft_table])
        .output();
    if let Ok(links) = std::fs::read_dir(format!("/sys/class/net/{}/brif", names.bridge)) {
        for link in links.flatten() {
            let _ = Command::new("ip")
                .args(["link", "del", &link.file_name().to_string_lossy()])
                .output();
        }
    }
    let _ = Command::new("ip")
        .args(["link", "del", &names.bridge])
        .output();
}
