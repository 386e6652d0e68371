//! berth's nftables table, `inet <network.nft_table>`: egress masquerade,
//! host-port DNAT with hairpin and localhost access, and the CVE-2020-8558
//! guard. berth touches no other table.
//!
//! # How rules reach the kernel
//!
//! The whole table is written as one text batch, which the kernel applies
//! as a single transaction:
//!
//! ```text
//! add table inet T      # so that the delete below never fails
//! delete table inet T
//! table inet T { ...every chain and rule, from berth's records... }
//! ```
//!
//! The table is declared, not edited: each batch replaces it whole from the
//! persisted pod records, so there are no rule handles to keep, nothing to
//! read back, a batch repairs any drift, and packets see the old table or
//! the new one, never a half. Existing connections keep their NAT (it lives
//! in conntrack, not in the rules). Only pods that publish host ports cause
//! a batch, once at set-up and once at tear-down; a pod without host ports,
//! the common case in Kubernetes, causes none (the table with the masquerade
//! rule is made once, with the bridge).
//!
//! Why libnftables in the process, and the `nft` binary only as a fallback:
//! measured on the 2-core test VM, one `nft -f -` run costs 15-20 ms, and
//! the same batch through a long-lived libnftables context 0.5 ms. The
//! binary's time is not its start-up (`nft -v` takes 3 ms) but its exit:
//! strace shows it in the close() of the netlink socket after a transaction,
//! where the kernel waits for the release of the previous ruleset generation
//! (an RCU grace period). A long-lived socket is not closed, so that release
//! runs in the background.
//! The library is loaded with dlopen (`libnftables.so.1`, which Debian's
//! `nftables` package depends on), so berth builds without its headers and
//! still works, slower, through `nft -f -` where it is missing. Encoding
//! nf_tables expressions over raw netlink would be as fast as the library,
//! but a large encoder to write and review, and the text is what an operator
//! reads back with `nft list table inet T`.
//!
//! # The table
//!
//! - `prerouting` and `output` (nat, priority -100): packets to a local
//!   address (`fib daddr type local`) go through `hostports`.
//! - `hostports`: one DNAT rule per published port, commented with the pod's
//!   id, namespace and name. A port with a host IP matches that destination
//!   address only (and so one family); otherwise any local IPv4 address,
//!   127.0.0.1 included, and for a pod with an IPv6 address any local IPv6
//!   address but `::1` (see [`pod_rules`]).
//! - `postrouting` (nat, priority 100), per pod subnet of either family: pod
//!   traffic leaving through any other interface than the bridge is
//!   masqueraded; DNATed traffic from a pod back
//!   onto the bridge (hairpin: a pod reaching itself or another pod through a
//!   host port) is masqueraded to the gateway so replies come back through
//!   the host; DNATed traffic from 127.0.0.0/8 (the host reaching a host port
//!   on localhost, which `route_localnet=1` on the bridge lets out) likewise.
//! - `input` (filter, priority 0): packets to 127.0.0.0/8 arriving on any
//!   interface but `lo` that do not belong to a known or DNATed connection
//!   are dropped, so `route_localnet` does not open the host's localhost
//!   services to pods (CVE-2020-8558, as kube-proxy does it).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use ipnet::IpNet;

use super::NetworkError;
use super::portmap::HostPort;

/// Longest comment written on a rule (nftables allows a little more).
const COMMENT_MAX: usize = 128;

/// What the table is made for: its name, the bridge and the pod subnets
/// (those new pods get addresses from and those live pods still hold, IPv4
/// and IPv6).
#[derive(Debug, Clone, Copy)]
pub struct TableSpec<'a> {
    pub table: &'a str,
    pub bridge: &'a str,
    pub subnets: &'a [IpNet],
}

/// One pod's published ports and the addresses they lead to.
#[derive(Debug, Clone, Copy)]
pub struct PodPorts<'a> {
    pub pod_id: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub ip: Ipv4Addr,
    /// With one, ports without a host IP are published on IPv6 too.
    pub ipv6: Option<Ipv6Addr>,
    pub ports: &'a [HostPort],
}

/// Whether `name` can be used bare as an nftables table name.
pub fn valid_table_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 64
}

/// The batch that replaces the table with one holding `pods`' ports.
pub fn ruleset(spec: &TableSpec<'_>, pods: &[PodPorts<'_>]) -> String {
    let TableSpec {
        table,
        bridge,
        subnets,
    } = *spec;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "add table inet {table}");
    let _ = writeln!(out, "delete table inet {table}");
    let _ = writeln!(out, "table inet {table} {{");
    let _ = writeln!(
        out,
        "  chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n    \
         fib daddr type local jump hostports\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain output {{\n    type nat hook output priority -100; policy accept;\n    \
         fib daddr type local jump hostports\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;"
    );
    for subnet in subnets {
        let family = match subnet {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        let _ = writeln!(
            out,
            "    {family} saddr {subnet} oifname != \"{bridge}\" masquerade comment \"pod egress\"\n    \
             oifname \"{bridge}\" ct status dnat {family} saddr {subnet} masquerade comment \"hairpin\""
        );
    }
    let _ = writeln!(
        out,
        "    oifname \"{bridge}\" ct status dnat ip saddr 127.0.0.0/8 masquerade comment \"localhost to host port\"\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         iifname != \"lo\" ip daddr 127.0.0.0/8 ct state != {{ established, related }} \
         ct status & dnat == 0 drop comment \"CVE-2020-8558\"\n  }}"
    );
    let _ = writeln!(out, "  chain hostports {{");
    for pod in pods {
        for rule in pod_rules(pod) {
            let _ = writeln!(out, "    {rule}");
        }
    }
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
}

/// The DNAT rules of one pod, in `hostports`: a port with a host IP is
/// published on that address's family only; one without on IPv4, and on
/// IPv6 too when the pod has an IPv6 address, except on `::1` (IPv6 has no
/// `route_localnet`: a packet from `::1` could not leave for the pod, so the
/// connection is refused instead of left hanging).
pub fn pod_rules(pod: &PodPorts<'_>) -> Vec<String> {
    let comment = rule_comment(pod.pod_id, pod.namespace, pod.name);
    let mut rules = Vec::new();
    for p in pod.ports {
        let mut rule = |destination: String, to: String| {
            rules.push(format!(
                "{destination} {proto} dport {host} dnat {to}:{container} comment \"{comment}\"",
                proto = p.protocol,
                host = p.host_port,
                container = p.container_port,
            ));
        };
        match (p.host_ip, pod.ipv6) {
            (Some(IpAddr::V4(host)), _) => {
                rule(format!("ip daddr {host}"), format!("ip to {}", pod.ip))
            }
            (Some(IpAddr::V6(host)), Some(v6)) => {
                rule(format!("ip6 daddr {host}"), format!("ip6 to [{v6}]"))
            }
            // Refused when the pod is set up; nothing to publish.
            (Some(IpAddr::V6(_)), None) => {}
            (None, v6) => {
                rule("meta nfproto ipv4".to_string(), format!("ip to {}", pod.ip));
                if let Some(v6) = v6 {
                    rule("ip6 daddr != ::1".to_string(), format!("ip6 to [{v6}]"));
                }
            }
        }
    }
    rules
}

/// `<pod id> <namespace>/<name>`, without characters that would end the
/// quoted string, cut to what nftables keeps.
fn rule_comment(pod_id: &str, namespace: &str, name: &str) -> String {
    let mut text: String = format!("{pod_id} {namespace}/{name}")
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .collect();
    if text.len() > COMMENT_MAX {
        let mut end = COMMENT_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The batch that removes the table, and succeeds when it is not there.
pub fn delete_table(table: &str) -> String {
    format!("add table inet {table}\ndelete table inet {table}\n")
}

/// The `nft` executable: on PATH, or where Debian and others install it.
pub fn find_nft() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join("nft"))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Applies batches: through a libnftables context kept for the life of this
/// value, or through `nft -f -` where the library cannot be loaded. Its
/// netlink socket belongs to the network namespace of the thread that first
/// applies a batch, so only host-namespace threads may use it.
#[derive(Debug, Default)]
pub struct Nftables {
    context: Mutex<Option<Context>>,
}

impl Nftables {
    pub fn new() -> Nftables {
        Nftables::default()
    }

    /// Whether batches can be applied at all: the library or the program.
    pub fn available() -> bool {
        Library::get().is_some() || find_nft().is_some()
    }

    /// Which way batches go: `libnftables` or the `nft` program.
    pub fn backend() -> &'static str {
        if Library::get().is_some() {
            "libnftables"
        } else {
            "nft"
        }
    }

    /// Runs `batch` as one transaction.
    pub fn apply(&self, batch: &str) -> Result<(), NetworkError> {
        if let Some(library) = Library::get() {
            let mut context = self.context.lock().unwrap_or_else(|e| e.into_inner());
            if context.is_none() {
                *context = Context::new(library);
            }
            if let Some(context) = context.as_mut() {
                return context.run(batch);
            }
        }
        apply_with_program(batch)
    }
}

/// Runs `batch` through `nft -f -` as one transaction.
pub fn apply_with_program(batch: &str) -> Result<(), NetworkError> {
    let nft = find_nft().ok_or_else(|| {
        NetworkError::Nft("the nft program (Debian package nftables) is not installed".to_string())
    })?;
    let mut child = Command::new(&nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetworkError::Nft(format!("cannot run {}: {e}", nft.display())))?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(batch.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| NetworkError::Nft(format!("{}: {e}", nft.display())))?;
    if !out.status.success() {
        return Err(NetworkError::Nft(format!(
            "nft -f - failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if let Some(Err(e)) = written {
        return Err(NetworkError::Nft(format!("writing to nft: {e}")));
    }
    Ok(())
}

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxFlag = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The few libnftables calls berth makes, resolved once with dlopen.
struct Library {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    ctx_buffer_output: CtxFlag,
    ctx_buffer_error: CtxFlag,
    ctx_get_error_buffer: CtxBuffer,
    run_cmd_from_buffer: RunCmd,
}

impl Library {
    fn get() -> Option<&'static Library> {
        static LIBRARY: OnceLock<Option<Library>> = OnceLock::new();
        LIBRARY.get_or_init(Library::load).as_ref()
    }

    fn load() -> Option<Library> {
        // SAFETY: dlopen takes a NUL-terminated name; the handle is never
        // closed, so the symbols below stay valid for the process's life.
        let handle = unsafe { libc::dlopen(c"libnftables.so.1".as_ptr(), libc::RTLD_NOW) };
        if handle.is_null() {
            return None;
        }
        let symbol = |name: &CStr| {
            // SAFETY: a valid handle and a NUL-terminated name.
            let ptr = unsafe { libc::dlsym(handle, name.as_ptr()) };
            (!ptr.is_null()).then_some(ptr)
        };
        // SAFETY (each transmute): the symbol is the function libnftables.h
        // declares (stable ABI LIBNFTABLES_1) with the signature of the type
        // it is turned into.
        unsafe {
            Some(Library {
                ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(symbol(c"nft_ctx_new")?),
                ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(symbol(c"nft_ctx_free")?),
                ctx_buffer_output: std::mem::transmute::<*mut c_void, CtxFlag>(symbol(
                    c"nft_ctx_buffer_output",
                )?),
                ctx_buffer_error: std::mem::transmute::<*mut c_void, CtxFlag>(symbol(
                    c"nft_ctx_buffer_error",
                )?),
                ctx_get_error_buffer: std::mem::transmute::<*mut c_void, CtxBuffer>(symbol(
                    c"nft_ctx_get_error_buffer",
                )?),
                run_cmd_from_buffer: std::mem::transmute::<*mut c_void, RunCmd>(symbol(
                    c"nft_run_cmd_from_buffer",
                )?),
            })
        }
    }
}

/// One `struct nft_ctx`, with output and errors captured in buffers.
struct Context {
    library: &'static Library,
    ctx: NonNull<c_void>,
}

// SAFETY: an nft_ctx has no tie to the thread that made it; Nftables hands
// it to one thread at a time, behind its mutex.
unsafe impl Send for Context {}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("libnftables context")
    }
}

impl Context {
    fn new(library: &'static Library) -> Option<Context> {
        // SAFETY: NFT_CTX_DEFAULT (0) is a valid flag set.
        let ctx = NonNull::new(unsafe { (library.ctx_new)(0) })?;
        // SAFETY: ctx is a live context; buffering keeps libnftables from
        // writing to berthd's stdout and stderr.
        unsafe {
            (library.ctx_buffer_output)(ctx.as_ptr());
            (library.ctx_buffer_error)(ctx.as_ptr());
        }
        Some(Context { library, ctx })
    }

    fn run(&mut self, batch: &str) -> Result<(), NetworkError> {
        let text = CString::new(batch)
            .map_err(|_| NetworkError::Nft("a batch holds a NUL byte".to_string()))?;
        // SAFETY: a live context and a NUL-terminated buffer that outlives the call.
        let rc = unsafe { (self.library.run_cmd_from_buffer)(self.ctx.as_ptr(), text.as_ptr()) };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the error buffer belongs to the context and stays valid
        // until its next run; it is copied out here.
        let message = unsafe {
            let ptr = (self.library.ctx_get_error_buffer)(self.ctx.as_ptr());
            if ptr.is_null() {
                String::new()
            } else {
                CStr::from_ptr(ptr).to_string_lossy().trim().to_string()
            }
        };
        Err(NetworkError::Nft(format!(
            "the batch was refused: {message}"
        )))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context is live and freed once.
        unsafe { (self.library.ctx_free)(self.ctx.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::portmap::Protocol;

    fn subnets() -> &'static [IpNet] {
        static SUBNETS: OnceLock<Vec<IpNet>> = OnceLock::new();
        SUBNETS.get_or_init(|| {
            vec![
                "10.66.0.0/16".parse().expect("subnet"),
                "fd66::/64".parse().expect("subnet"),
            ]
        })
    }

    fn spec() -> TableSpec<'static> {
        TableSpec {
            table: "berth",
            bridge: "berth0",
            subnets: subnets(),
        }
    }

    fn port(protocol: Protocol, host_ip: Option<IpAddr>, host: u16, container: u16) -> HostPort {
        HostPort {
            protocol,
            host_ip,
            host_port: host,
            container_port: container,
        }
    }

    #[test]
    fn table_names_are_checked() {
        assert!(valid_table_name("berth"));
        assert!(valid_table_name("berth_test_12_0"));
        assert!(!valid_table_name(""));
        assert!(!valid_table_name("1berth"));
        assert!(!valid_table_name("berth table"));
        assert!(!valid_table_name("berth;flush"));
    }

    #[test]
    fn the_table_replaces_itself_in_one_batch() {
        let text = ruleset(&spec(), &[]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            &lines[..3],
            [
                "add table inet berth",
                "delete table inet berth",
                "table inet berth {"
            ]
        );
        assert!(text.contains("type nat hook prerouting priority -100"));
        assert!(text.contains("type nat hook output priority -100"));
        assert!(text.contains("type nat hook postrouting priority 100"));
        assert!(text.contains("fib daddr type local jump hostports"));
        // Only berth's own table is ever named.
        for line in lines.iter().filter(|l| l.contains("table")) {
            assert!(
                line.ends_with("inet berth") || line.ends_with("inet berth {"),
                "{line}"
            );
        }
    }

    #[test]
    fn egress_hairpin_and_localhost_are_masqueraded() {
        let text = ruleset(&spec(), &[]);
        assert!(text.contains(
            "ip saddr 10.66.0.0/16 oifname != \"berth0\" masquerade comment \"pod egress\""
        ));
        assert!(text.contains(
            "oifname \"berth0\" ct status dnat ip saddr 10.66.0.0/16 masquerade comment \"hairpin\""
        ));
        assert!(text.contains("oifname \"berth0\" ct status dnat ip saddr 127.0.0.0/8 masquerade"));
        assert!(text.contains(
            "ip6 saddr fd66::/64 oifname != \"berth0\" masquerade comment \"pod egress\""
        ));
        assert!(text.contains(
            "oifname \"berth0\" ct status dnat ip6 saddr fd66::/64 masquerade comment \"hairpin\""
        ));
    }

    #[test]
    fn localhost_from_other_interfaces_is_dropped() {
        let text = ruleset(&spec(), &[]);
        assert!(text.contains("type filter hook input priority 0"));
        assert!(text.contains(
            "iifname != \"lo\" ip daddr 127.0.0.0/8 ct state != { established, related } \
             ct status & dnat == 0 drop comment \"CVE-2020-8558\""
        ));
    }

    #[test]
    fn each_host_port_is_one_commented_dnat_rule() {
        let ports = [
            port(Protocol::Tcp, None, 8080, 80),
            port(
                Protocol::Udp,
                Some(Ipv4Addr::new(192, 0, 2, 2).into()),
                5353,
                53,
            ),
        ];
        let pod = PodPorts {
            pod_id: "0123abcd",
            namespace: "default",
            name: "web",
            ip: Ipv4Addr::new(10, 66, 0, 2),
            ipv6: None,
            ports: &ports,
        };
        assert_eq!(
            pod_rules(&pod),
            vec![
                "meta nfproto ipv4 tcp dport 8080 dnat ip to 10.66.0.2:80 comment \"0123abcd default/web\"",
                "ip daddr 192.0.2.2 udp dport 5353 dnat ip to 10.66.0.2:53 comment \"0123abcd default/web\"",
            ]
        );
        let text = ruleset(&spec(), &[pod]);
        let hostports = text
            .split("chain hostports {")
            .nth(1)
            .expect("hostports chain");
        assert!(hostports.contains("tcp dport 8080 dnat ip to 10.66.0.2:80"));
        assert!(hostports.contains("udp dport 5353 dnat ip to 10.66.0.2:53"));
    }

    #[test]
    fn sctp_ports_get_sctp_rules() {
        let ports = [
            port(Protocol::Sctp, None, 9999, 99),
            port(Protocol::Sctp, Some(Ipv4Addr::LOCALHOST.into()), 3868, 3868),
        ];
        let pod = PodPorts {
            pod_id: "feed",
            namespace: "telco",
            name: "diameter",
            ip: Ipv4Addr::new(10, 66, 0, 9),
            ipv6: None,
            ports: &ports,
        };
        assert_eq!(
            pod_rules(&pod),
            vec![
                "meta nfproto ipv4 sctp dport 9999 dnat ip to 10.66.0.9:99 comment \"feed telco/diameter\"",
                "ip daddr 127.0.0.1 sctp dport 3868 dnat ip to 10.66.0.9:3868 comment \"feed telco/diameter\"",
            ]
        );
    }

    #[test]
    fn dual_stack_pods_publish_on_each_family_as_their_host_ip_says() {
        let host6: IpAddr = "fd66::1".parse().expect("address");
        let ports = [
            port(Protocol::Tcp, None, 8080, 80),
            port(Protocol::Tcp, Some(Ipv4Addr::LOCALHOST.into()), 8081, 81),
            port(Protocol::Udp, Some(host6), 8082, 82),
        ];
        let pod = PodPorts {
            pod_id: "d5",
            namespace: "ns",
            name: "dual",
            ip: Ipv4Addr::new(10, 66, 0, 5),
            ipv6: Some("fd66::5".parse().expect("address")),
            ports: &ports,
        };
        assert_eq!(
            pod_rules(&pod),
            vec![
                "meta nfproto ipv4 tcp dport 8080 dnat ip to 10.66.0.5:80 comment \"d5 ns/dual\"",
                "ip6 daddr != ::1 tcp dport 8080 dnat ip6 to [fd66::5]:80 comment \"d5 ns/dual\"",
                "ip daddr 127.0.0.1 tcp dport 8081 dnat ip to 10.66.0.5:81 comment \"d5 ns/dual\"",
                "ip6 daddr fd66::1 udp dport 8082 dnat ip6 to [fd66::5]:82 comment \"d5 ns/dual\"",
            ]
        );
        // Without an IPv6 address an IPv6 host IP publishes nothing.
        let v4_only = PodPorts { ipv6: None, ..pod };
        assert_eq!(pod_rules(&v4_only).len(), 2);
    }

    #[test]
    fn comments_cannot_break_out_of_their_quotes_and_stay_short() {
        let long = "n".repeat(300);
        let c = rule_comment(&"a".repeat(64), "ns\"; flush ruleset; \"", &long);
        assert!(!c.contains('"'));
        assert!(c.len() <= COMMENT_MAX);
        assert!(
            c.starts_with(&"a".repeat(64)),
            "the pod id comes first and whole"
        );
        let c = rule_comment("id", "ns", &"é".repeat(100));
        assert!(c.len() <= COMMENT_MAX && c.is_char_boundary(c.len()));
    }

    #[test]
    fn deleting_never_fails_on_a_missing_table() {
        assert_eq!(
            delete_table("berth_x"),
            "add table inet berth_x\ndelete table inet berth_x\n"
        );
    }

    #[test]
    fn batches_apply_in_process_and_through_the_program() {
        if !Nftables::available() || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs nftables and root");
            return;
        }
        let table = format!("berth_unit_{}", std::process::id());
        let spec = TableSpec {
            table: &table,
            bridge: "berthunit0",
            subnets: &["10.250.0.0/24".parse().expect("subnet")],
        };
        let ports = [port(Protocol::Tcp, None, 18080, 80)];
        let pod = PodPorts {
            pod_id: "feedface",
            namespace: "unit",
            name: "web",
            ip: Ipv4Addr::new(10, 250, 0, 2),
            ipv6: None,
            ports: &ports,
        };
        let listed = || {
            let out = Command::new(find_nft().expect("nft"))
                .args(["list", "table", "inet", &table])
                .output()
                .expect("nft list");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let nft = Nftables::new();
        nft.apply(&ruleset(&spec, &[pod])).expect("in process");
        nft.apply(&ruleset(&spec, &[pod]))
            .expect("again: replaced, not added to");
        assert_eq!(listed().matches("dnat ip to 10.250.0.2:80").count(), 1);
        apply_with_program(&ruleset(&spec, &[])).expect("through the program");
        assert!(!listed().contains("dnat ip to"));
        let err = nft
            .apply(&format!("add rule inet {table} hostports bogus"))
            .expect_err("bad batch")
            .to_string();
        assert!(err.contains("bogus") || err.contains("syntax"), "{err}");
        nft.apply(&delete_table(&table)).expect("delete");
        nft.apply(&delete_table(&table)).expect("delete again");
        assert!(listed().is_empty());
    }

    #[test]
    fn generated_rulesets_parse() {
        // `nft -c` only checks; it needs the nftables program and root.
        if find_nft().is_none() || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs nft and root");
            return;
        }
        let ports = [
            port(Protocol::Tcp, None, 8080, 80),
            port(Protocol::Udp, Some(Ipv4Addr::LOCALHOST.into()), 5353, 53),
            port(Protocol::Sctp, None, 9999, 99),
            port(
                Protocol::Tcp,
                Some("fd66::1".parse().expect("address")),
                8443,
                443,
            ),
        ];
        let pod = PodPorts {
            pod_id: "0123",
            namespace: "default",
            name: "web",
            ip: Ipv4Addr::new(10, 66, 0, 2),
            ipv6: Some("fd66::2".parse().expect("address")),
            ports: &ports,
        };
        let text = ruleset(&spec(), &[pod]);
        let out = Command::new(find_nft().expect("nft"))
            .args(["-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().expect("stdin").write_all(text.as_bytes())?;
                c.wait_with_output()
            })
            .expect("run nft -c");
        assert!(
            out.status.success(),
            "{}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
