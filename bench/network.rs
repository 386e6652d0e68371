//! Pod network set-up and teardown: berth's built-in bridge network (the
//! code berthd runs in RunPodSandbox and StopPodSandbox, called here in
//! process through the `berth` library) beside Debian's CNI plugins doing the
//! same job — `bridge` with `host-local` IPAM and egress masquerade, then
//! `portmap` — run as a CNI runtime (libcni, as containerd uses it) runs
//! them: the plugin executed with CNI_COMMAND=ADD or DEL in its environment
//! and the network config on stdin, `portmap` given the `bridge` result as
//! `prevResult`, DEL in reverse order.
//!
//! Timing the plugins directly rather than containerd's RunPodSandbox leaves
//! out everything else of a sandbox start (pause container, shim, metadata),
//! which no log of containerd 1.6 separates from the network part. Both
//! sides get the same network namespace, made (and loopback brought up)
//! before the timer starts and removed after it stops; containerd's
//! `loopback` plugin run is left out, as berth brings loopback up when it
//! makes the namespace. Samples alternate which side goes first.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use berth::cni::bridge::BridgeNetwork;
use berth::cni::{PodNetwork, PodNetworkRequest};
use berth::config::NetworkConfig;
use berth::runtime::namespace::{self, NamespaceKind, NamespaceSetup};
use berth::runtime::pod::PortMapping;
use serde_json::{Value, json};

use crate::daemon::{CNI_BIN_DIR, Runtime};
use crate::procfs;
use crate::report::{Metric, Unit};

/// Subnets of the two sides: none of the daemons' (10.67/16, 10.77/16).
const BERTH_SUBNET: &str = "10.68.0.0/16";
const CNI_SUBNET: &str = "10.78.0.0/16";
/// Host ports published in the runs with one port mapping.
const BERTH_HOST_PORT: i32 = 39_680;
const CNI_HOST_PORT: i32 = 39_681;
/// The CNI network's name, which the plugins write into their rules' comments.
const CNI_NETWORK: &str = "berth-bench-cni";

/// One configuration's timings.
pub struct Timings {
    pub set_up: Metric,
    pub tear_down: Metric,
    pub both: Metric,
}

impl Timings {
    fn new(ports: usize) -> Timings {
        let what = match ports {
            0 => "no host port".to_string(),
            1 => "1 host port".to_string(),
            n => format!("{n} host ports"),
        };
        let m = |step: &str| {
            Metric::new(
                format!("pod network {step}, {what} (containerd column: CNI plugins)"),
                Unit::Seconds,
            )
        };
        Timings {
            set_up: m("set-up"),
            tear_down: m("teardown"),
            both: m("set-up + teardown"),
        }
    }

    fn push(&mut self, side: Runtime, set_up: f64, tear_down: f64) {
        self.set_up.push(side, set_up);
        self.tear_down.push(side, tear_down);
        self.both.push(side, set_up + tear_down);
    }
}

pub struct Results {
    /// Indexed by the number of host ports per pod: 0 and 1.
    pub by_ports: Vec<Timings>,
    pub leftovers: Vec<String>,
}

/// `samples` set-ups and teardowns per side and configuration, after
/// `warmup` unrecorded ones (the first makes the bridge).
pub fn run(samples: usize, warmup: usize) -> Result<Results, String> {
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-net-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let tag = std::process::id() % 100_000;
    let config = NetworkConfig {
        bridge: format!("bnb{tag}"),
        subnet: BERTH_SUBNET.to_string(),
        nft_table: format!("berth_bench_net_{tag}"),
        ..NetworkConfig::default()
    };
    let cni = Cni {
        bridge: format!("bnc{tag}"),
        ipam_dir: dir.path().join("cni-ipam"),
    };
    let berth = Built {
        net: BridgeNetwork::new(&config, &dir.path().join("berth-network"))
            .map_err(|e| format!("berth network: {e}"))?,
        cni: &cni,
        config: &config,
    };
    let mut results = Results {
        by_ports: vec![Timings::new(0), Timings::new(1)],
        leftovers: Vec::new(),
    };
    let mut n = 0usize;
    let mut sample = |side: Runtime, ports: usize| -> Result<(f64, f64), String> {
        procfs::check_interrupted()?;
        n += 1;
        let pins = dir.path().join(format!("ns-{n}"));
        namespace::create_pinned(
            &pins,
            NamespaceSetup {
                kinds: vec![NamespaceKind::Net],
                hostname: String::new(),
                sysctls: BTreeMap::new(),
            },
        )
        .map_err(|e| format!("network namespace: {e}"))?;
        // Unique in the first 13 characters, which name berth's host veth.
        let id = format!("{tag:08x}{n:05x}{}", "0".repeat(51));
        let netns = pins.join("net");
        let timed = match side {
            Runtime::Berth => berth.sample(&id, &netns, ports),
            Runtime::Containerd => cni.sample(&id, &netns, ports),
        };
        namespace::remove_pins(&pins, &[NamespaceKind::Net]);
        let _ = std::fs::remove_dir(&pins);
        timed
    };
    let mut outcome = Ok(());
    'all: for (ports, timings) in results.by_ports.iter_mut().enumerate() {
        for i in 0..warmup + samples {
            for side in Runtime::in_turn(i) {
                match sample(side, ports) {
                    Ok((set_up, tear_down)) if i >= warmup => timings.push(side, set_up, tear_down),
                    Ok(_) => {}
                    Err(e) => {
                        outcome = Err(e);
                        break 'all;
                    }
                }
            }
        }
    }
    results.leftovers = berth.clean_up();
    outcome.map(|()| results)
}

/// berth's side.
struct Built<'a> {
    net: BridgeNetwork,
    cni: &'a Cni,
    config: &'a NetworkConfig,
}

impl Built<'_> {
    fn sample(&self, id: &str, netns: &Path, ports: usize) -> Result<(f64, f64), String> {
        let pod = PodNetworkRequest {
            pod_id: id.to_string(),
            name: format!("net-{}", &id[..13]),
            namespace: "bench".to_string(),
            uid: String::new(),
            netns: netns.to_path_buf(),
            port_mappings: (0..ports)
                .map(|p| PortMapping {
                    protocol: "TCP".to_string(),
                    container_port: 80,
                    host_port: BERTH_HOST_PORT + p as i32 * 2,
                    host_ip: String::new(),
                })
                .collect(),
        };
        let started = Instant::now();
        self.net
            .set_up(&pod)
            .map_err(|e| format!("berth network set-up: {e}"))?;
        let set_up = started.elapsed().as_secs_f64();
        let started = Instant::now();
        self.net
            .tear_down(&pod)
            .map_err(|e| format!("berth network teardown: {e}"))?;
        Ok((set_up, started.elapsed().as_secs_f64()))
    }

    /// Removes both sides' bridges and berth's table; lists what stayed.
    fn clean_up(&self) -> Vec<String> {
        let mut left = Vec::new();
        if let Err(e) = self.net.remove_all() {
            left.push(format!("berth network: {e}"));
        }
        if Path::new("/sys/class/net")
            .join(&self.config.bridge)
            .exists()
        {
            left.push(format!("bridge {}", self.config.bridge));
        }
        let tables = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if tables
            .lines()
            .any(|l| l.split_whitespace().last() == Some(self.config.nft_table.as_str()))
        {
            left.push(format!("nftables table {}", self.config.nft_table));
        }
        // The bridge plugin never deletes its bridge: that is no leftover.
        if Path::new("/sys/class/net").join(&self.cni.bridge).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.cni.bridge])
                .output();
        }
        left.extend(remove_cni_rules(CNI_NETWORK));
        left
    }
}

/// The CNI side: Debian's plugins, run as libcni runs them.
struct Cni {
    bridge: String,
    ipam_dir: PathBuf,
}

impl Cni {
    fn bridge_config(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": true,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": CNI_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_dir,
            }
        })
    }

    fn portmap_config(&self, ports: usize, prev: &Value) -> Value {
        let mappings: Vec<Value> = (0..ports)
            .map(|p| {
                json!({
                    "hostPort": CNI_HOST_PORT + p as i32 * 2,
                    "containerPort": 80,
                    "protocol": "tcp",
                })
            })
            .collect();
        json!({
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "type": "portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": mappings},
            "prevResult": prev,
        })
    }

    fn sample(&self, id: &str, netns: &Path, ports: usize) -> Result<(f64, f64), String> {
        let bridge = self.bridge_config();
        let started = Instant::now();
        let result = exec_plugin("bridge", "ADD", id, netns, &bridge)?;
        let portmap = self.portmap_config(ports, &result);
        exec_plugin("portmap", "ADD", id, netns, &portmap)?;
        let set_up = started.elapsed().as_secs_f64();
        // libcni hands the cached result to DEL as prevResult.
        let mut bridge_del = bridge;
        bridge_del["prevResult"] = result;
        let started = Instant::now();
        exec_plugin("portmap", "DEL", id, netns, &portmap)?;
        exec_plugin("bridge", "DEL", id, netns, &bridge_del)?;
        Ok((set_up, started.elapsed().as_secs_f64()))
    }
}

/// Removes the iptables nat rules that name the CNI network `network` in
/// their comment (the bridge plugin's masquerade, portmap's DNAT), and the
/// per-pod `CNI-…` chains they jump to; normally there are none, as DEL
/// removes them. Returns a line for each rule found.
pub fn remove_cni_rules(network: &str) -> Vec<String> {
    let saved = Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let quoted = format!("\\\"{network}\\\"");
    let mut left = Vec::new();
    let mut chains = Vec::new();
    for rule in saved.lines().filter(|l| l.contains(&quoted)) {
        let words = shell_words(rule);
        let Some(("-A", chain, spec)) = words
            .split_first()
            .and_then(|(a, rest)| rest.split_first().map(|(c, s)| (a.as_str(), c, s)))
        else {
            continue;
        };
        let removed = Command::new("iptables")
            .args(["-t", "nat", "-D", chain])
            .args(spec)
            .output()
            .is_ok_and(|o| o.status.success());
        left.push(format!(
            "iptables rule `{rule}`: {}",
            if removed {
                "removed"
            } else {
                "cannot remove it"
            }
        ));
        if let Some(target) = spec.iter().skip_while(|w| *w != "-j").nth(1)
            && target.starts_with("CNI-")
            && !target.starts_with("CNI-HOSTPORT-")
        {
            chains.push(target.clone());
        }
    }
    for chain in chains {
        let _ = Command::new("iptables")
            .args(["-t", "nat", "-F", &chain])
            .output();
        let _ = Command::new("iptables")
            .args(["-t", "nat", "-X", &chain])
            .output();
    }
    left
}

/// The words of one iptables-save line: split at blanks, double quotes
/// grouping, backslash escaping the next character inside them.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Runs one CNI plugin; returns its result (ADD) or null (DEL).
fn exec_plugin(
    plugin: &str,
    command: &str,
    id: &str,
    netns: &Path,
    config: &Value,
) -> Result<Value, String> {
    let path = Path::new(CNI_BIN_DIR).join(plugin);
    let mut child = Command::new(&path)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_BIN_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "run {} (apt-get install containernetworking-plugins): {e}",
                path.display()
            )
        })?;
    let input = serde_json::to_vec(config).map_err(|e| format!("json: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(&input)
        .map_err(|e| format!("write to {plugin}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for {plugin}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "CNI {plugin} {command} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("CNI {plugin} {command} result: {e}"))
}
