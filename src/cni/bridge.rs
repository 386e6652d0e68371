//! The built-in pod network: a Linux bridge holding the first host address of
//! each pod subnet (IPv4, and IPv6 when configured), one veth pair per pod, a
//! persisted IPAM, and berth's nftables table for egress masquerade and host
//! ports.
//!
//! # Kernel objects, and how their names are made
//!
//! - The bridge `network.bridge` (default `berth0`), with a fixed MAC address,
//!   the gateway address `<first host of the subnet>/<prefix>` of every pod
//!   subnet in use, and `net.ipv4.conf.<bridge>.route_localnet=1` (for host
//!   ports on 127.0.0.1); `net.ipv4.ip_forward=1` host-wide. With an IPv6
//!   subnet also `net.ipv6.conf.<bridge>.disable_ipv6=0` and, host-wide,
//!   `net.ipv6.conf.all.forwarding=1` (which makes the host ignore router
//!   advertisements on interfaces whose `accept_ra` is 1, as with Docker and
//!   Podman); IPv6 addresses are added without DAD (`nodad`), on the bridge
//!   and in pods, so they are usable at once; and the bridge has
//!   `accept_dad=0`, so its link-local address is too (see `ensure_bridge`).
//!   Made on first use, and checked rather than remade when it is already
//!   there.
//!
//! # Subnets
//!
//! New pods get an address from `network.subnet` and, when set, one from
//! `network.subnet_v6`. kubelet's pod CIDR ([`BridgeNetwork::set_pod_cidrs`],
//! from `UpdateRuntimeConfig`) replaces the subnet of each family it names,
//! for pods set up afterwards; it is kept in `pod-cidr.json` so a restarted
//! berthd uses it too. Pods keep the addresses they have: the records say
//! which subnet each came from, and the bridge and the table serve every
//! subnet a pod still holds an address of. A pod CIDR that overlaps a
//! subnet pods hold addresses in, without being that subnet, is refused:
//! each subnet has an IPAM directory of its own, and two overlapping ones
//! could hand out one address twice. The gateway of a subnet no pod uses
//! leaves the bridge the next time the bridge is checked (after a pod CIDR
//! change, or at start).
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
//! - `pods/<pod id>.json`: what `set_up` made for a pod (addresses with their
//!   prefix lengths, host veth, published ports), written before the
//!   interfaces are made.
//! - `ipam/<subnet>/`: the address claims; see [`super::ipam`].
//! - `pod-cidr.json`: the last pod CIDR kubelet set, when it set one.
//!
//! # Order of the steps
//!
//! `set_up`: check the port mappings; make the bridge, or check it once per
//! process (address, sysctls, and the table written whole); under the
//! lock, refuse host ports another pod publishes, claim an address of each
//! family and write the pod's record; make the veth pair; put the addresses
//! and a default route per family on `eth0` through a netlink socket opened inside the pod's namespace
//! (on a thread of its own, never the caller's); replace the nftables table
//! if the pod publishes ports. A failure undoes all of it.
//!
//! `tear_down`: the pod's rules go first (so nothing points at its address),
//! then the veth pair, then the record, and the addresses are freed last. It
//! carries on past errors and reports them all; if the rules could not be
//! removed, the record and address stay so a retry or `reconcile` finishes
//! the job, and the address is never handed out while a rule points at it.
//! Deleting a veth takes the kernel 15-40 ms (RCU grace periods), so it runs
//! outside the lock.
//!
//! `reconcile` (at daemon start, with the pods that exist) and `remove_all`
//! (at a clean shutdown with no pod left) bring everything in line with the
//! records; see their docs.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ipam::{self, Ipam};
use super::netlink::{RouteSocket, VethPair};
use super::portmap::{self, HostPort};
use super::{NetworkError, NetworkReadiness, PodNetwork, PodNetworkRequest, PodNetworkStatus, nft};
use crate::config::NetworkConfig;
use crate::store::{self, Durability};

/// The pod end of the veth pair.
pub const POD_INTERFACE: &str = "eth0";
const HOST_VETH_PREFIX: &str = "bv";
const HOST_VETH_ID_CHARS: usize = 13;
const POD_CIDR_FILE: &str = "pod-cidr.json";

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

/// One address of a pod and the prefix length of the subnet it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PodAddress {
    ip: IpAddr,
    prefix_len: u8,
}

impl PodAddress {
    fn net(self) -> Result<IpNet, NetworkError> {
        IpNet::new(self.ip, self.prefix_len)
            .map_err(|e| NetworkError::Setup(format!("pod address {}: {e}", self.ip)))
    }

    fn subnet(self) -> Option<IpNet> {
        self.net().ok().map(|n| n.trunc())
    }
}

/// What `set_up` made for one pod, persisted as `pods/<pod id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PodRecord {
    pod_id: String,
    namespace: String,
    name: String,
    /// IPv4 first, then IPv6 when the pod has it.
    #[serde(default)]
    addresses: Vec<PodAddress>,
    /// Records written before IPv6 support held only this IPv4 address, of
    /// `network.subnet`; read, turned into `addresses`, never written.
    #[serde(default, skip_serializing)]
    ip: Option<Ipv4Addr>,
    host_veth: String,
    ports: Vec<HostPort>,
}

impl PodRecord {
    fn describe(&self) -> String {
        format!("{}/{} ({})", self.namespace, self.name, self.pod_id)
    }

    fn ipv4(&self) -> Option<Ipv4Addr> {
        self.addresses.iter().find_map(|a| match a.ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
    }

    fn ipv6(&self) -> Option<Ipv6Addr> {
        self.addresses.iter().find_map(|a| match a.ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        })
    }

    fn holds(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|a| a.ip == ip)
    }
}

/// The subnets new pods get their addresses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PodSubnets {
    v4: Ipv4Net,
    v6: Option<Ipv6Net>,
}

impl PodSubnets {
    /// The config's subnets with those of `cidrs` in place of their family's.
    fn with_pod_cidrs(self, cidrs: &[IpNet]) -> Result<PodSubnets, NetworkError> {
        let mut subnets = self;
        let (mut v4, mut v6) = (0, 0);
        for cidr in cidrs {
            ipam::check_size(*cidr).map_err(|e| NetworkError::InvalidPodCidr(e.to_string()))?;
            match cidr.trunc() {
                IpNet::V4(net) => {
                    v4 += 1;
                    subnets.v4 = net;
                }
                IpNet::V6(net) => {
                    v6 += 1;
                    subnets.v6 = Some(net);
                }
            }
        }
        if v4 > 1 || v6 > 1 {
            return Err(NetworkError::InvalidPodCidr(format!(
                "{} names more than one subnet of a family",
                cidr_list(cidrs)
            )));
        }
        Ok(subnets)
    }

    fn all(self) -> impl Iterator<Item = IpNet> {
        std::iter::once(IpNet::V4(self.v4)).chain(self.v6.map(IpNet::V6))
    }
}

/// Why a subnet of the config is refused: of the wrong family, or no subnet.
fn subnet_error(key: &str, text: &str, error: ipnet::AddrParseError, family: &str) -> NetworkError {
    if text.parse::<IpNet>().is_ok() {
        NetworkError::Config(format!("{key} {text}: must be {family}"))
    } else {
        NetworkError::Config(format!("{key} {text:?}: {error}"))
    }
}

fn cidr_list(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A pod taken out of the records, whose kernel objects and addresses are
/// still to go; `record` is None when there is no address to free, and
/// `ipams` hold the subnets of its addresses.
struct Detached {
    pod_id: String,
    host_veth: String,
    record: Option<PodRecord>,
    ipams: Vec<Arc<Ipam>>,
}

/// What the lock guards: the pods' records (mirrored on disk), the subnets
/// of new pods, the opened IPAM of each subnet (opened only under the lock,
/// as opening clears half-done claims), and whether this process has checked
/// the bridge and written the table for the current subnets yet.
#[derive(Debug)]
struct State {
    pods: BTreeMap<String, PodRecord>,
    subnets: PodSubnets,
    ipams: BTreeMap<IpNet, Arc<Ipam>>,
    bridge_checked: bool,
}

impl State {
    /// Every subnet the bridge and the table serve: those of new pods and
    /// those live pods hold addresses of.
    fn subnets_in_use(&self) -> BTreeSet<IpNet> {
        self.subnets
            .all()
            .chain(
                self.pods
                    .values()
                    .flat_map(|r| r.addresses.iter().filter_map(|a| a.subnet())),
            )
            .collect()
    }
}

/// The built-in bridge network.
#[derive(Debug)]
pub struct BridgeNetwork {
    bridge: String,
    /// The config's subnets, before any pod CIDR.
    configured: PodSubnets,
    mtu: u32,
    table: String,
    records: PathBuf,
    ipam_dir: PathBuf,
    pod_cidr_path: PathBuf,
    nft: nft::Nftables,
    state: Mutex<State>,
}

impl BridgeNetwork {
    /// Checks the config and loads the records kept under `dir` (made if
    /// missing; `<state_dir>/network` suits, as pods do not outlive a
    /// reboot). Touches no kernel object: those are made on first use.
    pub fn new(config: &NetworkConfig, dir: &Path) -> Result<BridgeNetwork, NetworkError> {
        let subnet = config
            .subnet
            .parse::<Ipv4Net>()
            .map_err(|e| {
                subnet_error(
                    "network.subnet",
                    &config.subnet,
                    e,
                    "IPv4; an IPv6 subnet goes in network.subnet_v6",
                )
            })?
            .trunc();
        let subnet_v6 = match config.subnet_v6.as_str() {
            "" => None,
            text => Some(
                text.parse::<Ipv6Net>()
                    .map_err(|e| subnet_error("network.subnet_v6", text, e, "IPv6"))?
                    .trunc(),
            ),
        };
        let configured = PodSubnets {
            v4: subnet,
            v6: subnet_v6,
        };
        for net in configured.all() {
            ipam::check_size(net)?;
        }
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
                    Ok(mut record) => {
                        if let Some(ip) = record.ip.take()
                            && record.addresses.is_empty()
                        {
                            record.addresses = vec![PodAddress {
                                ip: IpAddr::V4(ip),
                                prefix_len: subnet.prefix_len(),
                            }];
                        }
                        pods.insert(record.pod_id.clone(), record);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an unreadable pod network record")
                    }
                }
            }
        }
        let pod_cidr_path = dir.join(POD_CIDR_FILE);
        let subnets = if pod_cidr_path.exists() {
            let cidrs: Vec<String> = store::read_json(&pod_cidr_path)?;
            let cidrs = cidrs
                .iter()
                .map(|c| c.parse::<IpNet>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| NetworkError::Config(format!("{}: {e}", pod_cidr_path.display())))?;
            configured.with_pod_cidrs(&cidrs)?
        } else {
            configured
        };
        Ok(BridgeNetwork {
            bridge: config.bridge.clone(),
            configured,
            mtu: config.mtu,
            table: config.nft_table.clone(),
            records,
            ipam_dir: dir.join("ipam"),
            pod_cidr_path,
            nft: nft::Nftables::new(),
            state: Mutex::new(State {
                pods,
                subnets,
                ipams: BTreeMap::new(),
                bridge_checked: false,
            }),
        })
    }

    /// Makes new pods take their addresses from `cidrs` (kubelet's pod CIDR,
    /// one subnet per family at most) in place of the configured subnet of
    /// the same family; pods set up before keep theirs. Kept on disk, so a
    /// restart keeps it. Nothing for an empty list.
    pub fn set_pod_cidrs(&self, cidrs: &[IpNet]) -> Result<(), NetworkError> {
        if cidrs.is_empty() {
            return Ok(());
        }
        let subnets = self.configured.with_pod_cidrs(cidrs)?;
        let mut state = self.lock();
        // Two overlapping subnets have IPAM directories of their own, which
        // could hand out one address twice: a pod CIDR may only overlap a
        // subnet pods hold addresses in by being that subnet.
        let held: BTreeSet<IpNet> = state
            .pods
            .values()
            .flat_map(|r| r.addresses.iter().filter_map(|a| a.subnet()))
            .collect();
        for new in subnets.all() {
            if let Some(old) = held.iter().find(|old| {
                **old != new && (old.contains(&new.network()) || new.contains(&old.network()))
            }) {
                return Err(NetworkError::InvalidPodCidr(format!(
                    "{new} overlaps {old}, where pods still hold addresses; \
                     a pod CIDR cannot overlap their subnet until they are gone"
                )));
            }
        }
        let text: Vec<String> = cidrs.iter().map(|c| c.trunc().to_string()).collect();
        store::write_json(&self.pod_cidr_path, &text, Durability::Crash)?;
        if subnets != state.subnets {
            tracing::info!(pod_cidr = %cidr_list(cidrs), "new pods get addresses from the pod CIDR");
            state.subnets = subnets;
            // The next set-up adds the new gateway and masquerades the new subnet.
            state.bridge_checked = false;
        }
        Ok(())
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The IPv4 subnet new pods get an address from.
    pub fn subnet(&self) -> Ipv4Net {
        self.lock().subnets.v4
    }

    /// The IPv6 subnet new pods get an address from, if any.
    pub fn subnet_v6(&self) -> Option<Ipv6Net> {
        self.lock().subnets.v6
    }

    /// The bridge's IPv4 address in [`Self::subnet`].
    pub fn gateway(&self) -> Ipv4Addr {
        // The first host address, as ipam::gateway has it for both families.
        Ipv4Addr::from(u32::from(self.subnet().network()) + 1)
    }

    /// The bridge's IPv6 address in [`Self::subnet_v6`], if any.
    pub fn gateway_v6(&self) -> Option<IpAddr> {
        self.subnet_v6().map(|net| ipam::gateway(IpNet::V6(net)))
    }

    /// The addresses a pod holds, IPv4 first; none when its network is not set up.
    pub fn pod_ips(&self, pod_id: &str) -> Vec<IpAddr> {
        self.lock()
            .pods
            .get(pod_id)
            .map(|r| r.addresses.iter().map(|a| a.ip).collect())
            .unwrap_or_default()
    }

    /// The IPAM of `subnet`, opened on first use; the caller holds the lock.
    fn ipam(&self, state: &mut State, subnet: IpNet) -> Result<Arc<Ipam>, NetworkError> {
        if let Some(ipam) = state.ipams.get(&subnet) {
            return Ok(ipam.clone());
        }
        let ipam = Arc::new(Ipam::open(&self.ipam_dir, subnet)?);
        state.ipams.insert(subnet, ipam.clone());
        Ok(ipam)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves records that are still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_path(&self, pod_id: &str) -> PathBuf {
        self.records.join(format!("{pod_id}.json"))
    }

    /// Replaces the nftables table with one for the pods in `state`.
    fn write_table(&self, state: &State) -> Result<(), NetworkError> {
        let pods: Vec<nft::PodPorts<'_>> = state
            .pods
            .values()
            .filter(|r| !r.ports.is_empty())
            .filter_map(|r| {
                Some(nft::PodPorts {
                    pod_id: &r.pod_id,
                    namespace: &r.namespace,
                    name: &r.name,
                    ip: r.ipv4()?,
                    ipv6: r.ipv6(),
                    ports: &r.ports,
                })
            })
            .collect();
        let subnets: Vec<IpNet> = state.subnets_in_use().into_iter().collect();
        let spec = nft::TableSpec {
            table: &self.table,
            bridge: &self.bridge,
            subnets: &subnets,
        };
        self.nft.apply(&nft::ruleset(&spec, &pods))
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
        let subnets = state.subnets_in_use();
        if subnets.iter().any(|s| matches!(s, IpNet::V6(_))) {
            // Before the addresses: the kernel refuses IPv6 addresses on a
            // link with IPv6 disabled.
            set_sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", self.bridge), "0")?;
            // The kernel sends the neighbour solicitation for a forwarded
            // packet from the bridge's link-local address, and sends none
            // while that address is tentative: without this, IPv6 between
            // pods and the world fails for the first second or two of a new
            // bridge (DAD starts when the first pod's veth gives it carrier).
            set_sysctl(&format!("net/ipv6/conf/{}/accept_dad", self.bridge), "0")?;
            set_sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        let addresses = socket
            .addresses(link.index)
            .map_err(netlink("list the bridge's addresses"))?;
        let gateways = subnets
            .iter()
            .map(|subnet| IpNet::new(ipam::gateway(*subnet), subnet.prefix_len()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NetworkError::Config(e.to_string()))?;
        // The gateway of a subnet no pod uses any more (the pod CIDR moved
        // on) goes first, so that a later subnet holding that address can
        // hand it to a pod, and so that a gateway with the same address and
        // a new prefix can take its place (IPv6 refuses one address twice).
        // The bridge is berth's: every address on it but the IPv6 link-local
        // one is a gateway berth put there.
        for stale in addresses
            .iter()
            .filter(|a| !gateways.contains(a))
            .filter(|a| !matches!(a.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local()))
        {
            tracing::info!(bridge = %self.bridge, address = %stale, "removing the gateway of a subnet no longer in use");
            socket
                .delete_address(link.index, *stale)
                .map_err(netlink(&format!(
                    "remove the stale gateway address {stale}"
                )))?;
        }
        for gateway in gateways.iter().filter(|g| !addresses.contains(g)) {
            match socket.add_address(link.index, *gateway) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                    return Err(netlink(&format!("add the gateway address {gateway}"))(e));
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
        let existing = state.pods.get(&pod.pod_id).map(|r| r.addresses.clone());
        let has_v6 = match &existing {
            Some(addresses) => addresses.iter().any(|a| a.ip.is_ipv6()),
            None => state.subnets.v6.is_some(),
        };
        if let Some(port) = ports
            .iter()
            .find(|p| p.host_ip.is_some_and(|ip| ip.is_ipv6()))
            .filter(|_| !has_v6)
        {
            return Err(NetworkError::InvalidPortMapping(format!(
                "host port {port} is on an IPv6 address, and the pod network has no IPv6 \
                 subnet (network.subnet_v6)"
            )));
        }
        let (addresses, existed) = match existing {
            Some(addresses) => (addresses, true),
            None => (self.allocate(state, &pod.pod_id)?, false),
        };
        let record = PodRecord {
            pod_id: pod.pod_id.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            addresses,
            ip: None,
            host_veth: host_veth_name(&pod.pod_id),
            ports,
        };
        if let Err(e) =
            store::write_json(&self.record_path(&pod.pod_id), &record, Durability::Crash)
        {
            if !existed {
                self.free(state, &pod.pod_id, &record.addresses);
            }
            return Err(e.into());
        }
        state.pods.insert(pod.pod_id.clone(), record.clone());
        Ok((record, existed))
    }

    /// Claims an address in each subnet of new pods; all or none.
    fn allocate(&self, state: &mut State, pod_id: &str) -> Result<Vec<PodAddress>, NetworkError> {
        let mut addresses = Vec::new();
        for subnet in state.subnets.all() {
            let claimed = self
                .ipam(state, subnet)
                .and_then(|ipam| ipam.allocate(pod_id));
            match claimed {
                Ok(ip) => addresses.push(PodAddress {
                    ip,
                    prefix_len: subnet.prefix_len(),
                }),
                Err(e) => {
                    self.free(state, pod_id, &addresses);
                    return Err(e);
                }
            }
        }
        Ok(addresses)
    }

    /// Frees addresses claimed for a pod whose set-up went no further.
    fn free(&self, state: &mut State, pod_id: &str, addresses: &[PodAddress]) {
        for address in addresses {
            let freed = address
                .subnet()
                .ok_or_else(|| NetworkError::Setup(format!("bad address {}", address.ip)))
                .and_then(|subnet| self.ipam(state, subnet))
                .and_then(|ipam| ipam.release(address.ip, pod_id));
            if let Err(e) = freed {
                tracing::warn!(pod = %pod_id, ip = %address.ip, error = %e, "freeing an address");
            }
        }
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
        for address in &record.addresses {
            let net = address.net()?;
            inside
                .add_address(eth0.index, net)
                .map_err(netlink(&format!("add the pod's address {net}")))?;
        }
        // After every address: a route's gateway must be on a link's subnet.
        for address in &record.addresses {
            let gateway = ipam::gateway(address.net()?);
            inside
                .add_default_route(gateway, eth0.index)
                .map_err(netlink(&format!(
                    "add the pod's default route via {gateway}"
                )))?;
        }
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
                ipams: Vec::new(),
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
                ipams: Vec::new(),
            };
        }
        let mut ipams = Vec::new();
        for subnet in record.addresses.iter().filter_map(|a| a.subnet()) {
            // One that cannot be opened keeps its claim; `reconcile` frees it.
            match self.ipam(state, subnet) {
                Ok(ipam) => ipams.push(ipam),
                Err(e) => errors.push(e),
            }
        }
        Detached {
            pod_id: pod_id.to_string(),
            host_veth,
            record: Some(record),
            ipams,
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
            ipams,
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
        for address in &record.addresses {
            let Some(ipam) = ipams.iter().find(|i| i.subnet().contains(&address.ip)) else {
                continue;
            };
            if let Err(e) = ipam.release(address.ip, &pod_id) {
                errors.push(e);
            }
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
        let subnets = match Ipam::subnets_in(&self.ipam_dir) {
            Ok(subnets) => subnets,
            Err(e) => {
                errors.push(e);
                Vec::new()
            }
        };
        for subnet in subnets {
            let claims = self
                .ipam(&mut state, subnet)
                .and_then(|ipam| Ok((ipam.allocations()?, ipam)));
            match claims {
                Ok((claims, ipam)) => {
                    for (ip, owner) in claims {
                        if !state.pods.get(&owner).is_some_and(|r| r.holds(ip)) {
                            tracing::info!(%ip, pod = %owner, "freeing an address no pod record holds");
                            if let Err(e) = ipam.release(ip, &owner) {
                                errors.push(e);
                            }
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
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
                ips: record.addresses.iter().map(|a| a.ip).collect(),
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

    fn set_pod_cidrs(&self, cidrs: &[IpNet]) -> Result<(), NetworkError> {
        BridgeNetwork::set_pod_cidrs(self, cidrs)
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "bridge",
            "bridge": self.bridge,
            "subnet": self.subnet().to_string(),
            "gateway": self.gateway().to_string(),
            "subnetV6": self.subnet_v6().map(|s| s.to_string()),
            "gatewayV6": self.gateway_v6().map(|g| g.to_string()),
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
        let pod = |id: &str, host_port: i32| test_pod(id, &format!("name-{id}"), host_port, "");
        let a_ip = {
            let net = BridgeNetwork::new(&cfg, dir.path()).expect("new");
            let mut state = net.lock();
            let ports = portmap::host_ports(&pod("aaaa", 8080).port_mappings).expect("ports");
            let (record, again) = net
                .claim(&mut state, &pod("aaaa", 8080), ports)
                .expect("claim");
            assert!(!again);
            record.addresses
        };
        let net = BridgeNetwork::new(&cfg, dir.path()).expect("reload");
        assert_eq!(
            net.pod_ips("aaaa"),
            a_ip.iter().map(|a| a.ip).collect::<Vec<_>>()
        );
        let mut state = net.lock();
        let ports = portmap::host_ports(&pod("bbbb", 8080).port_mappings).expect("ports");
        let err = net
            .claim(&mut state, &pod("bbbb", 8080), ports)
            .expect_err("port taken")
            .to_string();
        assert!(err.contains("8080/tcp"), "{err}");
        assert!(err.contains("ns/name-aaaa (aaaa)"), "{err}");
        // The refused pod got no address.
        let subnet = state.subnets.v4.into();
        let ipam = net.ipam(&mut state, subnet).expect("ipam");
        assert_eq!(ipam.allocations().expect("list").len(), 1);
        // The same pod again keeps its address.
        let ports = portmap::host_ports(&pod("aaaa", 8080).port_mappings).expect("ports");
        let (again, repeated) = net
            .claim(&mut state, &pod("aaaa", 8080), ports)
            .expect("again");
        assert!(repeated);
        assert_eq!(again.addresses, a_ip);
    }

    /// A pod in namespace `ns` mapping container port 80 to `host_port`.
    fn test_pod(id: &str, name: &str, host_port: i32, host_ip: &str) -> PodNetworkRequest {
        PodNetworkRequest {
            pod_id: id.to_string(),
            name: name.to_string(),
            namespace: "ns".to_string(),
            uid: String::new(),
            netns: PathBuf::from("/nonexistent"),
            port_mappings: vec![crate::runtime::pod::PortMapping {
                protocol: "TCP".to_string(),
                container_port: 80,
                host_port,
                host_ip: host_ip.to_string(),
            }],
        }
    }

    /// A pod publishing 8080 on `host_ip`, or nothing when it is empty.
    fn plain_pod(id: &str, host_ip: &str) -> PodNetworkRequest {
        test_pod(id, id, if host_ip.is_empty() { 0 } else { 8080 }, host_ip)
    }

    fn claim_ips(
        net: &BridgeNetwork,
        pod: &PodNetworkRequest,
    ) -> Result<Vec<IpAddr>, NetworkError> {
        let mut state = net.lock();
        let ports = portmap::host_ports(&pod.port_mappings)?;
        let (record, _) = net.claim(&mut state, pod, ports)?;
        Ok(record.addresses.iter().map(|a| a.ip).collect())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn dual_stack_pods_get_an_address_of_each_family_ipv4_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config("10.66.0.0/24", "berth0", "berth");
        cfg.subnet_v6 = "fd66:0:0:7::/64".to_string();
        let net = BridgeNetwork::new(&cfg, dir.path()).expect("new");
        assert_eq!(net.gateway_v6(), Some(ip("fd66:0:0:7::1")));
        assert_eq!(net.describe()["subnetV6"], "fd66:0:0:7::/64");
        let ips = claim_ips(&net, &plain_pod("aaaa", "")).expect("claim");
        assert_eq!(ips, vec![ip("10.66.0.2"), ip("fd66:0:0:7::2")]);
        claim_ips(&net, &plain_pod("bbbb", "fd66:0:0:7::1")).expect("an IPv6 host IP");

        let v4_only = tempfile::tempdir().expect("tempdir");
        let net = BridgeNetwork::new(&config("10.66.0.0/24", "berth0", "berth"), v4_only.path())
            .expect("new");
        let err = claim_ips(&net, &plain_pod("cccc", "fd66::1"))
            .expect_err("no IPv6 subnet")
            .to_string();
        assert!(err.contains("subnet_v6"), "{err}");
        assert!(net.pod_ips("cccc").is_empty());
    }

    #[test]
    fn a_pod_cidr_serves_new_pods_and_outlives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config("10.66.0.0/24", "berth0", "berth");
        let net = BridgeNetwork::new(&cfg, dir.path()).expect("new");
        let old = claim_ips(&net, &plain_pod("aaaa", "")).expect("claim");
        assert_eq!(old, vec![ip("10.66.0.2")]);
        for (bad, want) in [
            ("10.77.0.0/24,10.88.0.0/24", "more than one"),
            ("10.77.0.0/31", "too small"),
        ] {
            let cidrs: Vec<IpNet> = bad.split(',').map(|c| c.parse().expect("cidr")).collect();
            let err = net.set_pod_cidrs(&cidrs).expect_err(bad);
            assert!(matches!(err, NetworkError::InvalidPodCidr(_)), "{err}");
            assert!(err.to_string().contains(want), "{err}");
        }
        for overlapping in ["10.66.0.0/16", "10.66.0.128/25"] {
            let err = net
                .set_pod_cidrs(&[overlapping.parse().expect("cidr")])
                .expect_err(overlapping);
            assert!(err.to_string().contains("overlaps 10.66.0.0/24"), "{err}");
        }
        net.set_pod_cidrs(&["10.66.0.0/24".parse().expect("cidr")])
            .expect("the subnet in use itself");
        net.set_pod_cidrs(&[]).expect("empty: nothing");
        assert_eq!(net.subnet().to_string(), "10.66.0.0/24");

        let cidrs = [
            "10.77.0.0/24".parse().expect("cidr"),
            "fd77::/64".parse().expect("cidr"),
        ];
        net.set_pod_cidrs(&cidrs).expect("pod CIDR");
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 77, 0, 1));
        let new = claim_ips(&net, &plain_pod("bbbb", "")).expect("claim");
        assert_eq!(new, vec![ip("10.77.0.2"), ip("fd77::2")]);
        assert_eq!(net.pod_ips("aaaa"), old, "pods keep their addresses");
        let in_use: Vec<String> = net
            .lock()
            .subnets_in_use()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(in_use, ["10.66.0.0/24", "10.77.0.0/24", "fd77::/64"]);

        let restarted = BridgeNetwork::new(&cfg, dir.path()).expect("reload");
        assert_eq!(restarted.subnet().to_string(), "10.77.0.0/24");
        assert_eq!(
            restarted.subnet_v6().map(|s| s.to_string()).as_deref(),
            Some("fd77::/64")
        );
        assert_eq!(
            claim_ips(&restarted, &plain_pod("cccc", "")).expect("claim"),
            vec![ip("10.77.0.3"), ip("fd77::3")]
        );
    }

    #[test]
    fn records_from_before_ipv6_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pods = dir.path().join("pods");
        std::fs::create_dir_all(&pods).expect("pods dir");
        std::fs::write(
            pods.join("aaaa.json"),
            r#"{"pod_id":"aaaa","namespace":"ns","name":"old","ip":"10.66.0.9","host_veth":"bvx","ports":[]}"#,
        )
        .expect("old record");
        let net = BridgeNetwork::new(&config("10.66.0.0/24", "berth0", "berth"), dir.path())
            .expect("new");
        assert_eq!(net.pod_ips("aaaa"), vec![ip("10.66.0.9")]);
        let subnets = net.lock().subnets_in_use();
        assert_eq!(subnets.len(), 1, "{subnets:?}");
    }
}
