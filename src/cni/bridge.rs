//! The built-in pod network: a Linux bridge holding the subnet's first host
//! address, one veth pair per pod, a persisted IPAM, and berth's nftables
//! table for egress masquerade and host ports.
//!
//! # Kernel objects, and how their names are made
//!
//! - The bridge `network.bridge` (default `berth0`), with a fixed MAC address,
//!   the gateway address `<first host of network.subnet>/<prefix>`, and
//!   `net.ipv4.conf.<bridge>.route_localnet=1` (for host ports on 127.0.0.1);
//!   `net.ipv4.ip_forward=1` host-wide. Made on first use, and checked rather
//!   than remade when it is already there.
//! - Per pod, a veth pair made by one netlink request: the pod end is born
//!   as `eth0` inside the pod's network namespace, the host end is attached
//!   to the bridge and up, with hairpin mode on (where br_netfilter is
//!   loaded, as on Kubernetes nodes, a pod reaching itself through a host
//!   port is sent back out of its own bridge port). The host end is named by
//!   [`host_veth_name`]:
//!   `"bv"` followed by the first 13 characters of the pod id when the id
//!   starts with at least 13 lowercase hex digits (berth's ids are 64 of
//!   them), else by the first 13 hex digits of the SHA-256 of the pod id.
//!   That is 15 characters, the longest an interface name can be.
//! - The nftables table `inet <network.nft_table>`; see [`super::nft`].
//!
//! # Files, under the directory given to [`BridgeNetwork::new`]
//!
//! - `pods/<pod id>.json`: what `set_up` made for a pod (address, host veth,
//!   published ports), written before the interfaces are made.
//! - `ipam/<subnet>/`: the address claims; see [`super::ipam`].
//!
//! # Order of the steps
//!
//! `set_up`: check the port mappings; make the bridge, or check it once per
//! process (address, sysctls, and the table written whole); under the
//! lock, refuse host ports another pod publishes, claim an address and write
//! the pod's record; make the veth pair; put the address and the default
//! route on `eth0` through a netlink socket opened inside the pod's namespace
//! (on a thread of its own, never the caller's); replace the nftables table
//! if the pod publishes ports. A failure undoes all of it.
//!
//! `tear_down`: the pod's rules go first (so nothing points at its address),
//! then the veth pair, then the record, and the address is freed last. It
//! carries on past errors and reports them all; if the rules could not be
//! removed, the record and address stay so a retry or `reconcile` finishes
//! the job, and the address is never handed out while a rule points at it.
//! Deleting a veth takes the kernel 15-40 ms (RCU grace periods), so it runs
//! outside the lock.
//!
//! `reconcile` (at daemon start, with the pods that exist) and `remove_all`
//! (at a clean shutdown with no pod left) bring everything in line with the
//! records; see their docs.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ipam::Ipam;
use super::netlink::{RouteSocket, VethPair};
use super::portmap::{self, HostPort};
use super::{NetworkError, NetworkReadiness, PodNetwork, PodNetworkRequest, PodNetworkStatus, nft};
use crate::config::NetworkConfig;
use crate::store::{self, Durability};

/// The pod end of the veth pair.
pub const POD_INTERFACE: &str = "eth0";
const HOST_VETH_PREFIX: &str = "bv";
const HOST_VETH_ID_CHARS: usize = 13;

/// The host end of a pod's veth pair; see the module doc for the rule.
pub fn host_veth_name(pod_id: &str) -> String {
    let prefix = pod_id.get(..HOST_VETH_ID_CHARS).filter(|p| {
        p.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    let id = match prefix {
        Some(p) => p.to_string(),
        None => hex::encode(Sha256::digest(pod_id.as_bytes()))[..HOST_VETH_ID_CHARS].to_string(),
    };
    format!("{HOST_VETH_PREFIX}{id}")
}

/// What `set_up` made for one pod, persisted as `pods/<pod id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PodRecord {
    pod_id: String,
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    host_veth: String,
    ports: Vec<HostPort>,
}

impl PodRecord {
    fn describe(&self) -> String {
        format!("{}/{} ({})", self.namespace, self.name, self.pod_id)
    }
}

/// A pod taken out of the records, whose kernel objects and address are
/// still to go; `record` is None when there is no address to free.
struct Detached {
    pod_id: String,
    host_veth: String,
    record: Option<PodRecord>,
}

/// What the lock guards: the pods' records (mirrored on disk), and whether
/// this process has checked the bridge and written the table yet.
#[derive(Debug, Default)]
struct State {
    pods: BTreeMap<String, PodRecord>,
    bridge_checked: bool,
}

/// The built-in bridge network.
#[derive(Debug)]
pub struct BridgeNetwork {
    bridge: String,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    mtu: u32,
    table: String,
    records: PathBuf,
    ipam: Ipam,
    nft: nft::Nftables,
    state: Mutex<State>,
}

impl BridgeNetwork {
    /// Checks the config and loads the records kept under `dir` (made if
    /// missing; `<state_dir>/network` suits, as pods do not outlive a
    /// reboot). Touches no kernel object: those are made on first use.
    pub fn new(config: &NetworkConfig, dir: &Path) -> Result<BridgeNetwork, NetworkError> {
        let subnet: Ipv4Net = match config.subnet.parse::<ipnet::IpNet>() {
            Ok(ipnet::IpNet::V4(net)) => net.trunc(),
            Ok(ipnet::IpNet::V6(_)) => {
                return Err(NetworkError::Config(format!(
                    "network.subnet {}: the built-in bridge network is IPv4 only",
                    config.subnet
                )));
            }
            Err(e) => {
                return Err(NetworkError::Config(format!(
                    "network.subnet {:?}: {e}",
                    config.subnet
                )));
            }
        };
        let bridge_ok = !config.bridge.is_empty()
            && config.bridge.len() <= 15
            && config
                .bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !bridge_ok {
            return Err(NetworkError::Config(format!(
                "network.bridge {:?} must be 1 to 15 of A-Z a-z 0-9 - _ .",
                config.bridge
            )));
        }
        if !nft::valid_table_name(&config.nft_table) {
            return Err(NetworkError::Config(format!(
                "network.nft_table {:?} must start with a letter and hold only A-Z a-z 0-9 _ -",
                config.nft_table
            )));
        }
        let ipam = Ipam::open(&dir.join("ipam"), subnet)?;
        let records = dir.join("pods");
        std::fs::create_dir_all(&records).map_err(|source| NetworkError::Ipam {
            path: records.clone(),
            source,
        })?;
        let mut pods = BTreeMap::new();
        for entry in std::fs::read_dir(&records)
            .map_err(|source| NetworkError::Ipam {
                path: records.clone(),
                source,
            })?
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match store::read_json::<PodRecord>(&path) {
                    Ok(record) => {
                        pods.insert(record.pod_id.clone(), record);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an unreadable pod network record")
                    }
                }
            }
        }
        Ok(BridgeNetwork {
            bridge: config.bridge.clone(),
            gateway: ipam.gateway(),
            subnet,
            mtu: config.mtu,
            table: config.nft_table.clone(),
            records,
            ipam,
            nft: nft::Nftables::new(),
            state: Mutex::new(State {
                pods,
                bridge_checked: false,
            }),
        })
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The address a pod holds, if its network is set up.
    pub fn pod_ip(&self, pod_id: &str) -> Option<Ipv4Addr> {
        self.lock().pods.get(pod_id).map(|r| r.ip)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves records that are still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_path(&self, pod_id: &str) -> PathBuf {
        self.records.join(format!("{pod_id}.json"))
    }

    fn spec(&self) -> nft::TableSpec<'_> {
        nft::TableSpec {
            table: &self.table,
            bridge: &self.bridge,
            subnet: self.subnet,
        }
    }

    /// Replaces the nftables table with one for the pods in `state`.
    fn write_table(&self, state: &State) -> Result<(), NetworkError> {
        let pods: Vec<nft::PodPorts<'_>> = state
            .pods
            .values()
            .filter(|r| !r.ports.is_empty())
            .map(|r| nft::PodPorts {
                pod_id: &r.pod_id,
                namespace: &r.namespace,
                name: &r.name,
                ip: r.ip,
                ports: &r.ports,
            })
            .collect();
        self.nft.apply(&nft::ruleset(&self.spec(), &pods))
    }

    /// Makes the bridge, its address, sysctls and the nftables table, or
    /// checks them when this process has not yet; returns the bridge index.
    fn ensure_bridge(&self, state: &mut State) -> Result<u32, NetworkError> {
        let netlink = |what: &str| {
            let what = format!("{what} (bridge {})", self.bridge);
            move |source| NetworkError::Netlink { what, source }
        };
        let mut socket = RouteSocket::open().map_err(netlink("open a netlink socket"))?;
        let existing = socket
            .link(&self.bridge)
            .map_err(netlink("look the bridge up"))?;
        if let Some(link) = &existing
            && state.bridge_checked
        {
            return Ok(link.index);
        }
        let link = match existing {
            Some(link) => {
                if link.kind.as_deref() != Some("bridge") {
                    return Err(NetworkError::Config(format!(
                        "network.bridge {}: an interface of that name exists and is a {}, not a bridge",
                        self.bridge,
                        link.kind.as_deref().unwrap_or("plain device")
                    )));
                }
                if !link.up {
                    socket
                        .set_up(link.index)
                        .map_err(netlink("set the bridge up"))?;
                }
                link
            }
            None => {
                match socket.create_bridge(&self.bridge, self.mtu, bridge_mac(&self.bridge)) {
                    Ok(()) => {}
                    // Made by someone else since the look-up: check it as found.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(netlink("create the bridge")(e)),
                }
                socket
                    .link(&self.bridge)
                    .map_err(netlink("look the new bridge up"))?
                    .ok_or_else(|| {
                        NetworkError::Setup(format!("bridge {} vanished", self.bridge))
                    })?
            }
        };
        let gateway = Ipv4Net::new(self.gateway, self.subnet.prefix_len())
            .map_err(|e| NetworkError::Config(e.to_string()))?;
        let addresses = socket
            .ipv4_addresses(link.index)
            .map_err(netlink("list the bridge's addresses"))?;
        if !addresses.contains(&gateway) {
            match socket.add_ipv4_address(link.index, gateway) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                    return Err(netlink("add the gateway address")(e));
                }
                _ => {}
            }
        }
        set_sysctl("net/ipv4/ip_forward", "1")?;
        set_sysctl(
            &format!("net/ipv4/conf/{}/route_localnet", self.bridge),
            "1",
        )?;
        self.write_table(state)?;
        state.bridge_checked = true;
        Ok(link.index)
    }

    /// Records the pod with an address, or finds its record from an earlier
    /// set-up; refuses host ports another pod publishes.
    fn claim(
        &self,
        state: &mut State,
        pod: &PodNetworkRequest,
        ports: Vec<HostPort>,
    ) -> Result<(PodRecord, bool), NetworkError> {
        for port in &ports {
            if let Some((other, taken)) = state
                .pods
                .values()
                .filter(|r| r.pod_id != pod.pod_id)
                .find_map(|r| {
                    r.ports
                        .iter()
                        .find(|p| p.clashes_with(port))
                        .map(|p| (r, p))
                })
            {
                return Err(NetworkError::HostPortTaken {
                    port: if taken == port {
                        port.to_string()
                    } else {
                        format!("{port} (as {taken})")
                    },
                    other_pod: other.describe(),
                });
            }
        }
        let (ip, existed) = match state.pods.get(&pod.pod_id) {
            Some(record) => (record.ip, true),
            None => (self.ipam.allocate(&pod.pod_id)?, false),
        };
        let record = PodRecord {
            pod_id: pod.pod_id.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ip,
            host_veth: host_veth_name(&pod.pod_id),
            ports,
        };
        if let Err(e) =
            store::write_json(&self.record_path(&pod.pod_id), &record, Durability::Crash)
        {
            if !existed {
                let _ = self.ipam.release(ip, &pod.pod_id);
            }
            return Err(e.into());
        }
        state.pods.insert(pod.pod_id.clone(), record.clone());
        Ok((record, existed))
    }

    /// Makes the veth pair and configures the pod's end.
    fn wire(
        &self,
        pod: &PodNetworkRequest,
        record: &PodRecord,
        bridge_index: u32,
        again: bool,
    ) -> Result<(), NetworkError> {
        let netlink = |what: &str| {
            let what = format!("{what} (pod {})", pod.pod_id);
            move |source| NetworkError::Netlink { what, source }
        };
        let mut host = RouteSocket::open().map_err(netlink("open a netlink socket"))?;
        if again {
            // A pair from an earlier set-up of this pod goes (its peer with it).
            host.delete_link(&record.host_veth)
                .map_err(netlink("remove the earlier veth"))?;
        }
        let (netns, mut inside) =
            RouteSocket::open_in(&pod.netns).map_err(|source| NetworkError::Netlink {
                what: format!(
                    "cannot enter the pod's network namespace {}",
                    pod.netns.display()
                ),
                source,
            })?;
        host.create_veth(&VethPair {
            host_name: &record.host_veth,
            peer_name: POD_INTERFACE,
            master: bridge_index,
            mtu: self.mtu,
            peer_netns: &netns,
        })
        .map_err(|source| NetworkError::Netlink {
            what: if source.raw_os_error() == Some(libc::EEXIST) {
                format!(
                    "create veth pair: {} exists on the host or {POD_INTERFACE} in the pod",
                    record.host_veth
                )
            } else {
                format!("create veth pair {}/{POD_INTERFACE}", record.host_veth)
            },
            source,
        })?;
        host.set_hairpin(&record.host_veth)
            .map_err(netlink("turn hairpin mode on"))?;
        let eth0 = inside
            .link(POD_INTERFACE)
            .map_err(netlink("look up eth0 in the pod"))?
            .ok_or_else(|| {
                NetworkError::Setup(format!(
                    "{POD_INTERFACE} is missing from the pod's namespace"
                ))
            })?;
        if !eth0.up {
            inside.set_up(eth0.index).map_err(netlink("set eth0 up"))?;
        }
        let address = Ipv4Net::new(record.ip, self.subnet.prefix_len())
            .map_err(|e| NetworkError::Config(e.to_string()))?;
        inside
            .add_ipv4_address(eth0.index, address)
            .map_err(netlink("add the pod's address"))?;
        inside
            .add_default_route(self.gateway, eth0.index)
            .map_err(netlink("add the pod's default route"))?;
        Ok(())
    }

    /// Takes a pod out of the records and, when `rewrite_table`, its rules
    /// out of the table; the caller holds the lock. If the rules could not be
    /// removed the record stays, so its address is not freed.
    fn detach(
        &self,
        state: &mut State,
        pod_id: &str,
        rewrite_table: bool,
        errors: &mut Vec<NetworkError>,
    ) -> Detached {
        let host_veth = state
            .pods
            .get(pod_id)
            .map(|r| r.host_veth.clone())
            .unwrap_or_else(|| host_veth_name(pod_id));
        let Some(record) = state.pods.remove(pod_id) else {
            return Detached {
                pod_id: pod_id.to_string(),
                host_veth,
                record: None,
            };
        };
        if !record.ports.is_empty()
            && rewrite_table
            && let Err(e) = self.write_table(state)
        {
            errors.push(e);
            state.pods.insert(pod_id.to_string(), record);
            return Detached {
                pod_id: pod_id.to_string(),
                host_veth,
                record: None,
            };
        }
        Detached {
            pod_id: pod_id.to_string(),
            host_veth,
            record: Some(record),
        }
    }

    /// Deletes a detached pod's veth pair, then its record and address. Needs
    /// no lock: deleting a veth takes the kernel tens of milliseconds (RCU
    /// grace periods), which other pods should not wait for.
    fn release(&self, detached: Detached, errors: &mut Vec<NetworkError>) {
        let Detached {
            pod_id,
            host_veth,
            record,
        } = detached;
        if let Err(source) = RouteSocket::open().and_then(|mut s| s.delete_link(&host_veth)) {
            errors.push(NetworkError::Netlink {
                what: format!("delete veth {host_veth} (pod {pod_id})"),
                source,
            });
            // The pair may still hold the address: keep it claimed.
            return;
        }
        let Some(record) = record else {
            return;
        };
        if let Err(e) = store::remove(&self.record_path(&pod_id)) {
            errors.push(e.into());
        }
        if let Err(e) = self.ipam.release(record.ip, &pod_id) {
            errors.push(e);
        }
    }

    /// Removes one pod's objects while the caller holds the lock.
    fn remove_pod(&self, state: &mut State, pod_id: &str, errors: &mut Vec<NetworkError>) {
        let detached = self.detach(state, pod_id, false, errors);
        self.release(detached, errors);
    }

    /// Brings the network in line with the pods that exist, after a start:
    /// the objects of pods not in `live` go (veths, rules, records,
    /// addresses), and so do address claims and veths on the bridge that no
    /// record owns; the table is rewritten from the records of `live` pods.
    /// With no pod left, the bridge and the table are removed. A live pod
    /// whose network was never set up stays without one (nothing is made).
    pub fn reconcile(&self, live: &[PodNetworkRequest]) -> Result<(), NetworkError> {
        let live: HashSet<&str> = live.iter().map(|p| p.pod_id.as_str()).collect();
        let mut errors = Vec::new();
        let mut state = self.lock();
        let stale: Vec<String> = state
            .pods
            .keys()
            .filter(|id| !live.contains(id.as_str()))
            .cloned()
            .collect();
        for id in &stale {
            tracing::info!(pod = %id, "removing the network of a pod that is gone");
            self.remove_pod(&mut state, id, &mut errors);
        }
        match self.ipam.allocations() {
            Ok(claims) => {
                for (ip, owner) in claims {
                    if state.pods.get(&owner).map(|r| r.ip) != Some(ip) {
                        tracing::info!(%ip, pod = %owner, "freeing an address no pod record holds");
                        if let Err(e) = self.ipam.release(ip, &owner) {
                            errors.push(e);
                        }
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        let owned: HashSet<String> = state.pods.values().map(|r| r.host_veth.clone()).collect();
        if let Err(e) = self.remove_stray_veths(&owned) {
            errors.push(e);
        }
        if state.pods.is_empty() {
            self.remove_kernel_objects(&mut state, &mut errors);
        } else {
            // Check the bridge again and rewrite the table whole.
            state.bridge_checked = false;
            if let Err(e) = self.ensure_bridge(&mut state) {
                errors.push(e);
            }
        }
        drop(state);
        into_result(errors)
    }

    /// Deletes host veths on the bridge named like berth's that no record owns.
    fn remove_stray_veths(&self, owned: &HashSet<String>) -> Result<(), NetworkError> {
        let netlink = |what: &str| {
            let what = what.to_string();
            move |source| NetworkError::Netlink { what, source }
        };
        let mut socket = RouteSocket::open().map_err(netlink("open a netlink socket"))?;
        let Some(bridge) = socket
            .link(&self.bridge)
            .map_err(netlink("look the bridge up"))?
        else {
            return Ok(());
        };
        for link in socket
            .links_of_master(bridge.index)
            .map_err(netlink("list the bridge's ports"))?
        {
            if link.kind.as_deref() == Some("veth")
                && link.name.starts_with(HOST_VETH_PREFIX)
                && !owned.contains(&link.name)
            {
                tracing::info!(veth = %link.name, "removing a veth no pod owns");
                socket
                    .delete_link(&link.name)
                    .map_err(netlink("delete a stray veth"))?;
            }
        }
        Ok(())
    }

    /// Removes everything of this network: every pod's veth, record and
    /// address, the bridge and the nftables table. For a clean shutdown with
    /// no pod left, and for tests.
    pub fn remove_all(&self) -> Result<(), NetworkError> {
        let mut errors = Vec::new();
        let mut state = self.lock();
        let ids: Vec<String> = state.pods.keys().cloned().collect();
        for id in &ids {
            self.remove_pod(&mut state, id, &mut errors);
        }
        self.remove_kernel_objects(&mut state, &mut errors);
        drop(state);
        into_result(errors)
    }

    fn remove_kernel_objects(&self, state: &mut State, errors: &mut Vec<NetworkError>) {
        state.bridge_checked = false;
        if let Err(source) = RouteSocket::open().and_then(|mut s| s.delete_link(&self.bridge)) {
            errors.push(NetworkError::Netlink {
                what: format!("delete bridge {}", self.bridge),
                source,
            });
        }
        if let Err(e) = self.nft.apply(&nft::delete_table(&self.table)) {
            errors.push(e);
        }
    }
}

impl PodNetwork for BridgeNetwork {
    fn reconcile(&self, live: &[PodNetworkRequest]) -> Result<(), NetworkError> {
        BridgeNetwork::reconcile(self, live)
    }

    fn remove_all(&self) -> Result<(), NetworkError> {
        BridgeNetwork::remove_all(self)
    }

    fn readiness(&self) -> NetworkReadiness {
        if !nft::Nftables::available() {
            return NetworkReadiness::NotReady {
                reason: "NftablesMissing".to_string(),
                message: "neither libnftables.so.1 nor the nft program (Debian package nftables) \
                          is installed; pod masquerade and host ports need one"
                    .to_string(),
            };
        }
        if !nix::unistd::geteuid().is_root() {
            return NetworkReadiness::NotReady {
                reason: "NotRoot".to_string(),
                message: "the built-in bridge network needs root to make bridges and veths"
                    .to_string(),
            };
        }
        NetworkReadiness::Ready
    }

    fn set_up(&self, pod: &PodNetworkRequest) -> Result<PodNetworkStatus, NetworkError> {
        check_pod_id(&pod.pod_id)?;
        let ports = portmap::host_ports(&pod.port_mappings)?;
        let publishes = !ports.is_empty();
        let (record, again, bridge_index) = {
            let mut state = self.lock();
            let bridge_index = self.ensure_bridge(&mut state)?;
            let (record, again) = self.claim(&mut state, pod, ports)?;
            (record, again, bridge_index)
        };
        let wired = self.wire(pod, &record, bridge_index, again).and_then(|()| {
            if publishes {
                let state = self.lock();
                self.write_table(&state)
            } else {
                Ok(())
            }
        });
        match wired {
            Ok(()) => Ok(PodNetworkStatus {
                ips: vec![IpAddr::V4(record.ip)],
            }),
            Err(e) => {
                if let Err(undo) = self.tear_down(pod) {
                    tracing::warn!(pod = %pod.pod_id, error = %undo, "undoing a failed network set-up");
                }
                Err(e)
            }
        }
    }

    fn tear_down(&self, pod: &PodNetworkRequest) -> Result<(), NetworkError> {
        check_pod_id(&pod.pod_id)?;
        let mut errors = Vec::new();
        let detached = self.detach(&mut self.lock(), &pod.pod_id, true, &mut errors);
        self.release(detached, &mut errors);
        into_result(errors)
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "bridge",
            "bridge": self.bridge,
            "subnet": self.subnet.to_string(),
            "gateway": self.gateway.to_string(),
            "mtu": self.mtu,
            "nftables": {
                "family": "inet",
                "table": self.table,
                "via": nft::Nftables::backend(),
            },
            "pods": self.lock().pods.len(),
        })
    }
}

/// Pod ids name files: no separators, no leading dot.
fn check_pod_id(id: &str) -> Result<(), NetworkError> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Setup(format!(
            "pod id {id:?} is not a valid id"
        )))
    }
}

fn into_result(mut errors: Vec<NetworkError>) -> Result<(), NetworkError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(NetworkError::Several(errors)),
    }
}

/// A fixed, locally administered unicast MAC address for the bridge.
fn bridge_mac(bridge: &str) -> [u8; 6] {
    let hash = Sha256::digest(format!("berth bridge {bridge}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&hash[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Writes a sysctl of the calling thread's network namespace, if it differs.
fn set_sysctl(name: &str, value: &str) -> Result<(), NetworkError> {
    let path = Path::new("/proc/sys").join(name);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| NetworkError::Netlink {
        what: format!("set sysctl {}={value}", name.replace('/', ".")),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_follow_the_documented_rule() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(host_veth_name(id), "bv0123456789abc");
        assert!(host_veth_name(id).len() <= 15);
        // Not hex: hashed, still 15 characters and stable.
        let odd = host_veth_name("My-Pod");
        assert_eq!(odd.len(), 15);
        assert!(odd.starts_with("bv"));
        assert_eq!(odd, host_veth_name("My-Pod"));
        assert_ne!(odd, host_veth_name("My-Pod2"));
        // Short ids are hashed too.
        assert_eq!(host_veth_name("abc").len(), 15);
    }

    #[test]
    fn the_bridge_mac_is_stable_local_and_unicast() {
        let mac = bridge_mac("berth0");
        assert_eq!(mac, bridge_mac("berth0"));
        assert_ne!(mac, bridge_mac("berth1"));
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn pod_ids_cannot_name_other_files() {
        assert!(check_pod_id("0123abcd").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b"] {
            assert!(check_pod_id(bad).is_err(), "{bad:?}");
        }
    }

    fn config(subnet: &str, bridge: &str, table: &str) -> NetworkConfig {
        NetworkConfig {
            subnet: subnet.to_string(),
            bridge: bridge.to_string(),
            nft_table: table.to_string(),
            ..NetworkConfig::default()
        }
    }

    #[test]
    fn new_checks_the_config_and_touches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = BridgeNetwork::new(&config("10.66.0.0/16", "berth0", "berth"), dir.path())
            .expect("default config");
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 66, 0, 1));
        let d = net.describe();
        assert_eq!(d["type"], "bridge");
        assert_eq!(d["bridge"], "berth0");
        assert_eq!(d["subnet"], "10.66.0.0/16");
        assert_eq!(d["nftables"]["table"], "berth");
        for (c, want) in [
            (config("fd00::/64", "berth0", "berth"), "IPv4"),
            (config("10.66.0.0/31", "berth0", "berth"), "too small"),
            (config("10.66.0.0", "berth0", "berth"), "network.subnet"),
            (config("10.66.0.0/16", "br\"0", "berth"), "network.bridge"),
            (
                config("10.66.0.0/16", "berth0", "bad table"),
                "network.nft_table",
            ),
        ] {
            let err = BridgeNetwork::new(&c, dir.path())
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn records_survive_a_reload_and_ports_clash_across_pods() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config("10.66.0.0/24", "berth0", "berth");
        let pod = |id: &str, host_port: i32| PodNetworkRequest {
            pod_id: id.to_string(),
            name: format!("name-{id}"),
            namespace: "ns".to_string(),
            uid: String::new(),
            netns: PathBuf::from("/nonexistent"),
            port_mappings: vec![crate::runtime::pod::PortMapping {
                protocol: "TCP".to_string(),
                container_port: 80,
                host_port,
                host_ip: String::new(),
            }],
        };
        let a_ip = {
            let net = BridgeNetwork::new(&cfg, dir.path()).expect("new");
            let mut state = net.lock();
            let ports = portmap::host_ports(&pod("aaaa", 8080).port_mappings).expect("ports");
            let (record, again) = net
                .claim(&mut state, &pod("aaaa", 8080), ports)
                .expect("claim");
            assert!(!again);
            record.ip
        };
        let net = BridgeNetwork::new(&cfg, dir.path()).expect("reload");
        assert_eq!(net.pod_ip("aaaa"), Some(a_ip));
        let mut state = net.lock();
        let ports = portmap::host_ports(&pod("bbbb", 8080).port_mappings).expect("ports");
        let err = net
            .claim(&mut state, &pod("bbbb", 8080), ports)
            .expect_err("port taken")
            .to_string();
        assert!(err.contains("8080/tcp"), "{err}");
        assert!(err.contains("ns/name-aaaa (aaaa)"), "{err}");
        // The refused pod got no address.
        assert_eq!(net.ipam.allocations().expect("list").len(), 1);
        // The same pod again keeps its address.
        let ports = portmap::host_ports(&pod("aaaa", 8080).port_mappings).expect("ports");
        let (again, repeated) = net
            .claim(&mut state, &pod("aaaa", 8080), ports)
            .expect("again");
        assert!(repeated);
        assert_eq!(again.ip, a_ip);
    }
}
