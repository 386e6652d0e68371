//! Persisted IPv4 and IPv6 address management for the bridge network: one
//! file per address handed out, claimed atomically before the address is put
//! to use.
//!
//! Layout under the IPAM directory, one subdirectory per subnet
//! (`<dir>/10.66.0.0-16/`, `<dir>/fd66::-64/`), so pods keep the addresses of
//! an earlier subnet after the pod CIDR changes:
//!
//! - `<address>`: one per address in use, holding the owning pod's id. It is
//!   written in full to a temporary file first and then hard-linked into
//!   place; `link(2)` refuses an existing name, so two claims of one address
//!   can never both succeed, and a crash leaves either no claim or a whole one.
//! - `last`: the address handed out last; the search for a free one starts
//!   after it, so a freed address is not handed out again at once.
//!
//! The network address (for IPv6 the subnet-router anycast address), the
//! gateway (first host address) and the last address (IPv4 broadcast; kept
//! free in IPv6 too, as CNI's host-local does for IPv4 only, so both families
//! follow one rule) are never handed out. Nothing is fsynced: a crash of berthd keeps
//! what the kernel wrote, and a crash of the machine ends every pod too.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

use super::NetworkError;
use crate::store::{self, Durability};

const LAST: &str = "last";
const CLAIM_PREFIX: &str = ".claim-";

/// The addresses of one subnet and who holds them.
#[derive(Debug)]
pub struct Ipam {
    dir: PathBuf,
    subnet: IpNet,
}

impl Ipam {
    /// Opens (creating) the allocations of `subnet` under `dir`, dropping
    /// half-written files a crash may have left. One process at a time, and
    /// never while an allocation in the same subnet is under way.
    pub fn open(dir: &Path, subnet: IpNet) -> Result<Ipam, NetworkError> {
        check_size(subnet)?;
        let subnet = subnet.trunc();
        let dir = dir.join(dir_name(subnet));
        fs::create_dir_all(&dir).map_err(|source| NetworkError::Ipam {
            path: dir.clone(),
            source,
        })?;
        let ipam = Ipam { dir, subnet };
        // Dot files are half-done writes: claims never linked, hints never renamed.
        for entry in ipam.read_dir()? {
            if entry.starts_with('.') {
                let _ = fs::remove_file(ipam.dir.join(&entry));
            }
        }
        Ok(ipam)
    }

    /// The subnets that have a directory under `dir`: every subnet addresses
    /// were ever handed out from, since the last reboot.
    pub fn subnets_in(dir: &Path) -> Result<Vec<IpNet>, NetworkError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(NetworkError::Ipam {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        let mut subnets: Vec<IpNet> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| {
                let (addr, len) = name.rsplit_once('-')?;
                IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok()
            })
            .filter(|net| dir_name(*net) == dir_name(net.trunc()))
            .collect();
        subnets.sort();
        Ok(subnets)
    }

    pub fn subnet(&self) -> IpNet {
        self.subnet
    }

    /// The bridge's address: the first host address of the subnet.
    pub fn gateway(&self) -> IpAddr {
        gateway(self.subnet)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Claims a free address for `pod_id` and records it before returning.
    pub fn allocate(&self, pod_id: &str) -> Result<IpAddr, NetworkError> {
        let used: HashSet<IpAddr> = self
            .read_dir()?
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        let (first, last) = pod_range(self.subnet);
        let start = fs::read_to_string(self.dir.join(LAST))
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .map(to_number)
            .filter(|a| (first..=last).contains(a))
            .map(|a| if a == last { first } else { a + 1 })
            .unwrap_or(first);
        let is_v4 = self.subnet.addr().is_ipv4();
        let candidates = (start..=last)
            .chain(first..start)
            .map(|n| from_number(n, is_v4));
        let claim = self.write_claim_file(pod_id)?;
        let mut result = Err(NetworkError::AddressesExhausted {
            subnet: self.subnet.to_string(),
        });
        for address in candidates.filter(|a| !used.contains(a)) {
            match fs::hard_link(&claim, self.dir.join(address.to_string())) {
                Ok(()) => {
                    result = Ok(address);
                    break;
                }
                // Taken since the directory was read.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    result = Err(NetworkError::Ipam {
                        path: self.dir.join(address.to_string()),
                        source,
                    });
                    break;
                }
            }
        }
        let _ = fs::remove_file(&claim);
        if let Ok(address) = result {
            // Only a hint for the next search; losing it costs nothing.
            let _ = store::write_atomic(
                &self.dir.join(LAST),
                address.to_string().as_bytes(),
                Durability::Crash,
            );
        }
        result
    }

    /// Frees `address` if `pod_id` holds it; false when it did not.
    pub fn release(&self, address: IpAddr, pod_id: &str) -> Result<bool, NetworkError> {
        let path = self.dir.join(address.to_string());
        match fs::read_to_string(&path) {
            Ok(owner) if owner.trim() == pod_id => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(NetworkError::Ipam { path, source }),
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(NetworkError::Ipam { path, source }),
        }
    }

    /// Who holds `address`, if anyone.
    pub fn owner(&self, address: IpAddr) -> Option<String> {
        fs::read_to_string(self.dir.join(address.to_string()))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Every address in use, with the pod holding it.
    pub fn allocations(&self) -> Result<Vec<(IpAddr, String)>, NetworkError> {
        let mut all = Vec::new();
        for name in self.read_dir()? {
            let Ok(address) = name.parse::<IpAddr>() else {
                continue;
            };
            if let Some(owner) = self.owner(address) {
                all.push((address, owner));
            }
        }
        all.sort();
        Ok(all)
    }

    fn read_dir(&self) -> Result<Vec<String>, NetworkError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| NetworkError::Ipam {
            path: self.dir.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    /// A complete claim, not yet under any address's name.
    fn write_claim_file(&self, pod_id: &str) -> Result<PathBuf, NetworkError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = self.dir.join(format!(
            "{CLAIM_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&path, format!("{pod_id}\n"))
            .map_err(|source| NetworkError::Ipam {
                path: path.clone(),
                source,
            })
            .map(|()| path)
    }
}

/// Refuses subnets with no room for a gateway and one pod: longer than /30
/// for IPv4, /126 for IPv6.
pub fn check_size(subnet: IpNet) -> Result<(), NetworkError> {
    if subnet.prefix_len() + 2 > subnet.max_prefix_len() {
        return Err(NetworkError::Config(format!(
            "subnet {subnet} is too small: a /{} or larger leaves room for a gateway and pods",
            subnet.max_prefix_len() - 2
        )));
    }
    Ok(())
}

/// The gateway of a subnet: its first host address.
pub fn gateway(subnet: IpNet) -> IpAddr {
    let subnet = subnet.trunc();
    from_number(to_number(subnet.network()) + 1, subnet.addr().is_ipv4())
}

/// `<network address>-<prefix length>`.
fn dir_name(subnet: IpNet) -> String {
    format!("{}-{}", subnet.addr(), subnet.prefix_len())
}

/// The first and last address handed to pods, as numbers.
fn pod_range(subnet: IpNet) -> (u128, u128) {
    (
        to_number(subnet.network()) + 2,
        to_number(subnet.broadcast()) - 1,
    )
}

fn to_number(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_number(n: u128, v4: bool) -> IpAddr {
    if v4 {
        // IPv4 numbers here are addresses of an IPv4 subnet: they fit.
        IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("subnet")
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn hands_out_host_addresses_after_the_gateway() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::open(dir.path(), net("10.66.0.0/16")).expect("open");
        assert_eq!(ipam.gateway(), v4(10, 66, 0, 1));
        assert_eq!(ipam.allocate("a").expect("a"), v4(10, 66, 0, 2));
        assert_eq!(ipam.allocate("b").expect("b"), v4(10, 66, 0, 3));
        assert_eq!(
            ipam.allocations().expect("list"),
            vec![
                (v4(10, 66, 0, 2), "a".to_string()),
                (v4(10, 66, 0, 3), "b".to_string()),
            ]
        );
    }

    #[test]
    fn a_host_bit_in_the_subnet_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::open(dir.path(), net("10.66.3.7/24")).expect("open");
        assert_eq!(ipam.subnet(), net("10.66.3.0/24"));
        assert_eq!(ipam.gateway(), v4(10, 66, 3, 1));
        assert!(ipam.dir().ends_with("10.66.3.0-24"));
    }

    #[test]
    fn no_address_is_handed_out_twice_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seen = HashSet::new();
        for round in 0..3 {
            let ipam = Ipam::open(dir.path(), net("10.66.0.0/24")).expect("open");
            for i in 0..10 {
                let a = ipam
                    .allocate(&format!("pod-{round}-{i}"))
                    .expect("allocate");
                assert!(seen.insert(a), "{a} handed out twice");
            }
        }
        assert_eq!(seen.len(), 30);
    }

    #[test]
    fn a_lost_hint_still_never_reuses_an_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::open(dir.path(), net("10.66.0.0/24")).expect("open");
        let a = ipam.allocate("a").expect("a");
        fs::remove_file(ipam.dir().join(LAST)).expect("drop hint");
        let b = ipam.allocate("b").expect("b");
        assert_ne!(a, b);
    }

    #[test]
    fn a_crash_mid_claim_leaves_no_claim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::open(dir.path(), net("10.66.0.0/29")).expect("open");
        // A claim file written but never linked, as a crash would leave it.
        ipam.write_claim_file("ghost").expect("claim file");
        let ipam = Ipam::open(dir.path(), net("10.66.0.0/29")).expect("reopen");
        assert!(ipam.allocations().expect("list").is_empty());
        assert!(
            ipam.read_dir()
                .expect("dir")
                .iter()
                .all(|n| !n.starts_with(CLAIM_PREFIX))
        );
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_a_free_makes_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        // /29: .0 network, .1 gateway, .7 broadcast: .2 to .6 for pods.
        let ipam = Ipam::open(dir.path(), net("10.66.0.0/29")).expect("open");
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("p{i}")).expect("allocate"))
            .collect();
        assert_eq!(got.first(), Some(&v4(10, 66, 0, 2)));
        assert_eq!(got.last(), Some(&v4(10, 66, 0, 6)));
        let err = ipam.allocate("p5").expect_err("full").to_string();
        assert!(err.contains("10.66.0.0/29"), "{err}");
        assert!(err.contains("no free address"), "{err}");

        assert!(ipam.release(got[2], "p2").expect("release"));
        assert_eq!(ipam.allocate("p6").expect("room again"), got[2]);
    }

    #[test]
    fn freed_addresses_are_not_reused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::open(dir.path(), net("10.66.0.0/24")).expect("open");
        let a = ipam.allocate("a").expect("a");
        ipam.release(a, "a").expect("release");
        let b = ipam.allocate("b").expect("b");
        assert_ne!(a, b, "the next search starts after the last one handed out");
    }

    #[test]
    fn release_only_frees_the_owners_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::open(dir.path(), net("10.66.0.0/24")).expect("open");
        let a = ipam.allocate("a").expect("a");
        assert!(!ipam.release(a, "someone-else").expect("release"));
        assert_eq!(ipam.owner(a).as_deref(), Some("a"));
        assert!(ipam.release(a, "a").expect("release"));
        assert!(!ipam.release(a, "a").expect("second release is a no-op"));
        assert_eq!(ipam.owner(a), None);
    }

    #[test]
    fn too_small_subnets_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Ipam::open(dir.path(), net("10.66.0.0/31")).is_err());
        let ipam = Ipam::open(dir.path(), net("10.66.0.0/30")).expect("a /30 has one pod address");
        assert_eq!(ipam.allocate("a").expect("a"), v4(10, 66, 0, 2));
        assert!(ipam.allocate("b").is_err());
    }

    #[test]
    fn concurrent_claims_never_collide() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = std::sync::Arc::new(Ipam::open(dir.path(), net("10.66.0.0/26")).expect("open"));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    (0..15)
                        .map(|i| ipam.allocate(&format!("t{t}-{i}")).expect("allocate"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for a in t.join().expect("thread") {
                assert!(all.insert(a), "{a} handed out twice");
            }
        }
        assert_eq!(all.len(), 60);
    }

    #[test]
    fn ipv6_subnets_hand_out_addresses_after_the_gateway_and_never_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::open(dir.path(), net("fd66:1::/64")).expect("open");
        let at = |s: &str| s.parse::<IpAddr>().expect("address");
        assert_eq!(ipam.gateway(), at("fd66:1::1"));
        assert!(ipam.dir().ends_with("fd66:1::-64"));
        let a = ipam.allocate("a").expect("a");
        assert_eq!(a, at("fd66:1::2"));
        ipam.release(a, "a").expect("release");
        assert_eq!(ipam.allocate("b").expect("b"), at("fd66:1::3"));
        let ipam = Ipam::open(dir.path(), net("fd66:1::/64")).expect("reopen");
        assert_eq!(ipam.allocate("c").expect("c"), at("fd66:1::4"));
        assert_eq!(
            ipam.allocations().expect("list"),
            vec![
                (at("fd66:1::3"), "b".to_string()),
                (at("fd66:1::4"), "c".to_string())
            ]
        );
    }

    #[test]
    fn small_ipv6_subnets_fill_up_and_wrap_around() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Ipam::open(dir.path(), net("fd66::/127")).is_err());
        // /126: ::0 anycast, ::1 gateway, ::3 last: ::2 alone for pods.
        let ipam = Ipam::open(dir.path(), net("fd66::/126")).expect("open");
        let only = ipam.allocate("a").expect("a");
        assert_eq!(only, "fd66::2".parse::<IpAddr>().expect("address"));
        let err = ipam.allocate("b").expect_err("full").to_string();
        assert!(err.contains("fd66::/126"), "{err}");
    }

    #[test]
    fn every_subnet_used_is_found_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            Ipam::subnets_in(&dir.path().join("none"))
                .expect("missing dir")
                .is_empty()
        );
        Ipam::open(dir.path(), net("10.66.0.0/24")).expect("v4");
        Ipam::open(dir.path(), net("fd66::/64")).expect("v6");
        fs::create_dir(dir.path().join("not-a-subnet")).expect("stray dir");
        assert_eq!(
            Ipam::subnets_in(dir.path()).expect("list"),
            vec![net("10.66.0.0/24"), net("fd66::/64")]
        );
    }
}
