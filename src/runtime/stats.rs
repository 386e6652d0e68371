//! Resource usage of containers and pods: CPU and memory from their cgroups
//! (v1 or v2), writable-layer bytes and inodes from the upper dir, and pod
//! network counters read inside the pinned network namespace.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Mutex;

use super::cgroup::{CgroupVersion, Cgroups};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuUsage {
    /// Unix nanoseconds of the sample.
    pub timestamp: i64,
    pub usage_core_nanos: u64,
    /// Average use since the previous sample, in nanocores; 0 on the first.
    pub usage_nano_cores: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    pub usage_bytes: u64,
    pub working_set_bytes: u64,
    pub rss_bytes: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerUsage {
    pub bytes: u64,
    pub inodes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_field(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Remembers each cgroup's last CPU sample, to turn totals into a rate.
#[derive(Default)]
pub struct CpuSampler {
    last: Mutex<HashMap<String, (i64, u64)>>,
}

impl CpuSampler {
    pub fn sample(&self, cgroups: &Cgroups, cgroup: &str, now: i64) -> Option<CpuUsage> {
        let total = match cgroups.version {
            CgroupVersion::V1 => read_u64(
                &cgroups
                    .controller_dir("cpuacct", cgroup)?
                    .join("cpuacct.usage"),
            )?,
            CgroupVersion::V2 => {
                let stat =
                    fs::read_to_string(cgroups.controller_dir("cpu", cgroup)?.join("cpu.stat"))
                        .ok()?;
                stat_field(&stat, "usage_usec")? * 1000
            }
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let rate = match last.get(cgroup) {
            Some(&(t, u)) if now > t && total >= u => {
                ((total - u) as u128 * 1_000_000_000 / (now - t) as u128) as u64
            }
            _ => 0,
        };
        last.insert(cgroup.to_string(), (now, total));
        Some(CpuUsage {
            timestamp: now,
            usage_core_nanos: total,
            usage_nano_cores: rate,
        })
    }

    pub fn forget(&self, cgroup: &str) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(cgroup);
    }
}

/// Memory of a cgroup; the working set is usage less inactive file pages, as kubelet counts it.
pub fn memory(cgroups: &Cgroups, cgroup: &str) -> Option<MemoryUsage> {
    let dir = cgroups.controller_dir("memory", cgroup)?;
    let (usage, stat) = match cgroups.version {
        CgroupVersion::V1 => (
            read_u64(&dir.join("memory.usage_in_bytes"))?,
            fs::read_to_string(dir.join("memory.stat")).ok()?,
        ),
        CgroupVersion::V2 => (
            read_u64(&dir.join("memory.current"))?,
            fs::read_to_string(dir.join("memory.stat")).ok()?,
        ),
    };
    let (inactive_file, rss, faults, major) = match cgroups.version {
        CgroupVersion::V1 => (
            stat_field(&stat, "total_inactive_file"),
            stat_field(&stat, "total_rss"),
            stat_field(&stat, "total_pgfault"),
            stat_field(&stat, "total_pgmajfault"),
        ),
        CgroupVersion::V2 => (
            stat_field(&stat, "inactive_file"),
            stat_field(&stat, "anon"),
            stat_field(&stat, "pgfault"),
            stat_field(&stat, "pgmajfault"),
        ),
    };
    Some(MemoryUsage {
        usage_bytes: usage,
        working_set_bytes: usage.saturating_sub(inactive_file.unwrap_or(0)),
        rss_bytes: rss.unwrap_or(0),
        page_faults: faults.unwrap_or(0),
        major_page_faults: major.unwrap_or(0),
    })
}

/// Bytes and inodes of a writable layer (its upper dir).
pub fn layer(upper: &Path) -> LayerUsage {
    use std::os::unix::fs::MetadataExt;
    let mut usage = LayerUsage::default();
    let mut stack = vec![upper.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        usage.inodes += 1;
        usage.bytes += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = fs::read_dir(&p)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    usage
}

/// Parses `/proc/net/dev` content.
pub fn parse_net_dev(text: &str) -> Vec<InterfaceStats> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (f.len() >= 11).then(|| InterfaceStats {
                name: name.trim().to_string(),
                rx_bytes: f[0],
                rx_errors: f[2],
                tx_bytes: f[8],
                tx_errors: f[10],
            })
        })
        .collect()
}

/// Interface counters of the network namespace pinned at `pin`, read on a
/// thread of its own that enters it (there is no pod process to look at).
pub fn network(pin: &Path) -> Option<Vec<InterfaceStats>> {
    let ns = fs::File::open(pin).ok()?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        // /proc/thread-self/net follows the thread's network namespace.
        fs::read_to_string("/proc/thread-self/net/dev").ok()
    })
    .join()
    .ok()
    .flatten()
    .map(|text| parse_net_dev(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_parses() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     120       2    0    0    0     0          0         0      120       2    0    0    0     0       0          0\n  eth0: 1000 10 1 0 0 0 0 0 2000 20 3 0 0 0 0 0\n";
        let stats = parse_net_dev(text);
        assert_eq!(stats.len(), 2);
        assert_eq!(
            stats[1],
            InterfaceStats {
                name: "eth0".into(),
                rx_bytes: 1000,
                rx_errors: 1,
                tx_bytes: 2000,
                tx_errors: 3
            }
        );
    }

    #[test]
    fn stat_fields_are_found() {
        assert_eq!(
            stat_field("cache 5\ntotal_inactive_file 7\n", "total_inactive_file"),
            Some(7)
        );
        assert_eq!(stat_field("cache 5\n", "missing"), None);
    }
}
