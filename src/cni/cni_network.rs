//! Pod networks made by CNI plugins: the config dir (`network.cni_conf_dir`)
//! watched with inotify for the config in force, plugins run from
//! `network.cni_bin_dirs`, and an attachment cache so DEL gets what ADD had.
//!
//! # Readiness
//!
//! Not ready (reason `NetworkPluginNotReady`, as containerd says it) while
//! the dir holds no valid config, while a plugin of the config is in no
//! plugin dir, or while a 1.1 network's STATUS fails; the message says which.
//! A background thread watches the dir with inotify and re-reads it on every
//! change, so readiness turns true as soon as a config lands; where the
//! watch cannot be set up, each readiness call re-reads the dir instead.
//!
//! # Steps
//!
//! `set_up`: the pod's attachment (pod id as `CNI_CONTAINERID`, its pinned
//! netns, `eth0`, the Kubernetes `CNI_ARGS`, port mappings as the
//! `portMappings` capability) and the config in force are cached, then ADD
//! runs; a failed ADD is followed by a DEL. `tear_down`: DEL with the cached
//! config and result, the namespace left out (`CNI_NETNS=""`) when it is
//! gone; the entry goes only when DEL succeeded, so a later `tear_down`,
//! `reconcile` or `remove_all` tries again. `reconcile` at start: DEL for
//! every cached pod that no longer exists, CHECK (0.4.0 on) for the ones
//! that do, then GC (1.1) of the network in force with the live ones as the
//! valid attachments; what fails there is logged and does not stop berthd
//! from starting. ADD and DEL never run while GC does.
//!
//! # Files, under the directory given to [`CniNetwork::new`]
//!
//! - `results/<pod id>.json`: the pod's attachment; see [`super::cache`].
//!
//! # Pod CIDR
//!
//! kubelet's pod CIDR (`UpdateRuntimeConfig`) is only recorded, logged and
//! shown in `Status` verbose info (`podCidr`): the CNI config belongs to the
//! cluster's network add-on, which learns the node's CIDR from the API
//! server. containerd does the same unless a `conf_template` is set, from
//! which it would write a config; berth has no templates.
//!
//! Kernel objects (veths, bridges, iptables or nftables rules, address
//! claims) belong to the plugins, which make them on ADD and remove them on
//! DEL; berth touches none of them.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::IpNet;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::statfs::{NSFS_MAGIC, statfs};

use super::cache::{AttachmentCache, CachedAttachment};
use super::conf::{CONF_EXTENSIONS, ConfDirScan, NetworkConfList, scan_dir};
use super::plugin::{
    Attachment, CniError, CniPlugins, PortMappingArg, check_container_id, pod_ips,
};
use super::portmap::Protocol;
use super::{NetworkError, NetworkReadiness, PodNetwork, PodNetworkRequest, PodNetworkStatus};
use crate::config::{NetworkConfig, NetworkMode};
use crate::runtime::pod::PortMapping;

/// The readiness reason of every not-ready state, as containerd reports it.
pub const NOT_READY_REASON: &str = "NetworkPluginNotReady";

/// How often the watcher looks at its stop flag, and retries a lost watch.
const WATCH_TICK: u16 = 250;

/// The config dir and what is in it now.
#[derive(Debug)]
struct ConfDir {
    dir: PathBuf,
    scan: Mutex<ConfDirScan>,
    /// The inotify watch is in place, so `scan` follows the dir.
    watching: AtomicBool,
    stop: AtomicBool,
}

impl ConfDir {
    fn lock(&self) -> MutexGuard<'_, ConfDirScan> {
        self.scan.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads the dir; logs when the config in force changes.
    fn rescan(&self) -> ConfDirScan {
        let scan = scan_dir(&self.dir);
        let mut current = self.lock();
        if *current != scan {
            match &scan.chosen {
                Some(c) => tracing::info!(
                    network = %c.name,
                    cni_version = %c.cni_version,
                    file = %c.source.display(),
                    plugins = ?c.plugin_types(),
                    "CNI network config in force"
                ),
                None => tracing::info!(dir = %self.dir.display(), "no CNI network config"),
            }
            for skipped in &scan.skipped {
                tracing::warn!(error = %skipped, "skipping a CNI config file");
            }
        }
        *current = scan.clone();
        scan
    }

    /// What is in the dir: as last seen by the watcher, or read now.
    fn current(&self) -> ConfDirScan {
        if self.watching.load(Ordering::Acquire) {
            self.lock().clone()
        } else {
            self.rescan()
        }
    }
}

/// Watches `conf.dir` until `conf.stop`, re-reading it on every change.
fn watch(conf: Arc<ConfDir>) {
    let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the CNI config dir; re-reading it at each readiness check");
            return;
        }
    };
    let mask = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR;
    let mut watched = false;
    let mut warned = false;
    while !conf.stop.load(Ordering::Relaxed) {
        if !watched {
            match inotify.add_watch(&conf.dir, mask) {
                Ok(_) => {
                    watched = true;
                    warned = false;
                    // Changes before the watch was in place are read now.
                    conf.rescan();
                    conf.watching.store(true, Ordering::Release);
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(dir = %conf.dir.display(), error = %e, "cannot watch the CNI config dir; re-reading it at each readiness check until it can");
                        warned = true;
                    }
                    std::thread::sleep(Duration::from_millis(WATCH_TICK.into()));
                    continue;
                }
            }
        }
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(WATCH_TICK)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "polling the CNI config dir watch");
                std::thread::sleep(Duration::from_millis(WATCH_TICK.into()));
                continue;
            }
        }
        match inotify.read_events() {
            Ok(events) if events.is_empty() => {}
            Ok(events) => {
                let lost = events.iter().any(|e| {
                    e.mask.intersects(
                        AddWatchFlags::IN_IGNORED
                            | AddWatchFlags::IN_DELETE_SELF
                            | AddWatchFlags::IN_MOVE_SELF
                            | AddWatchFlags::IN_UNMOUNT,
                    )
                });
                if lost {
                    // The dir went: readiness re-reads until it is back.
                    conf.watching.store(false, Ordering::Release);
                    watched = false;
                }
                conf.rescan();
            }
            Err(Errno::EAGAIN) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading CNI config dir events");
                std::thread::sleep(Duration::from_millis(WATCH_TICK.into()));
            }
        }
    }
}

/// The pod network of CNI plugins; see the module doc.
#[derive(Debug)]
pub struct CniNetwork {
    mode: NetworkMode,
    conf: Arc<ConfDir>,
    plugins: CniPlugins,
    cache: AttachmentCache,
    /// ADD and DEL hold it shared, GC exclusively, as the spec asks.
    gc_lock: RwLock<()>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    /// The last pod CIDR kubelet set; see the module doc.
    pod_cidrs: Mutex<Vec<IpNet>>,
}

impl CniNetwork {
    /// Reads the config dir (made if missing, so it can be watched), starts
    /// its watcher, and opens the attachment cache under `state_dir` (made
    /// if missing; `<state_dir>/cni` suits). `config.mode` is only reported.
    pub fn new(config: &NetworkConfig, state_dir: &Path) -> Result<CniNetwork, NetworkError> {
        if config.cni_bin_dirs.is_empty() {
            return Err(NetworkError::Config(
                "network.cni_bin_dirs: at least one plugin dir is needed".to_string(),
            ));
        }
        if let Err(e) = std::fs::create_dir_all(&config.cni_conf_dir) {
            tracing::warn!(dir = %config.cni_conf_dir.display(), error = %e, "cannot make the CNI config dir");
        }
        let cache = AttachmentCache::open(&state_dir.join("results"))?;
        let conf = Arc::new(ConfDir {
            dir: config.cni_conf_dir.clone(),
            scan: Mutex::new(ConfDirScan::default()),
            watching: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        conf.rescan();
        let watcher = {
            let conf = conf.clone();
            std::thread::Builder::new()
                .name("cni-conf-watch".to_string())
                .spawn(move || watch(conf))
                .map_err(|e| {
                    tracing::warn!(error = %e, "cannot start the CNI config dir watcher");
                })
                .ok()
        };
        Ok(CniNetwork {
            mode: config.mode,
            conf,
            plugins: CniPlugins::new(config.cni_bin_dirs.clone()),
            cache,
            gc_lock: RwLock::new(()),
            watcher: Mutex::new(watcher),
            pod_cidrs: Mutex::new(Vec::new()),
        })
    }

    /// The config in force, if any.
    pub fn config(&self) -> Option<NetworkConfList> {
        self.conf.current().chosen
    }

    /// Whether the watcher follows the dir (else readiness re-reads it).
    pub fn watching(&self) -> bool {
        self.conf.watching.load(Ordering::Acquire)
    }

    /// The pod's cached attachment, if it has one.
    pub fn attachment(&self, pod_id: &str) -> Option<CachedAttachment> {
        self.cache.read(pod_id).ok().flatten()
    }

    /// DEL of one cached attachment; the entry goes when it succeeded.
    fn delete(&self, entry: &CachedAttachment) -> Result<(), NetworkError> {
        let mut attachment = entry.attachment.clone();
        attachment.netns = attachment.netns.filter(|p| is_netns(p));
        self.plugins
            .del(&entry.config, &attachment, entry.result.as_ref())
            .map_err(setup_error)?;
        self.cache.remove(entry.pod_id())?;
        Ok(())
    }

    /// ADD of `attachment` to `config`, cached before and after.
    fn add(
        &self,
        config: NetworkConfList,
        attachment: Attachment,
    ) -> Result<PodNetworkStatus, NetworkError> {
        let mut entry = CachedAttachment::new(attachment, config);
        self.cache.write(&entry)?;
        let outcome = match self.plugins.add(&entry.config, &entry.attachment) {
            Err(e) => Err(setup_error(e)),
            Ok(result) => {
                let ips = pod_ips(&result, &entry.attachment.ifname);
                // DEL gets the result too, should the pod be refused below.
                entry.result = Some(result);
                match ips {
                    Err(e) => Err(NetworkError::Setup(format!(
                        "CNI network {}: {e}",
                        entry.config.name
                    ))),
                    Ok(ips) if ips.is_empty() => Err(NetworkError::Setup(format!(
                        "CNI network {} gave the pod no address on {}",
                        entry.config.name, entry.attachment.ifname
                    ))),
                    Ok(ips) => self
                        .cache
                        .write(&entry)
                        .map(|()| ips)
                        .map_err(NetworkError::from),
                }
            }
        };
        match outcome {
            Ok(ips) => Ok(PodNetworkStatus { ips }),
            Err(e) => {
                // The spec: a DEL follows even a failed ADD.
                if let Err(undo) = self.delete(&entry) {
                    tracing::warn!(pod = %entry.pod_id(), error = %undo, "undoing a failed CNI ADD; kept for a later DEL");
                }
                Err(e)
            }
        }
    }

    fn gc_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gc_lock.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        self.conf.stop.store(true, Ordering::Relaxed);
        let handle = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl PodNetwork for CniNetwork {
    fn readiness(&self) -> NetworkReadiness {
        let scan = self.conf.current();
        let not_ready = |message: String| NetworkReadiness::NotReady {
            reason: NOT_READY_REASON.to_string(),
            message,
        };
        let Some(config) = scan.chosen else {
            let mut message = format!(
                "no CNI network config in {} (files ending in {})",
                self.conf.dir.display(),
                CONF_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
            );
            if let Some(e) = &scan.dir_error {
                message.push_str(&format!("; {e}"));
            }
            if !scan.skipped.is_empty() {
                let skipped: Vec<String> = scan.skipped.iter().map(|e| e.to_string()).collect();
                message.push_str(&format!("; skipped: {}", skipped.join("; ")));
            }
            return not_ready(message);
        };
        let missing = self.plugins.missing(&config);
        if !missing.is_empty() {
            return not_ready(format!(
                "CNI network {} ({}): plugin {} not found in {}",
                config.name,
                config.source.display(),
                missing.join(", "),
                self.plugins
                    .dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Err(e) = self.plugins.status(&config) {
            return not_ready(format!("CNI network {}: {e}", config.name));
        }
        NetworkReadiness::Ready
    }

    fn set_up(&self, pod: &PodNetworkRequest) -> Result<PodNetworkStatus, NetworkError> {
        let ports = port_mapping_args(&pod.port_mappings)?;
        let attachment = Attachment::for_pod(
            &pod.pod_id,
            &pod.netns,
            &pod.namespace,
            &pod.name,
            &pod.uid,
            ports,
        )
        .map_err(setup_error)?;
        let _shared = self.gc_shared();
        // A pod set up again must not be ADDed twice without a DEL between.
        if let Some(earlier) = self.cache.read(&pod.pod_id)? {
            self.delete(&earlier)?;
        }
        let config = match self.conf.current().chosen {
            Some(config) => config,
            // The watcher may not have seen a config that just landed.
            None => self.conf.rescan().chosen.ok_or_else(|| {
                NetworkError::Setup(format!(
                    "no CNI network config in {}: the pod network is not ready",
                    self.conf.dir.display()
                ))
            })?,
        };
        // A plugin that is missing would leave the ones before it half done.
        let missing = self.plugins.missing(&config);
        if !missing.is_empty() {
            return Err(NetworkError::Setup(format!(
                "CNI network {} ({}): plugin {} not found in the plugin dirs",
                config.name,
                config.source.display(),
                missing.join(", ")
            )));
        }
        self.add(config, attachment)
    }

    fn tear_down(&self, pod: &PodNetworkRequest) -> Result<(), NetworkError> {
        // The id names a cache file: only ids valid for CNI can have one.
        if check_container_id(&pod.pod_id).is_err() {
            return Ok(());
        }
        let _shared = self.gc_shared();
        match self.cache.read(&pod.pod_id)? {
            Some(entry) => self.delete(&entry),
            None => Ok(()),
        }
    }

    fn describe(&self) -> serde_json::Value {
        let scan = self.conf.current();
        serde_json::json!({
            "type": "cni",
            "mode": match self.mode {
                NetworkMode::Auto => "auto",
                NetworkMode::Builtin => "builtin",
                NetworkMode::Cni => "cni",
            },
            "confDir": self.conf.dir,
            "binDirs": self.plugins.dirs(),
            "watch": if self.watching() { "inotify" } else { "rescan" },
            "network": scan.chosen.as_ref().map(|c| serde_json::json!({
                "name": c.name,
                "cniVersion": c.cni_version,
                "file": c.source,
                "plugins": c.plugin_types(),
            })),
            "skipped": scan.skipped.iter().map(|e| serde_json::json!({
                "file": e.path,
                "error": e.reason,
            })).collect::<Vec<_>>(),
            "attachments": self.cache.list().len(),
            "podCidr": self.pod_cidrs.lock().unwrap_or_else(|e| e.into_inner())
                .iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
        })
    }

    fn set_pod_cidrs(&self, cidrs: &[IpNet]) -> Result<(), NetworkError> {
        if cidrs.is_empty() {
            return Ok(());
        }
        let text: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
        tracing::info!(pod_cidr = %text.join(","), "pod CIDR recorded; the CNI config decides addresses");
        *self.pod_cidrs.lock().unwrap_or_else(|e| e.into_inner()) = cidrs.to_vec();
        Ok(())
    }

    fn reconcile(&self, live: &[PodNetworkRequest]) -> Result<(), NetworkError> {
        let live: HashSet<&str> = live.iter().map(|p| p.pod_id.as_str()).collect();
        {
            let _shared = self.gc_shared();
            for entry in self.cache.list() {
                if !live.contains(entry.pod_id()) {
                    match self.delete(&entry) {
                        Ok(()) => {
                            tracing::info!(pod = %entry.pod_id(), network = %entry.config.name, "removed the CNI attachment of a pod that is gone")
                        }
                        Err(e) => {
                            tracing::warn!(pod = %entry.pod_id(), error = %e, "cannot remove the CNI attachment of a pod that is gone; kept for a later try")
                        }
                    }
                    continue;
                }
                let Some(result) = &entry.result else {
                    tracing::warn!(pod = %entry.pod_id(), "a live pod's CNI ADD has no cached result");
                    continue;
                };
                if let Err(e) = self.plugins.check(&entry.config, &entry.attachment, result) {
                    tracing::warn!(pod = %entry.pod_id(), network = %entry.config.name, error = %e, "CNI CHECK of a live pod failed");
                }
            }
        }
        if let Some(config) = self.conf.current().chosen {
            let valid: Vec<(String, String)> = self
                .cache
                .list()
                .into_iter()
                .filter(|e| e.config.name == config.name)
                .map(|e| (e.attachment.container_id, e.attachment.ifname))
                .collect();
            let _exclusive = self.gc_lock.write().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = self.plugins.gc(&config, &valid) {
                tracing::warn!(network = %config.name, error = %e, "CNI GC failed");
            }
        }
        Ok(())
    }

    fn remove_all(&self) -> Result<(), NetworkError> {
        let _shared = self.gc_shared();
        let errors: Vec<NetworkError> = self
            .cache
            .list()
            .iter()
            .filter_map(|entry| self.delete(entry).err())
            .collect();
        match errors.len() {
            0 => Ok(()),
            _ => Err(NetworkError::Several(errors)),
        }
    }
}

fn setup_error(e: CniError) -> NetworkError {
    NetworkError::Setup(e.to_string())
}

/// Whether `path` is a network namespace (a pin that is still mounted).
fn is_netns(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// The CRI port mappings as the `portMappings` capability: those with a
/// host port (as containerd passes them), checked.
pub fn port_mapping_args(mappings: &[PortMapping]) -> Result<Vec<PortMappingArg>, NetworkError> {
    let mut args = Vec::new();
    for m in mappings.iter().filter(|m| m.host_port > 0) {
        let bad = |why: String| NetworkError::InvalidPortMapping(why);
        let protocol = Protocol::parse(&m.protocol)
            .ok_or_else(|| bad(format!("protocol {:?} is not TCP, UDP or SCTP", m.protocol)))?;
        let host_port = u16::try_from(m.host_port)
            .map_err(|_| bad(format!("host port {} is outside 1..65535", m.host_port)))?;
        let container_port = u16::try_from(m.container_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                bad(format!(
                    "container port {} of host port {host_port} is outside 1..65535",
                    m.container_port
                ))
            })?;
        // An unspecified address means every address, which portmap spells
        // as no address (it would match `-d 0.0.0.0` literally).
        let host_ip = match m.host_ip.trim() {
            "" => "",
            text => match text.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_unspecified() => "",
                Ok(_) => text,
                Err(_) => return Err(bad(format!("host IP {text:?} is not an IP address"))),
            },
        };
        args.push(PortMappingArg {
            host_port,
            container_port,
            protocol: protocol.name().to_string(),
            host_ip: host_ip.to_string(),
        });
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    /// A fake plugin: appends `<COMMAND> <CNI_CONTAINERID> <CNI_NETNS>` to
    /// `log`, keeps its last stdin as `<log>.<COMMAND>.json`, answers ADD
    /// with a result on eth0, STATUS as `status` says (0 or an error).
    fn fake_plugin(bin: &Path, name: &str, log: &Path) {
        let script = format!(
            r#"#!/bin/sh
conf=$(cat)
echo "$CNI_COMMAND $CNI_CONTAINERID $CNI_NETNS" >> {log}
printf '%s' "$conf" > {log}.$CNI_COMMAND.json
case $CNI_COMMAND in
ADD) if [ -e {log}.addfail ]; then echo '{{"code":11,"msg":"add refused"}}'; exit 1; fi
    echo '{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0","sandbox":"'$CNI_NETNS'"}}],"ips":[{{"address":"10.9.0.7/24","interface":0}}]}}' ;;
STATUS) if [ -e {log}.down ]; then echo '{{"code":50,"msg":"backend down"}}'; exit 1; fi ;;
esac
exit 0
"#,
            log = log.display()
        );
        let path = bin.join(name);
        std::fs::write(&path, script).expect("write plugin");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    struct Setup {
        dir: tempfile::TempDir,
        config: NetworkConfig,
    }

    impl Setup {
        fn new(mode: NetworkMode) -> Setup {
            let dir = tempfile::tempdir().expect("tempdir");
            let bin = dir.path().join("bin");
            std::fs::create_dir(&bin).expect("bin");
            fake_plugin(&bin, "fake", &dir.path().join("log"));
            let config = NetworkConfig {
                mode,
                cni_conf_dir: dir.path().join("net.d"),
                cni_bin_dirs: vec![dir.path().join("none"), bin],
                ..NetworkConfig::default()
            };
            Setup { dir, config }
        }

        fn network(&self) -> CniNetwork {
            CniNetwork::new(&self.config, &self.dir.path().join("state")).expect("network")
        }

        fn write_conf(&self, file: &str, version: &str, name: &str, types: &[&str]) {
            let plugins: Vec<Value> = types
                .iter()
                .map(|t| json!({"type": t, "capabilities": {"portMappings": true}}))
                .collect();
            let text = json!({"cniVersion": version, "name": name, "plugins": plugins});
            std::fs::create_dir_all(&self.config.cni_conf_dir).expect("conf dir");
            let tmp = self.dir.path().join("tmp.conf");
            std::fs::write(&tmp, text.to_string()).expect("write");
            std::fs::rename(&tmp, self.config.cni_conf_dir.join(file)).expect("rename");
        }

        fn log(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.path().join("log"))
                .unwrap_or_default()
                .lines()
                .map(|l| l.trim_end().to_string())
                .collect()
        }

        fn last_stdin(&self, command: &str) -> Value {
            let path = self.dir.path().join(format!("log.{command}.json"));
            serde_json::from_slice(&std::fs::read(path).expect("stdin")).expect("json")
        }

        fn pod(&self, id: &str) -> PodNetworkRequest {
            PodNetworkRequest {
                pod_id: id.to_string(),
                name: format!("name-{id}"),
                namespace: "ns".to_string(),
                uid: format!("uid-{id}"),
                netns: self.dir.path().join(format!("netns-{id}")),
                port_mappings: vec![PortMapping {
                    protocol: "TCP".to_string(),
                    container_port: 80,
                    host_port: 8080,
                    host_ip: "127.0.0.1".to_string(),
                }],
            }
        }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn readiness_follows_the_config_dir() {
        let s = Setup::new(NetworkMode::Cni);
        let net = s.network();
        assert!(
            s.config.cni_conf_dir.is_dir(),
            "the dir is made to be watched"
        );
        wait_for("the watch", || net.watching());
        match net.readiness() {
            NetworkReadiness::NotReady { reason, message } => {
                assert_eq!(reason, NOT_READY_REASON);
                assert!(message.contains("no CNI network config"), "{message}");
                assert!(
                    message.contains(&s.config.cni_conf_dir.display().to_string()),
                    "{message}"
                );
            }
            NetworkReadiness::Ready => panic!("ready without a config"),
        }
        std::fs::write(s.config.cni_conf_dir.join("05-bad.conflist"), "{").expect("bad");
        wait_for(
            "the bad file",
            || matches!(net.readiness(), NetworkReadiness::NotReady { message, .. } if message.contains("05-bad.conflist")),
        );
        s.write_conf("10-net.conflist", "1.0.0", "net", &["fake", "absent"]);
        wait_for(
            "the missing plugin",
            || matches!(net.readiness(), NetworkReadiness::NotReady { message, .. } if message.contains("plugin absent not found")),
        );
        s.write_conf("10-net.conflist", "1.1.0", "net", &["fake"]);
        wait_for("ready", || net.readiness() == NetworkReadiness::Ready);
        assert_eq!(net.config().map(|c| c.name), Some("net".to_string()));
        assert!(
            s.log().iter().any(|l| l.starts_with("STATUS")),
            "{:?}",
            s.log()
        );
        // A 1.1 network whose STATUS fails is not ready, with the plugin's words.
        std::fs::write(s.dir.path().join("log.down"), "").expect("down");
        match net.readiness() {
            NetworkReadiness::NotReady { message, .. } => {
                assert!(message.contains("backend down"), "{message}")
            }
            NetworkReadiness::Ready => panic!("STATUS failed"),
        }
        std::fs::remove_file(s.dir.path().join("log.down")).expect("up");
        let described = net.describe();
        assert_eq!(described["type"], json!("cni"));
        assert_eq!(described["mode"], json!("cni"));
        assert_eq!(described["network"]["name"], json!("net"));
        assert_eq!(described["network"]["cniVersion"], json!("1.1.0"));
        assert_eq!(described["watch"], json!("inotify"));
        assert_eq!(
            described["skipped"][0]["file"],
            json!(s.config.cni_conf_dir.join("05-bad.conflist"))
        );
        std::fs::remove_file(s.config.cni_conf_dir.join("10-net.conflist")).expect("remove");
        wait_for("not ready again", || {
            net.readiness() != NetworkReadiness::Ready
        });
    }

    #[test]
    fn del_after_a_restart_uses_the_cached_config_and_result() {
        let s = Setup::new(NetworkMode::Auto);
        s.write_conf("10-a.conflist", "0.4.0", "a", &["fake", "fake"]);
        let net = s.network();
        let pod = s.pod("p1");
        let status = net.set_up(&pod).expect("set up");
        assert_eq!(
            status.ips,
            vec!["10.9.0.7".parse::<std::net::IpAddr>().expect("ip")]
        );
        let add = s.last_stdin("ADD");
        assert_eq!(add["name"], json!("a"));
        assert_eq!(
            add["runtimeConfig"]["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}])
        );
        let cached = net.attachment("p1").expect("cached");
        assert_eq!(
            cached.result.as_ref().map(|r| r["cniVersion"].clone()),
            Some(json!("0.4.0"))
        );
        drop(net);

        // Another config comes first now; DEL after the restart still gets "a".
        s.write_conf("01-b.conflist", "1.0.0", "b", &["fake"]);
        let net = s.network();
        net.reconcile(std::slice::from_ref(&pod))
            .expect("reconcile keeps p1");
        assert!(
            s.log().iter().any(|l| l.starts_with("CHECK p1")),
            "{:?}",
            s.log()
        );
        net.tear_down(&pod).expect("tear down");
        let del = s.last_stdin("DEL");
        assert_eq!(del["name"], json!("a"));
        assert_eq!(del["cniVersion"], json!("0.4.0"));
        assert_eq!(del["prevResult"]["ips"][0]["address"], json!("10.9.0.7/24"));
        assert_eq!(del["prevResult"]["ips"][0]["version"], json!("4"));
        // The namespace never existed: DEL goes without it.
        let log = s.log();
        assert_eq!(log.iter().filter(|l| *l == "DEL p1").count(), 2, "{log:?}");
        assert!(net.attachment("p1").is_none());
        net.tear_down(&pod).expect("tear down twice");

        // A new pod gets the config in force; one gone while berthd was down is DELeted.
        net.set_up(&s.pod("p2")).expect("p2");
        assert_eq!(s.last_stdin("ADD")["name"], json!("b"));
        drop(net);
        let net = s.network();
        net.reconcile(&[]).expect("reconcile");
        assert!(net.attachment("p2").is_none());
        assert_eq!(s.log().last().map(String::as_str), Some("DEL p2"));
        net.remove_all().expect("nothing left");
    }

    #[test]
    fn a_failed_add_is_followed_by_del_and_not_cached() {
        let s = Setup::new(NetworkMode::Cni);
        let net = s.network();
        let err = net.set_up(&s.pod("p1")).expect_err("no config");
        assert!(err.to_string().contains("no CNI network config"), "{err}");
        s.write_conf("10-a.conflist", "1.0.0", "a", &["fake", "absent"]);
        // The watcher thread picks the new config up a moment after the write.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let err = loop {
            let err = net.set_up(&s.pod("p1")).expect_err("absent plugin");
            if err.to_string().contains("plugin absent not found")
                || std::time::Instant::now() > deadline
            {
                break err;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(err.to_string().contains("plugin absent not found"), "{err}");
        assert!(s.log().is_empty(), "nothing ran: {:?}", s.log());
        assert!(net.attachment("p1").is_none());

        s.write_conf("10-a.conflist", "1.0.0", "a", &["fake", "fake"]);
        while net.readiness() != NetworkReadiness::Ready && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::write(s.dir.path().join("log.addfail"), "").expect("addfail");
        let err = net.set_up(&s.pod("p1")).expect_err("ADD fails");
        assert!(
            err.to_string().contains("add refused (CNI error code 11)"),
            "{err}"
        );
        let netns = s.pod("p1").netns.display().to_string();
        assert_eq!(
            s.log(),
            vec![format!("ADD p1 {netns}"), "DEL p1".into(), "DEL p1".into()]
        );
        assert!(
            net.attachment("p1").is_none(),
            "a DEL that worked clears the entry"
        );

        let bad_port = PodNetworkRequest {
            port_mappings: vec![PortMapping {
                protocol: "ICMP".into(),
                container_port: 1,
                host_port: 1,
                host_ip: String::new(),
            }],
            ..s.pod("p3")
        };
        assert!(matches!(
            net.set_up(&bad_port),
            Err(NetworkError::InvalidPortMapping(_))
        ));
    }

    #[test]
    fn reconcile_checks_live_pods_dels_gone_ones_and_gcs_a_1_1_network() {
        let s = Setup::new(NetworkMode::Cni);
        s.write_conf("10-a.conflist", "1.1.0", "a", &["fake"]);
        let net = s.network();
        net.set_up(&s.pod("p1")).expect("p1");
        net.set_up(&s.pod("p2")).expect("p2");
        drop(net);
        let net = s.network();
        net.reconcile(&[s.pod("p1")]).expect("reconcile");
        let log = s.log();
        let tail: Vec<&str> = log
            .iter()
            .skip(2)
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(tail, vec!["CHECK", "DEL", "GC"], "{log:?}");
        assert!(log[3].starts_with("DEL p2"), "{log:?}");
        assert_eq!(
            s.last_stdin("GC")["cni.dev/valid-attachments"],
            json!([{"containerID": "p1", "ifname": "eth0"}])
        );
        assert!(s.last_stdin("GC").get("runtimeConfig").is_none());
        assert_eq!(net.describe()["attachments"], json!(1));
        net.tear_down(&s.pod("p1")).expect("p1 down");
        assert_eq!(net.describe()["attachments"], json!(0));
    }

    #[test]
    fn port_mappings_become_the_capability() {
        let m = |protocol: &str, container_port, host_port, host_ip: &str| PortMapping {
            protocol: protocol.into(),
            container_port,
            host_port,
            host_ip: host_ip.into(),
        };
        let args = port_mapping_args(&[
            m("TCP", 80, 8080, ""),
            m("UDP", 53, 5353, "::1"),
            m("SCTP", 9, 0, ""),
            m("tcp", 22, 2222, "0.0.0.0"),
        ])
        .expect("valid");
        assert_eq!(
            serde_json::to_value(&args).expect("json"),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                   {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "::1"},
                   {"hostPort": 2222, "containerPort": 22, "protocol": "tcp"}])
        );
        for bad in [
            m("TCP", 0, 80, ""),
            m("TCP", 80, 70000, ""),
            m("TCP", 80, 81, "host"),
        ] {
            assert!(
                port_mapping_args(std::slice::from_ref(&bad)).is_err(),
                "{bad:?}"
            );
        }
    }
}
