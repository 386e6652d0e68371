//! Times the built-in bridge network's set-up and tear-down per pod, as root:
//! `cargo run --release --example pod_network_bench -- [pods] [host-ports]`
//! (defaults: 20 pods, 0 host ports each). Namespaces are made beforehand and
//! not timed; everything is removed at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth::cni::bridge::BridgeNetwork;
use berth::cni::{PodNetwork, PodNetworkRequest};
use berth::config::NetworkConfig;
use berth::runtime::namespace::{self, NamespaceKind, NamespaceSetup};
use berth::runtime::pod::PortMapping;

fn main() {
    let mut args = std::env::args().skip(1);
    let pods: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let ports: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let pid = std::process::id();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = NetworkConfig {
        bridge: format!("bbench{}", pid % 100_000),
        subnet: "10.198.0.0/20".to_string(),
        nft_table: format!("berth_bench_{pid}"),
        ..NetworkConfig::default()
    };
    let net = Cleanup {
        net: BridgeNetwork::new(&config, &dir.path().join("network")).expect("network"),
        pins: (0..pods)
            .map(|i| dir.path().join(format!("ns{i}")))
            .collect(),
    };
    let requests: Vec<PodNetworkRequest> = (0..pods)
        .map(|i| {
            let pins = dir.path().join(format!("ns{i}"));
            namespace::create_pinned(
                &pins,
                NamespaceSetup {
                    kinds: vec![NamespaceKind::Net],
                    hostname: String::new(),
                    sysctls: BTreeMap::new(),
                },
            )
            .expect("netns");
            PodNetworkRequest {
                // Unique in the first 13 characters, which name the host veth.
                pod_id: format!("{pid:08x}{i:05x}{}", "0".repeat(51)),
                name: format!("bench-{i}"),
                namespace: "bench".to_string(),
                uid: String::new(),
                netns: pins.join("net"),
                port_mappings: (0..ports)
                    .map(|p| PortMapping {
                        protocol: "TCP".to_string(),
                        container_port: 80 + i32::from(p),
                        host_port: 30_000 + (i as i32) * i32::from(ports) + i32::from(p),
                        host_ip: String::new(),
                    })
                    .collect(),
            }
        })
        .collect();

    // The first set-up makes the bridge and the table: time it apart.
    let started = Instant::now();
    net.net.set_up(&requests[0]).expect("first set-up");
    let first = started.elapsed();
    let mut set_up = Vec::new();
    for pod in &requests[1..] {
        let started = Instant::now();
        net.net.set_up(pod).expect("set-up");
        set_up.push(started.elapsed());
    }
    let mut tear_down = Vec::new();
    for pod in &requests {
        let started = Instant::now();
        net.net.tear_down(pod).expect("tear-down");
        tear_down.push(started.elapsed());
    }
    drop(net);

    println!("pods: {pods}, host ports each: {ports}");
    println!("first set-up (makes bridge and table): {first:.2?}");
    report("set-up", &mut set_up);
    report("tear-down", &mut tear_down);
}

/// Removes the network and the namespaces, also when the run fails.
struct Cleanup {
    net: BridgeNetwork,
    pins: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = self.net.remove_all() {
            eprintln!("cleanup: {e}");
        }
        for pins in &self.pins {
            namespace::remove_pins(pins, &[NamespaceKind::Net]);
        }
    }
}

fn report(what: &str, times: &mut [Duration]) {
    if times.is_empty() {
        return;
    }
    times.sort();
    let total: Duration = times.iter().sum();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what}: mean {:.2?}  p50 {:.2?}  p95 {:.2?}  max {:.2?}  (n={})",
        total / times.len() as u32,
        at(0.5),
        at(0.95),
        times[times.len() - 1],
        times.len()
    );
}
