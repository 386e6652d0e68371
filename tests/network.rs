//! The built-in bridge network through its own API, as root: pods in network
//! namespaces of the test's own, proved with real TCP connections (pod to
//! pod, pod to host, host ports from the host, from outside and hairpin),
//! then shown to leave nothing behind; the same over IPv6 on a dual-stack
//! network, and a pod CIDR set while pods run. One test goes through a real
//! berthd and busybox containers: dual-stack pods over CRI, and
//! UpdateRuntimeConfig.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use berth::cni::bridge::{BridgeNetwork, host_veth_name};
use berth::cni::{PodNetwork, PodNetworkRequest};
use berth::config::NetworkConfig;
use berth::runtime::namespace::{self, NamespaceKind, NamespaceSetup};
use berth::runtime::pod::PortMapping;
use common::berthd::BerthdOptions;
use common::cri_pod::{
    self, CriNode, nc_from, pod_ips, remove_pod, run_pod, start_container, update_pod_cidr,
};
use nix::sys::signal::Signal;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: the network tests need root");
    false
}

/// Names, subnet and ports of one test: unique per process and test, so
/// tests (and other runs of them) go in parallel without meeting.
struct Names {
    bridge: String,
    table: String,
    subnet: String,
    /// A ULA /64 of the test's own, for dual-stack tests.
    subnet_v6: String,
    /// A pod CIDR (IPv4 and IPv6) of the test's own, to move new pods to.
    pod_cidr: String,
    /// Third octet of the test's outside link, 10.199.<x>.0/30.
    link: u8,
    port_base: u16,
}

impl Names {
    fn unique() -> Names {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        Names {
            bridge: format!("btn{}x{n}", pid % 100_000),
            table: format!("berth_tn_{pid}_{n}"),
            subnet: format!("10.{}.{}.0/24", 160 + pid % 39, n % 256),
            subnet_v6: format!("fd66:{:x}:{:x}::/64", pid % 65_536, n % 65_536),
            pod_cidr: format!(
                "10.{}.{}.0/24,fd67:{:x}:{:x}::/64",
                200 + pid % 39,
                n % 256,
                pid % 65_536,
                n % 65_536
            ),
            link: ((pid * 8 + n) % 256) as u8,
            port_base: 20_000 + ((pid % 2_000) * 20 + n * 5) as u16 % 40_000,
        }
    }
}

/// A BridgeNetwork of the test's own, removed whole on drop.
struct TestNetwork {
    net: BridgeNetwork,
    names: Names,
    dir: tempfile::TempDir,
}

impl TestNetwork {
    fn new() -> TestNetwork {
        TestNetwork::with(false)
    }

    /// With an IPv6 subnet too.
    fn dual_stack() -> TestNetwork {
        TestNetwork::with(true)
    }

    fn with(dual_stack: bool) -> TestNetwork {
        let names = Names::unique();
        let dir = tempfile::tempdir().expect("tempdir");
        let net =
            BridgeNetwork::new(&config(&names, dual_stack), dir.path()).expect("bridge network");
        TestNetwork { net, names, dir }
    }

    /// The same (single-stack) network as a restarted berthd sees it.
    fn reopen(&self) -> BridgeNetwork {
        BridgeNetwork::new(&config(&self.names, false), self.dir.path()).expect("reopen")
    }

    fn ipam_dir(&self) -> PathBuf {
        let subnet = self.net.subnet();
        self.ipam_dir_of(&format!("{}-{}", subnet.addr(), subnet.prefix_len()))
    }

    fn ipam_dir_of(&self, subnet_dir: &str) -> PathBuf {
        self.dir.path().join("ipam").join(subnet_dir)
    }

    /// The addresses claimed under every subnet's IPAM directory.
    fn claimed(&self) -> Vec<IpAddr> {
        let mut all = Vec::new();
        for subnet in std::fs::read_dir(self.dir.path().join("ipam"))
            .expect("ipam")
            .flatten()
        {
            for entry in subnet.path().read_dir().expect("subnet dir").flatten() {
                if let Ok(ip) = entry.file_name().to_string_lossy().parse::<IpAddr>() {
                    all.push(ip);
                }
            }
        }
        all
    }

    fn table_text(&self) -> String {
        let out = Command::new("nft")
            .args(["list", "table", "inet", &self.names.table])
            .output()
            .expect("nft list table");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn table_exists(&self) -> bool {
        Command::new("nft")
            .args(["list", "table", "inet", &self.names.table])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        if let Err(e) = self.net.remove_all() {
            eprintln!("remove_all: {e}");
        }
    }
}

fn config(names: &Names, dual_stack: bool) -> NetworkConfig {
    NetworkConfig {
        bridge: names.bridge.clone(),
        subnet: names.subnet.clone(),
        subnet_v6: if dual_stack {
            names.subnet_v6.clone()
        } else {
            String::new()
        },
        nft_table: names.table.clone(),
        ..NetworkConfig::default()
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// A network namespace of the test's own, pinned like a pod's; unpinned on drop.
struct Netns {
    dir: tempfile::TempDir,
}

impl Netns {
    fn new() -> Netns {
        let dir = tempfile::tempdir().expect("tempdir");
        namespace::create_pinned(
            &dir.path().join("ns"),
            NamespaceSetup {
                kinds: vec![NamespaceKind::Net],
                hostname: String::new(),
                sysctls: BTreeMap::new(),
            },
        )
        .expect("pinned netns");
        Netns { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("ns").join("net")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        namespace::remove_pins(&self.dir.path().join("ns"), &[NamespaceKind::Net]);
    }
}

/// Runs `f` on a new thread inside the network namespace at `netns` (or the
/// host's, for None). Sockets made there stay in that namespace.
fn in_netns<T: Send + 'static>(netns: Option<&Path>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = netns.map(|p| std::fs::File::open(p).expect("open netns"));
    std::thread::spawn(move || {
        if let Some(file) = file {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP server that answers each connection with `<marker> <peer address>`.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(netns: Option<&Path>, bind: SocketAddr, marker: &str) -> Server {
        let listener = in_netns(netns, move || TcpListener::bind(bind)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let marker = marker.to_string();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, peer)) => {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.write_all(format!("{marker} {}\n", peer.ip()).as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Server {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from `netns` to `to` and returns what the server said.
fn fetch(netns: Option<&Path>, to: SocketAddr) -> std::io::Result<String> {
    in_netns(netns, move || {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text.trim().to_string())
    })
}

fn pod_id() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("urandom");
    hex::encode(bytes)
}

fn tcp(container_port: i32, host_port: u16, host_ip: &str) -> PortMapping {
    PortMapping {
        protocol: "TCP".to_string(),
        container_port,
        host_port: i32::from(host_port),
        host_ip: host_ip.to_string(),
    }
}

fn request(name: &str, netns: &Path, ports: Vec<PortMapping>) -> PodNetworkRequest {
    PodNetworkRequest {
        pod_id: pod_id(),
        name: name.to_string(),
        namespace: "test".to_string(),
        uid: String::new(),
        netns: netns.to_path_buf(),
        port_mappings: ports,
    }
}

fn ipv4(status: &berth::cni::PodNetworkStatus) -> Ipv4Addr {
    match status.ips.first() {
        Some(std::net::IpAddr::V4(ip)) => *ip,
        other => panic!("no IPv4 address: {other:?}"),
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn pods_reach_each_other_the_host_and_their_host_ports() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::new();
    let gw = t.net.gateway();
    let hp = t.names.port_base;
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let a = request("a", &ns_a.path(), vec![tcp(80, hp, ""), tcp(81, 0, "")]);
    let b = request("b", &ns_b.path(), vec![]);

    let started = Instant::now();
    let a_ip = ipv4(&t.net.set_up(&a).expect("set up a"));
    eprintln!(
        "set_up with a host port (first pod, makes the bridge): {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let b_ip = ipv4(&t.net.set_up(&b).expect("set up b"));
    eprintln!("set_up without host ports: {:?}", started.elapsed());
    assert!(t.net.subnet().contains(&a_ip) && t.net.subnet().contains(&b_ip));
    assert_ne!(a_ip, b_ip);
    assert!(link_exists(&t.names.bridge));
    assert!(link_exists(&host_veth_name(&a.pod_id)));
    assert!(link_exists(&host_veth_name(&b.pod_id)));

    let _server_a = Server::start(Some(&ns_a.path()), sa(Ipv4Addr::UNSPECIFIED, 80), "A");
    let server_b = Server::start(Some(&ns_b.path()), sa(Ipv4Addr::UNSPECIFIED, 0), "B");
    let host = Server::start(None, sa(gw, 0), "HOST");

    // Pod to pod by address, both ways; on the bridge nothing is rewritten.
    assert_eq!(
        fetch(Some(&ns_b.path()), sa(a_ip, 80)).expect("b->a"),
        format!("A {b_ip}")
    );
    let b_port = server_b.addr.port();
    assert_eq!(
        fetch(Some(&ns_a.path()), sa(b_ip, b_port)).expect("a->b"),
        format!("B {a_ip}")
    );
    // Pod to a server on the host's bridge address.
    assert_eq!(
        fetch(Some(&ns_b.path()), sa(gw, host.addr.port())).expect("b->host"),
        format!("HOST {b_ip}")
    );
    // The host port from the host: on 127.0.0.1 (answers as the gateway
    // after masquerade) and on the bridge address.
    assert_eq!(
        fetch(None, sa(Ipv4Addr::LOCALHOST, hp)).expect("127.0.0.1 -> a"),
        format!("A {gw}")
    );
    assert_eq!(fetch(None, sa(gw, hp)).expect("gw -> a"), format!("A {gw}"));
    // Hairpin: a pod through its own host port, and another pod through it.
    assert_eq!(
        fetch(Some(&ns_a.path()), sa(gw, hp)).expect("a->a"),
        format!("A {gw}")
    );
    assert_eq!(
        fetch(Some(&ns_b.path()), sa(gw, hp)).expect("b->a"),
        format!("A {gw}")
    );
    // A mapping with only a container port publishes nothing.
    assert!(!t.table_text().contains("dport 81 "));
    let rules = t.table_text();
    assert!(rules.contains(&a.pod_id), "rules name the pod: {rules}");
    assert!(rules.contains("test/a"), "rules name the pod: {rules}");

    // Tear-down of a removes its veth, rules and address; b is untouched.
    let started = Instant::now();
    t.net.tear_down(&a).expect("tear down a");
    eprintln!("tear_down with a host port: {:?}", started.elapsed());
    assert!(!link_exists(&host_veth_name(&a.pod_id)));
    assert!(!t.table_text().contains(&a.pod_id));
    assert!(!t.ipam_dir().join(a_ip.to_string()).exists());
    assert!(t.net.pod_ips(&a.pod_id).is_empty());
    assert!(
        fetch(None, sa(Ipv4Addr::LOCALHOST, hp)).is_err(),
        "host port gone"
    );
    t.net.tear_down(&a).expect("a second tear-down is fine");
    assert_eq!(
        fetch(Some(&ns_a.path()), sa(b_ip, b_port)).ok(),
        None,
        "a has no network"
    );
    assert_eq!(
        fetch(None, sa(b_ip, b_port)).expect("host->b"),
        format!("B {gw}")
    );

    let started = Instant::now();
    t.net.tear_down(&b).expect("tear down b");
    eprintln!("tear_down without host ports: {:?}", started.elapsed());
    assert!(
        t.ipam_dir()
            .read_dir()
            .expect("ipam")
            .flatten()
            .all(|e| { e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_err() })
    );

    t.net.remove_all().expect("remove all");
    assert!(!link_exists(&t.names.bridge));
    assert!(!link_exists(&host_veth_name(&b.pod_id)));
    assert!(!t.table_exists());
}

#[test]
fn host_ip_restricts_and_a_taken_host_port_is_refused() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::new();
    let gw = t.net.gateway();
    let (hp, hp2) = (t.names.port_base, t.names.port_base + 1);
    let (ns_c, ns_d) = (Netns::new(), Netns::new());
    let c = request(
        "c",
        &ns_c.path(),
        vec![tcp(80, hp, &gw.to_string()), tcp(80, hp2, "")],
    );
    ipv4(&t.net.set_up(&c).expect("set up c"));
    let _server = Server::start(Some(&ns_c.path()), sa(Ipv4Addr::UNSPECIFIED, 80), "C");

    assert_eq!(
        fetch(None, sa(gw, hp)).expect("on its host IP"),
        format!("C {gw}")
    );
    // Nothing of c answers on other addresses for hp (the host may or may
    // not have a listener of its own there; it is not c).
    let other = fetch(None, sa(Ipv4Addr::LOCALHOST, hp));
    assert!(
        !other.as_deref().unwrap_or("").starts_with('C'),
        "{other:?}"
    );

    // The same port, wildcard or on the same address, for another pod: refused
    // with the port and the holder named, and nothing made for d.
    for mapping in [
        tcp(80, hp, ""),
        tcp(80, hp, &gw.to_string()),
        tcp(8080, hp2, "127.0.0.1"),
    ] {
        let d = request("d", &ns_d.path(), vec![mapping]);
        let err = t.net.set_up(&d).expect_err("port taken").to_string();
        assert!(err.contains("/tcp"), "{err}");
        assert!(err.contains(&c.pod_id) && err.contains("test/c"), "{err}");
        assert!(!link_exists(&host_veth_name(&d.pod_id)));
        assert!(t.net.pod_ips(&d.pod_id).is_empty());
    }
    // Another address for the same port number is fine.
    let d = request("d", &ns_d.path(), vec![tcp(80, hp, "127.0.0.1")]);
    t.net.set_up(&d).expect("same port on another address");
    let _server_d = Server::start(Some(&ns_d.path()), sa(Ipv4Addr::UNSPECIFIED, 80), "D");
    assert_eq!(
        fetch(None, sa(Ipv4Addr::LOCALHOST, hp)).expect("d"),
        format!("D {gw}")
    );
    assert_eq!(fetch(None, sa(gw, hp)).expect("still c"), format!("C {gw}"));
    let ipam_entries = t.ipam_dir().read_dir().expect("ipam").count();
    assert!(ipam_entries >= 2);
}

/// A third namespace wired to the host by the test's own veth pair in
/// 10.199.<x>.0/30: a client there reaches the host port through the host's
/// side of that link, and pod egress to it is masqueraded.
#[test]
fn an_outside_client_reaches_a_host_port_and_egress_is_masqueraded() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::new();
    let hp = t.names.port_base;
    let outside = Netns::new();
    let link = OutsideLink::new(&outside, &t.names);
    let ns_p = Netns::new();
    let p = request("p", &ns_p.path(), vec![tcp(80, hp, "")]);
    let p_ip = ipv4(&t.net.set_up(&p).expect("set up p"));
    let _server = Server::start(Some(&ns_p.path()), sa(Ipv4Addr::UNSPECIFIED, 80), "P");

    // In from outside: DNAT only, the pod sees the client's own address.
    assert_eq!(
        fetch(Some(&outside.path()), sa(link.host, hp)).expect("outside -> p"),
        format!("P {}", link.outside)
    );
    // Out from the pod: masqueraded to the host's address on that link.
    let far = Server::start(Some(&outside.path()), sa(link.outside, 0), "FAR");
    assert_eq!(
        fetch(Some(&ns_p.path()), far.addr).expect("p -> outside"),
        format!("FAR {}", link.host)
    );
    assert!(t.table_text().contains(&format!("dnat ip to {p_ip}:80")));
}

/// The same over IPv6, on a dual-stack network: DNAT only on the way in,
/// masquerade on the way out.
#[test]
fn an_outside_client_reaches_a_host_port_and_egress_is_masqueraded_over_ipv6() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::dual_stack();
    let hp = t.names.port_base;
    let outside = Netns::new();
    let link = OutsideLink::new(&outside, &t.names);
    let (host6, outside6) = link.add_ipv6(&outside);
    let ns_p = Netns::new();
    let p = request("p", &ns_p.path(), vec![tcp(80, hp, "")]);
    let p6 = ipv6(&t.net.set_up(&p).expect("set up p"));
    let _server = Server::start(Some(&ns_p.path()), sa6(Ipv6Addr::UNSPECIFIED, 80), "P");

    assert_eq!(
        fetch(Some(&outside.path()), sa6(host6, hp)).expect("outside -> p over IPv6"),
        format!("P {outside6}")
    );
    let far = Server::start(Some(&outside.path()), sa6(outside6, 0), "FAR");
    assert_eq!(
        fetch(Some(&ns_p.path()), far.addr).expect("p -> outside over IPv6"),
        format!("FAR {host6}")
    );
    assert!(t.table_text().contains(&format!("dnat ip6 to [{p6}]:80")));
}

/// The test's own veth pair between the host and `ns`.
struct OutsideLink {
    name: String,
    host: Ipv4Addr,
    outside: Ipv4Addr,
}

impl OutsideLink {
    fn new(ns: &Netns, names: &Names) -> OutsideLink {
        let name = format!("bto{}", &names.bridge[3..]);
        let host = Ipv4Addr::new(10, 199, names.link, 1);
        let outside = Ipv4Addr::new(10, 199, names.link, 2);
        let pin = ns.path().display().to_string();
        let guard = OutsideLink {
            name: name.clone(),
            host,
            outside,
        };
        run(&[
            "ip", "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &pin,
        ]);
        run(&["ip", "addr", "add", &format!("{host}/30"), "dev", &name]);
        run(&["ip", "link", "set", &name, "up"]);
        let inside = format!("--net={pin}");
        run(&[
            "nsenter",
            &inside,
            "ip",
            "addr",
            "add",
            &format!("{outside}/30"),
            "dev",
            "eth0",
        ]);
        run(&["nsenter", &inside, "ip", "link", "set", "eth0", "up"]);
        guard
    }

    /// Adds `fd69:<pid>:<x>::1/64` on the host's side and `::2` outside
    /// (without DAD, so they are usable at once); returns them.
    fn add_ipv6(&self, ns: &Netns) -> (Ipv6Addr, Ipv6Addr) {
        let prefix = format!(
            "fd69:{:x}:{:x}",
            std::process::id() % 65_536,
            self.host.octets()[2]
        );
        let host: Ipv6Addr = format!("{prefix}::1").parse().expect("address");
        let outside: Ipv6Addr = format!("{prefix}::2").parse().expect("address");
        run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{host}/64"),
            "dev",
            &self.name,
            "nodad",
        ]);
        let inside = format!("--net={}", ns.path().display());
        run(&[
            "nsenter",
            &inside,
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{outside}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        (host, outside)
    }
}

impl Drop for OutsideLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// Deletes a link of the test's own on drop, if it is still there.
struct DeleteLink(String);

impl Drop for DeleteLink {
    fn drop(&mut self) {
        if link_exists(&self.0) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn reconcile_keeps_live_pods_and_clears_the_rest() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::new();
    let gw = t.net.gateway();
    let hp = t.names.port_base;
    let (ns_l, ns_s) = (Netns::new(), Netns::new());
    let live = request("live", &ns_l.path(), vec![tcp(80, hp, "")]);
    let stale = request("stale", &ns_s.path(), vec![tcp(80, hp + 1, "")]);
    let live_ip = ipv4(&t.net.set_up(&live).expect("set up live"));
    let stale_ip = ipv4(&t.net.set_up(&stale).expect("set up stale"));
    let _server = Server::start(Some(&ns_l.path()), sa(Ipv4Addr::UNSPECIFIED, 80), "L");

    // A restart after the table was lost and an orphan address claim was left.
    run(&["nft", "delete", "table", "inet", &t.names.table]);
    let orphan = Ipv4Addr::from(u32::from(stale_ip) + 50);
    std::fs::write(t.ipam_dir().join(orphan.to_string()), "ghost\n").expect("orphan");
    // And a veth named like berth's on the bridge that no pod owns.
    let stray = host_veth_name(&pod_id());
    let stray_peer = format!("btp{}", &t.names.bridge[3..]);
    let _stray_guard = DeleteLink(stray.clone());
    run(&[
        "ip",
        "link",
        "add",
        &stray,
        "type",
        "veth",
        "peer",
        "name",
        &stray_peer,
    ]);
    run(&["ip", "link", "set", &stray, "master", &t.names.bridge]);
    let restarted = t.reopen();
    restarted
        .reconcile(std::slice::from_ref(&live))
        .expect("reconcile");

    assert_eq!(restarted.pod_ips(&live.pod_id), vec![IpAddr::V4(live_ip)]);
    assert!(restarted.pod_ips(&stale.pod_id).is_empty());
    assert!(!link_exists(&host_veth_name(&stale.pod_id)));
    assert!(link_exists(&host_veth_name(&live.pod_id)));
    assert!(!link_exists(&stray) && !link_exists(&stray_peer));
    assert!(!t.ipam_dir().join(stale_ip.to_string()).exists());
    assert!(!t.ipam_dir().join(orphan.to_string()).exists());
    let rules = t.table_text();
    assert!(rules.contains(&live.pod_id), "live rules re-added: {rules}");
    assert!(!rules.contains(&stale.pod_id), "stale rules gone: {rules}");
    assert_eq!(
        fetch(None, sa(gw, hp)).expect("live host port"),
        format!("L {gw}")
    );

    // No pod left: nothing of the network stays.
    restarted.reconcile(&[]).expect("reconcile to nothing");
    assert!(!link_exists(&t.names.bridge));
    assert!(!link_exists(&host_veth_name(&live.pod_id)));
    assert!(!t.table_exists());
}

#[test]
fn a_failed_set_up_leaves_nothing_and_tear_down_needs_no_namespace() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::new();
    let missing = request(
        "m",
        Path::new("/nonexistent/netns"),
        vec![tcp(80, t.names.port_base, "")],
    );
    let err = t
        .net
        .set_up(&missing)
        .expect_err("no namespace")
        .to_string();
    assert!(err.contains("/nonexistent/netns"), "{err}");
    assert!(t.net.pod_ips(&missing.pod_id).is_empty());
    assert!(!link_exists(&host_veth_name(&missing.pod_id)));
    assert!(!t.table_text().contains(&missing.pod_id));

    // A pod whose namespace went away first still tears down cleanly.
    let ns = Netns::new();
    let pod = request("gone", &ns.path(), vec![]);
    let ip = ipv4(&t.net.set_up(&pod).expect("set up"));
    drop(ns);
    t.net
        .tear_down(&pod)
        .expect("tear down without the namespace");
    assert!(!link_exists(&host_veth_name(&pod.pod_id)));
    assert!(!t.ipam_dir().join(ip.to_string()).exists());
    // Set up twice keeps the address and works.
    let ns = Netns::new();
    let pod = request("twice", &ns.path(), vec![]);
    let first = ipv4(&t.net.set_up(&pod).expect("first"));
    let second = ipv4(&t.net.set_up(&pod).expect("second"));
    assert_eq!(first, second);
    let _server = Server::start(Some(&ns.path()), sa(Ipv4Addr::UNSPECIFIED, 0), "T");
    let port = _server.addr.port();
    assert_eq!(
        fetch(None, sa(first, port)).expect("host->pod"),
        format!("T {}", t.net.gateway())
    );
}

/// Answers each UDP datagram with `<marker> <peer address>`, for a while.
fn udp_echo(netns: &Path, port: u16, marker: &'static str) -> JoinHandle<()> {
    let socket = in_netns(Some(netns), move || {
        std::net::UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, port))
    })
    .expect("bind udp");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{marker} {}", peer.ip()).as_bytes(), peer);
        }
    })
}

#[test]
fn udp_host_ports_work_and_pods_cannot_reach_the_hosts_localhost() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::new();
    let gw = t.net.gateway();
    let hp = t.names.port_base;
    let ns = Netns::new();
    let mut udp = tcp(5353, hp, "");
    udp.protocol = "UDP".to_string();
    let pod = request("u", &ns.path(), vec![udp]);
    t.net.set_up(&pod).expect("set up");

    let echo = udp_echo(&ns.path(), 5353, "U");
    let client = std::net::UdpSocket::bind(sa(Ipv4Addr::LOCALHOST, 0)).expect("client");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    client
        .send_to(b"ping", sa(Ipv4Addr::LOCALHOST, hp))
        .expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = client.recv_from(&mut buf).expect("udp answer");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), format!("U {gw}"));
    assert_eq!(from, sa(Ipv4Addr::LOCALHOST, hp));
    echo.join().expect("echo");

    // route_localnet=1 on the bridge must not open the host's localhost to
    // pods (CVE-2020-8558): a pod routing 127.0.0.2 to the gateway reaches
    // the host with its packets but gets no connection.
    let host_local = Server::start(None, sa(Ipv4Addr::new(127, 0, 0, 2), 0), "LOCAL");
    let host_gw = Server::start(None, sa(gw, 0), "GW");
    let pin = ns.path().display().to_string();
    let inside = format!("--net={pin}");
    run(&[
        "nsenter",
        &inside,
        "sysctl",
        "-qw",
        "net.ipv4.conf.eth0.route_localnet=1",
    ]);
    run(&[
        "nsenter",
        &inside,
        "ip",
        "route",
        "add",
        "127.0.0.2/32",
        "via",
        &gw.to_string(),
        "dev",
        "eth0",
        "table",
        "local",
    ]);
    let rx = Path::new("/sys/class/net")
        .join(host_veth_name(&pod.pod_id))
        .join("statistics/rx_packets");
    let before: u64 = std::fs::read_to_string(&rx)
        .expect("rx")
        .trim()
        .parse()
        .expect("n");
    let attempt = fetch(Some(&ns.path()), host_local.addr);
    let after: u64 = std::fs::read_to_string(&rx)
        .expect("rx")
        .trim()
        .parse()
        .expect("n");
    assert!(
        attempt.is_err(),
        "a pod reached the host's 127.0.0.2: {attempt:?}"
    );
    assert!(after > before, "the pod's packets did reach the host");
    assert_eq!(
        fetch(Some(&ns.path()), host_gw.addr).expect("the host on the gateway"),
        format!("GW {}", t.net.pod_ips(&pod.pod_id).first().expect("ip"))
    );
}

fn ipv6(status: &berth::cni::PodNetworkStatus) -> Ipv6Addr {
    match status.ips.as_slice() {
        [IpAddr::V4(_), IpAddr::V6(ip)] => *ip,
        other => panic!("not an IPv4 then an IPv6 address: {other:?}"),
    }
}

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// The bridge's IPv6 gateway: the host's address on the pod network. No
/// host port is reachable on `[::1]` (IPv6 has no `route_localnet`; neither
/// containerd's nor CNI's portmap DNAT it), so host-side tests use this one.
fn gateway_v6(t: &TestNetwork) -> Ipv6Addr {
    match t.net.gateway_v6() {
        Some(IpAddr::V6(ip)) => ip,
        other => panic!("no IPv6 gateway: {other:?}"),
    }
}

#[test]
fn dual_stack_pods_reach_each_other_and_host_ports_over_ipv6() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::dual_stack();
    let gw6 = gateway_v6(&t);
    let subnet6: ipnet::Ipv6Net = t.names.subnet_v6.parse().expect("subnet");
    let (hp, hp_v6, hp_v4) = (
        t.names.port_base,
        t.names.port_base + 1,
        t.names.port_base + 2,
    );
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let a = request(
        "a",
        &ns_a.path(),
        vec![
            tcp(80, hp, ""),
            tcp(81, hp_v6, &gw6.to_string()),
            tcp(82, hp_v4, &t.net.gateway().to_string()),
        ],
    );
    let b = request("b", &ns_b.path(), vec![]);
    let started = Instant::now();
    let a_status = t.net.set_up(&a).expect("set up a");
    eprintln!("dual-stack set_up with host ports: {:?}", started.elapsed());
    let started = Instant::now();
    let b_status = t.net.set_up(&b).expect("set up b");
    eprintln!(
        "dual-stack set_up without host ports: {:?}",
        started.elapsed()
    );
    let (a4, a6, b6) = (ipv4(&a_status), ipv6(&a_status), ipv6(&b_status));
    assert!(subnet6.contains(&a6) && subnet6.contains(&b6), "{a6} {b6}");
    assert_ne!(a6, b6);

    let _a80 = Server::start(Some(&ns_a.path()), sa6(Ipv6Addr::UNSPECIFIED, 80), "A");
    let _a81 = Server::start(Some(&ns_a.path()), sa6(Ipv6Addr::UNSPECIFIED, 81), "A81");
    let _a82 = Server::start(Some(&ns_a.path()), sa(Ipv4Addr::UNSPECIFIED, 82), "A82");
    let server_b = Server::start(Some(&ns_b.path()), sa6(Ipv6Addr::UNSPECIFIED, 0), "B");
    let host = Server::start(None, sa6(gw6, 0), "HOST");

    // Pod to pod over IPv6, both ways, and pod to the host: addresses usable
    // at once (no DAD wait), routes via the bridge, nothing rewritten.
    assert_eq!(
        fetch(Some(&ns_b.path()), sa6(a6, 80)).expect("b->a over IPv6"),
        format!("A {b6}")
    );
    assert_eq!(
        fetch(Some(&ns_a.path()), sa6(b6, server_b.addr.port())).expect("a->b over IPv6"),
        format!("B {a6}")
    );
    assert_eq!(
        fetch(Some(&ns_b.path()), host.addr).expect("b->host over IPv6"),
        format!("HOST {b6}")
    );
    // A wildcard host port answers on the host's IPv6 address, and still on IPv4.
    assert_eq!(
        fetch(None, sa6(gw6, hp)).expect("host -> a over IPv6"),
        format!("A {gw6}")
    );
    let over_v4 = fetch(None, sa(t.net.gateway(), hp)).expect("host -> a over IPv4");
    assert!(over_v4.starts_with("A "), "{over_v4}");
    // Hairpin over IPv6: a pod through its own host port, and another pod.
    assert_eq!(
        fetch(Some(&ns_a.path()), sa6(gw6, hp)).expect("a->a"),
        format!("A {gw6}")
    );
    assert_eq!(
        fetch(Some(&ns_b.path()), sa6(gw6, hp)).expect("b->a"),
        format!("A {gw6}")
    );
    // [::1] is not forwarded: refused, not left hanging.
    assert!(fetch(None, sa6(Ipv6Addr::LOCALHOST, hp)).is_err());
    // An IPv6 host IP publishes on IPv6 only, an IPv4 one on IPv4 only.
    assert_eq!(
        fetch(None, sa6(gw6, hp_v6)).expect("on its IPv6 host IP"),
        format!("A81 {gw6}")
    );
    let v4_of_v6_port = fetch(None, sa(t.net.gateway(), hp_v6));
    assert!(!v4_of_v6_port.as_deref().unwrap_or("").starts_with("A81"));
    assert!(
        fetch(None, sa(t.net.gateway(), hp_v4))
            .expect("on its IPv4 host IP")
            .starts_with("A82 ")
    );
    let v6_of_v4_port = fetch(None, sa6(gw6, hp_v4));
    assert!(!v6_of_v4_port.as_deref().unwrap_or("").starts_with("A82"));
    let rules = t.table_text();
    assert!(rules.contains(&format!("dnat ip6 to [{a6}]:80")), "{rules}");
    assert!(rules.contains(&format!("dnat ip to {a4}:80")), "{rules}");
    assert!(
        !rules.contains(&format!("dnat ip6 to [{a6}]:82")),
        "{rules}"
    );
    assert!(!rules.contains(&format!("dnat ip to {a4}:81")), "{rules}");

    // Tear-down frees both addresses and the IPv6 rules; b keeps working.
    t.net.tear_down(&a).expect("tear down a");
    assert!(!t.table_text().contains(&a.pod_id));
    assert!(!t.claimed().contains(&IpAddr::V6(a6)));
    assert!(!t.claimed().contains(&IpAddr::V4(a4)));
    assert!(fetch(None, sa6(gw6, hp)).is_err(), "IPv6 host port gone");
    assert_eq!(
        fetch(None, sa6(b6, server_b.addr.port())).expect("host->b"),
        format!("B {gw6}")
    );
    t.net.tear_down(&b).expect("tear down b");
    assert!(t.claimed().is_empty(), "{:?}", t.claimed());
    t.net.remove_all().expect("remove all");
    assert!(!link_exists(&t.names.bridge));
    assert!(!t.table_exists());
}

#[test]
fn reconcile_after_a_crash_restores_and_clears_ipv6_rules_and_addresses() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::dual_stack();
    let gw6 = gateway_v6(&t);
    let hp = t.names.port_base;
    let (ns_live, ns_stale) = (Netns::new(), Netns::new());
    let live = request("live", &ns_live.path(), vec![tcp(80, hp, "")]);
    let stale = request("stale", &ns_stale.path(), vec![tcp(80, hp + 1, "")]);
    let live6 = ipv6(&t.net.set_up(&live).expect("live"));
    let stale6 = ipv6(&t.net.set_up(&stale).expect("stale"));
    // As after a crash: the table lost, berthd restarted, one pod gone.
    run(&["nft", "delete", "table", "inet", &t.names.table]);
    let restarted = BridgeNetwork::new(&config(&t.names, true), t.dir.path()).expect("reopen");
    restarted
        .reconcile(std::slice::from_ref(&live))
        .expect("reconcile");
    let rules = t.table_text();
    assert!(
        rules.contains(&format!("dnat ip6 to [{live6}]:80")),
        "{rules}"
    );
    assert!(!rules.contains(&stale.pod_id), "{rules}");
    assert!(
        rules.contains(&format!("ip6 saddr {} ", t.names.subnet_v6)),
        "{rules}"
    );
    assert!(t.claimed().contains(&IpAddr::V6(live6)));
    assert!(!t.claimed().contains(&IpAddr::V6(stale6)));
    let _server = Server::start(Some(&ns_live.path()), sa6(Ipv6Addr::UNSPECIFIED, 80), "L");
    assert_eq!(
        fetch(None, sa6(gw6, hp)).expect("host port again"),
        format!("L {gw6}")
    );
    restarted.reconcile(&[]).expect("nothing live");
    assert!(t.claimed().is_empty(), "{:?}", t.claimed());
    assert!(!link_exists(&t.names.bridge));
    assert!(!t.table_exists());
}

#[test]
fn a_pod_cidr_moves_new_pods_and_existing_ones_keep_their_addresses() {
    if !is_root() {
        return;
    }
    let t = TestNetwork::new();
    let (ns_old, ns_new) = (Netns::new(), Netns::new());
    let old = request("old", &ns_old.path(), vec![]);
    let new = request("new", &ns_new.path(), vec![tcp(80, t.names.port_base, "")]);
    let old_ip = ipv4(&t.net.set_up(&old).expect("old"));
    let old_gw = t.net.gateway();

    let cidrs: Vec<ipnet::IpNet> = t
        .names
        .pod_cidr
        .split(',')
        .map(|c| c.parse().expect("cidr"))
        .collect();
    t.net.set_pod_cidrs(&cidrs).expect("pod CIDR");
    let status = t.net.set_up(&new).expect("new");
    let (new_ip, new6) = (ipv4(&status), ipv6(&status));
    assert!(
        cidrs[0].contains(&IpAddr::V4(new_ip)),
        "{new_ip} in {}",
        cidrs[0]
    );
    assert!(
        cidrs[1].contains(&IpAddr::V6(new6)),
        "{new6} in {}",
        cidrs[1]
    );
    assert_eq!(t.net.pod_ips(&old.pod_id), vec![IpAddr::V4(old_ip)]);
    let new_gw = t.net.gateway();
    assert_ne!(old_gw, new_gw);

    // Both subnets live on one bridge: each pod routes through its own
    // gateway, and they reach each other and the host.
    let _new80 = Server::start(Some(&ns_new.path()), sa6(Ipv6Addr::UNSPECIFIED, 80), "NEW");
    let old_server = Server::start(Some(&ns_old.path()), sa(Ipv4Addr::UNSPECIFIED, 0), "OLD");
    assert_eq!(
        fetch(Some(&ns_old.path()), sa(new_ip, 80)).expect("old -> new"),
        format!("NEW ::ffff:{old_ip}")
    );
    assert_eq!(
        fetch(Some(&ns_new.path()), sa(old_ip, old_server.addr.port())).expect("new -> old"),
        format!("OLD {new_ip}")
    );
    assert_eq!(
        fetch(None, sa6(gateway_v6(&t), t.names.port_base)).expect("host port over IPv6"),
        format!("NEW {}", gateway_v6(&t))
    );
    // Egress of both subnets is masqueraded.
    let rules = t.table_text();
    assert!(
        rules.contains(&format!("ip saddr {} ", t.names.subnet)),
        "{rules}"
    );
    assert!(
        rules.contains(&format!("ip saddr {} ", cidrs[0])),
        "{rules}"
    );

    // A restarted network keeps the pod CIDR.
    let restarted = BridgeNetwork::new(&config(&t.names, false), t.dir.path()).expect("reopen");
    assert_eq!(restarted.gateway(), new_gw);
    drop(restarted);

    // A pod CIDR overlapping a subnet pods still use is refused (two IPAM
    // directories could hand out one address twice); once they are gone
    // it is taken, and the old gateway leaves the bridge for the new one.
    let narrower: ipnet::IpNet = format!("{}/25", old_gw).parse().expect("cidr");
    let narrower = narrower.trunc();
    let err = t.net.set_pod_cidrs(&[narrower]).expect_err("overlaps old");
    assert!(err.to_string().contains("overlaps"), "{err}");
    t.net.tear_down(&old).expect("tear down old");
    t.net
        .set_pod_cidrs(&[narrower])
        .expect("no pod holds the old subnet");
    let ns_third = Netns::new();
    let third = request("third", &ns_third.path(), vec![]);
    let third_ip = ipv4(&t.net.set_up(&third).expect("third"));
    assert!(
        narrower.contains(&IpAddr::V4(third_ip)),
        "{third_ip} in {narrower}"
    );
    let bridge_addrs = Command::new("ip")
        .args(["-o", "addr", "show", "dev", &t.names.bridge])
        .output()
        .expect("ip addr");
    let bridge_addrs = String::from_utf8_lossy(&bridge_addrs.stdout);
    assert!(
        bridge_addrs.contains(&format!("{old_gw}/25")),
        "{bridge_addrs}"
    );
    assert!(
        !bridge_addrs.contains(&format!("{old_gw}/24")),
        "{bridge_addrs}"
    );
    assert!(
        bridge_addrs.contains(&format!("{new_gw}/24")),
        "{bridge_addrs}"
    );
    t.net.tear_down(&third).expect("tear down third");
    t.net.tear_down(&new).expect("tear down new");
    assert!(t.claimed().is_empty(), "{:?}", t.claimed());
    t.net.remove_all().expect("remove all");
    assert!(!link_exists(&t.names.bridge));
    assert!(!t.table_exists());
}

/// Whether `ips` are an IPv4 address of `v4` then an IPv6 one of `v6`.
fn in_subnets(ips: &[String], v4: &str, v6: &str) -> bool {
    let (v4, v6): (ipnet::IpNet, ipnet::IpNet) = (
        v4.parse().expect("IPv4 subnet"),
        v6.parse().expect("IPv6 subnet"),
    );
    match ips {
        [a, b] => {
            a.parse()
                .is_ok_and(|a: IpAddr| a.is_ipv4() && v4.contains(&a))
                && b.parse().is_ok_and(|b: IpAddr| v6.contains(&b))
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_over_cri_and_update_runtime_config_pod_cidr() {
    if !is_root() {
        return;
    }
    let names = Names::unique();
    let mut node = CriNode::start_with_network(
        BerthdOptions::default(),
        &format!("  mode: builtin\n  subnet_v6: {}\n", names.subnet_v6),
    )
    .await;
    let (busybox, logs) = (node.busybox.clone(), node.logs.path().to_path_buf());
    let berthd = &mut node.berthd;
    let subnet = berthd.names.subnet.clone();
    let mut rt = berthd.runtime().await;

    // Two dual-stack pods: IPv4 as `ip`, IPv6 in `additional_ips`.
    let config_a = cri_pod::pod_config("net-test", "a", &logs, Vec::new());
    let config_b = cri_pod::pod_config("net-test", "b", &logs, Vec::new());
    let pod_a = run_pod(&mut rt, &config_a).await;
    let pod_b = run_pod(&mut rt, &config_b).await;
    let ips_a = pod_ips(&mut rt, &pod_a).await;
    let ips_b = pod_ips(&mut rt, &pod_b).await;
    assert!(in_subnets(&ips_a, &subnet, &names.subnet_v6), "{ips_a:?}");
    assert!(in_subnets(&ips_b, &subnet, &names.subnet_v6), "{ips_b:?}");
    // busybox nc between them over IPv6, both ways.
    let serve = |marker: &'static str| ["nc", "-ll", "-p", "8080", "-e", "echo", marker];
    let c_a = start_container(&mut rt, &pod_a, &config_a, &busybox, &serve("pong-a")).await;
    let c_b = start_container(&mut rt, &pod_b, &config_b, &busybox, &serve("pong-b")).await;
    assert_eq!(nc_from(&mut rt, &c_b, &ips_a[1], 8080).await, "pong-a");
    assert_eq!(nc_from(&mut rt, &c_a, &ips_b[1], 8080).await, "pong-b");

    // UpdateRuntimeConfig: bad CIDRs refused, an empty one changes nothing.
    for bad in [
        "10.1.0.0/33",
        "not-a-cidr",
        "10.1.0.0/24,10.2.0.0/24",
        "10.1.0.0/31",
    ] {
        let err = update_pod_cidr(&mut rt, bad).await.expect_err(bad);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}: {err:?}");
    }
    update_pod_cidr(&mut rt, "").await.expect("empty pod CIDR");
    let (cidr_v4, cidr_v6) = names.pod_cidr.split_once(',').expect("dual-stack CIDR");
    update_pod_cidr(&mut rt, &names.pod_cidr)
        .await
        .expect("pod CIDR");
    // New pods take the pod CIDR; a and b keep their addresses.
    let config_c = cri_pod::pod_config("net-test", "c", &logs, Vec::new());
    let pod_c = run_pod(&mut rt, &config_c).await;
    let ips_c = pod_ips(&mut rt, &pod_c).await;
    assert!(in_subnets(&ips_c, cidr_v4, cidr_v6), "{ips_c:?}");
    assert_eq!(pod_ips(&mut rt, &pod_a).await, ips_a);
    // Across the two subnets pods still reach each other (via the host).
    let c_c = start_container(&mut rt, &pod_c, &config_c, &busybox, &serve("pong-c")).await;
    assert_eq!(nc_from(&mut rt, &c_c, &ips_a[1], 8080).await, "pong-a");
    assert_eq!(nc_from(&mut rt, &c_a, &ips_c[0], 8080).await, "pong-c");

    // A berthd killed and restarted keeps the pod CIDR.
    berthd.stop_with(Signal::SIGKILL);
    berthd.spawn();
    let mut rt = berthd.runtime().await;
    let config_d = cri_pod::pod_config("net-test", "d", &logs, Vec::new());
    let pod_d = run_pod(&mut rt, &config_d).await;
    let ips_d = pod_ips(&mut rt, &pod_d).await;
    assert!(in_subnets(&ips_d, cidr_v4, cidr_v6), "{ips_d:?}");
    assert_ne!(ips_d, ips_c);

    for pod in [&pod_a, &pod_b, &pod_c, &pod_d] {
        remove_pod(&mut rt, pod).await;
    }
    // Every address of both subnets and both families is free again.
    let ipam = berthd.state_dir.join("network/ipam");
    let claimed: Vec<String> = std::fs::read_dir(&ipam)
        .expect("ipam dir")
        .flatten()
        .flat_map(|d| d.path().read_dir().into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<IpAddr>().is_ok())
        .collect();
    assert!(claimed.is_empty(), "{claimed:?}");
}
