//! What the CNI plugins' iptables calls leave on the host: portmap's
//! node-wide chains and the iptables-nft tables they live in. Snapshot
//! before, restore after, and only what appeared in between and nobody
//! uses goes. Shared by tests/cni.rs and the benchmark.

use std::process::{Command, Stdio};

use serde_json::Value;

/// The nftables tables on the host, and whether portmap's shared iptables
/// chains exist: taken before the run, so that afterwards exactly what the
/// run's CNI plugins made on the host, and nobody uses, can be removed.
pub struct HostNat {
    tables: Vec<String>,
    hostport_chains: bool,
}

/// portmap's node-wide chains in table nat, and the rules jumping to them.
const HOSTPORT_CHAINS: [&str; 3] = [
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-MASQ",
    "CNI-HOSTPORT-SETMARK",
];
const HOSTPORT_JUMPS: [&[&str]; 3] = [
    &[
        "PREROUTING",
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
        "-j",
        "CNI-HOSTPORT-DNAT",
    ],
    &[
        "OUTPUT",
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
        "-j",
        "CNI-HOSTPORT-DNAT",
    ],
    &[
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "CNI portfwd requiring masquerade",
        "-j",
        "CNI-HOSTPORT-MASQ",
    ],
];

fn nft_tables() -> Vec<String> {
    Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn has_hostport_chains() -> bool {
    Command::new("iptables")
        .args(["-t", "nat", "-S", HOSTPORT_CHAINS[0]])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl HostNat {
    pub fn snapshot() -> HostNat {
        HostNat {
            tables: nft_tables(),
            hostport_chains: has_hostport_chains(),
        }
    }

    /// Removes portmap's chains if the run made them, then every nftables
    /// table of the iptables families that the run made and that holds no
    /// rule; returns what it removed and what it had to leave.
    pub fn restore(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.hostport_chains && has_hostport_chains() {
            for jump in HOSTPORT_JUMPS {
                let _ = Command::new("iptables")
                    .args(["-t", "nat", "-D"])
                    .args(jump)
                    .output();
            }
            for chain in HOSTPORT_CHAINS {
                let _ = Command::new("iptables")
                    .args(["-t", "nat", "-F", chain])
                    .output();
                let _ = Command::new("iptables")
                    .args(["-t", "nat", "-X", chain])
                    .output();
            }
            notes.push(format!(
                "iptables nat chains {} (portmap's, made by this run): removed",
                HOSTPORT_CHAINS.join(", ")
            ));
        }
        for table in nft_tables() {
            if self.tables.contains(&table) {
                continue;
            }
            let Some(("table", rest)) = table.split_once(' ') else {
                continue;
            };
            let Some((family, name)) = rest.split_once(' ') else {
                continue;
            };
            if !matches!(family, "ip" | "ip6") {
                continue;
            }
            let listing = Command::new("nft")
                .args(["-j", "list", "table", family, name])
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok());
            let rules = listing
                .as_ref()
                .and_then(|v| v["nftables"].as_array())
                .map(|items| items.iter().filter(|i| i.get("rule").is_some()).count());
            match rules {
                Some(0) => {
                    let _ = Command::new("nft")
                        .args(["delete", "table", family, name])
                        .output();
                    notes.push(format!(
                        "nftables {table} (made empty by the CNI plugins' iptables): removed"
                    ));
                }
                Some(n) => notes.push(format!(
                    "nftables {table}: made during the run, {n} rules in it; left"
                )),
                None => notes.push(format!(
                    "nftables {table}: made during the run; cannot read it"
                )),
            }
        }
        notes
    }
}
