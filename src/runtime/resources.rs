//! Resource limits of a container, written into its cgroup: v1 controller
//! files, or their v2 equivalents. Limits the host cannot enforce (hugetlb
//! without its controller) are skipped with a debug log, as kubelet sends them
//! on every create.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::cgroup::{CgroupError, CgroupVersion, Cgroups};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_period: i64,
    pub cpu_quota: i64,
    pub cpu_shares: i64,
    pub memory_limit_in_bytes: i64,
    pub memory_swap_limit_in_bytes: i64,
    pub cpuset_cpus: String,
    pub cpuset_mems: String,
    pub oom_score_adj: i64,
    /// Page size (e.g. `2MB`) to limit in bytes.
    pub hugepage_limits: BTreeMap<String, u64>,
    /// cgroup v2 files written as given.
    pub unified: BTreeMap<String, String>,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|source| CgroupError::Io { path, source })
}

/// cgroup v2 weight for v1 shares, as runc converts it.
pub fn shares_to_weight(shares: i64) -> i64 {
    if shares <= 0 {
        return 0;
    }
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// The limits of a pod's cgroup, sized as kubelet sizes the pod cgroups it
/// makes: the sum of the containers' limits plus the pod's overhead. A limit
/// the containers leave unbounded (memory, CPU quota) stays unbounded.
pub fn pod_limits(sum: &Resources, overhead: &Resources) -> Resources {
    const DEFAULT_PERIOD: i64 = 100_000;
    let period = |r: &Resources| {
        if r.cpu_period > 0 {
            r.cpu_period
        } else {
            DEFAULT_PERIOD
        }
    };
    let mut pod = Resources {
        cpu_shares: sum.cpu_shares.max(0) + overhead.cpu_shares.max(0),
        ..Default::default()
    };
    if sum.memory_limit_in_bytes > 0 {
        pod.memory_limit_in_bytes =
            sum.memory_limit_in_bytes + overhead.memory_limit_in_bytes.max(0);
    }
    if sum.cpu_quota > 0 {
        // The overhead's quota, in the sum's period.
        let extra = overhead.cpu_quota.max(0) * period(sum) / period(overhead);
        pod.cpu_quota = sum.cpu_quota + extra;
        pod.cpu_period = period(sum);
    }
    pod
}

/// Writes the limits into the cgroup `rel`.
pub fn apply(cgroups: &Cgroups, rel: &str, r: &Resources) -> Result<(), CgroupError> {
    match cgroups.version {
        CgroupVersion::V1 => apply_v1(cgroups, rel, r),
        CgroupVersion::V2 => apply_v2(cgroups, rel, r),
    }
}

fn apply_v1(cgroups: &Cgroups, rel: &str, r: &Resources) -> Result<(), CgroupError> {
    if let Some(cpu) = cgroups.controller_dir("cpu", rel) {
        if r.cpu_shares > 0 {
            write(&cpu, "cpu.shares", &r.cpu_shares.to_string())?;
        }
        if r.cpu_period > 0 {
            write(&cpu, "cpu.cfs_period_us", &r.cpu_period.to_string())?;
        }
        if r.cpu_quota != 0 {
            write(&cpu, "cpu.cfs_quota_us", &r.cpu_quota.to_string())?;
        }
    }
    if let Some(memory) = cgroups.controller_dir("memory", rel) {
        if r.memory_limit_in_bytes > 0 {
            write(
                &memory,
                "memory.limit_in_bytes",
                &r.memory_limit_in_bytes.to_string(),
            )?;
        }
        if r.memory_swap_limit_in_bytes > 0 && memory.join("memory.memsw.limit_in_bytes").exists() {
            write(
                &memory,
                "memory.memsw.limit_in_bytes",
                &r.memory_swap_limit_in_bytes.to_string(),
            )?;
        }
    }
    if let Some(cpuset) = cgroups.controller_dir("cpuset", rel) {
        if !r.cpuset_cpus.is_empty() {
            write(&cpuset, "cpuset.cpus", &r.cpuset_cpus)?;
        }
        if !r.cpuset_mems.is_empty() {
            write(&cpuset, "cpuset.mems", &r.cpuset_mems)?;
        }
    }
    for (size, limit) in &r.hugepage_limits {
        match cgroups.controller_dir("hugetlb", rel) {
            Some(dir) => write(
                &dir,
                &format!("hugetlb.{size}.limit_in_bytes"),
                &limit.to_string(),
            )?,
            None => tracing::debug!(size, "no hugetlb controller; hugepage limit skipped"),
        }
    }
    Ok(())
}

fn apply_v2(cgroups: &Cgroups, rel: &str, r: &Resources) -> Result<(), CgroupError> {
    let Some(dir) = cgroups.controller_dir("", rel) else {
        return Ok(());
    };
    if r.cpu_shares > 0 {
        write(
            &dir,
            "cpu.weight",
            &shares_to_weight(r.cpu_shares).to_string(),
        )?;
    }
    if r.cpu_quota != 0 || r.cpu_period > 0 {
        let quota = if r.cpu_quota > 0 {
            r.cpu_quota.to_string()
        } else {
            "max".to_string()
        };
        let period = if r.cpu_period > 0 {
            r.cpu_period
        } else {
            100_000
        };
        write(&dir, "cpu.max", &format!("{quota} {period}"))?;
    }
    if r.memory_limit_in_bytes > 0 {
        write(&dir, "memory.max", &r.memory_limit_in_bytes.to_string())?;
        if r.memory_swap_limit_in_bytes > 0 {
            // v1 counts memory plus swap; v2 counts swap alone.
            let swap = (r.memory_swap_limit_in_bytes - r.memory_limit_in_bytes).max(0);
            write(&dir, "memory.swap.max", &swap.to_string())?;
        }
    }
    if !r.cpuset_cpus.is_empty() {
        write(&dir, "cpuset.cpus", &r.cpuset_cpus)?;
    }
    if !r.cpuset_mems.is_empty() {
        write(&dir, "cpuset.mems", &r.cpuset_mems)?;
    }
    for (size, limit) in &r.hugepage_limits {
        let file = format!("hugetlb.{size}.max");
        if dir.join(&file).exists() {
            write(&dir, &file, &limit.to_string())?;
        } else {
            tracing::debug!(size, "no hugetlb controller; hugepage limit skipped");
        }
    }
    for (file, value) in &r.unified {
        if file.contains('/') || file.starts_with('.') {
            return Err(CgroupError::BadPath(file.clone()));
        }
        write(&dir, file, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_convert_to_weights_as_runc_does() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 0);
    }

    #[test]
    fn pod_limits_add_the_overhead_to_bounded_sums() {
        let sum = Resources {
            cpu_shares: 512,
            cpu_quota: 50_000,
            memory_limit_in_bytes: 64 << 20,
            cpuset_cpus: "0".to_string(),
            ..Default::default()
        };
        let overhead = Resources {
            cpu_shares: 128,
            cpu_period: 50_000,
            cpu_quota: 10_000,
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        };
        let pod = pod_limits(&sum, &overhead);
        assert_eq!(
            (pod.cpu_shares, pod.cpu_quota, pod.cpu_period),
            (640, 70_000, 100_000)
        );
        assert_eq!(pod.memory_limit_in_bytes, 80 << 20);
        assert!(
            pod.cpuset_cpus.is_empty(),
            "containers choose their own CPUs"
        );
        let unbounded = pod_limits(&Resources::default(), &overhead);
        assert_eq!(
            (unbounded.cpu_quota, unbounded.memory_limit_in_bytes),
            (0, 0)
        );
        assert_eq!(unbounded.cpu_shares, 128);
    }

    #[test]
    fn limits_land_in_v1_files() {
        let cgroups = Cgroups::discover(Path::new("/sys/fs/cgroup")).expect("cgroups");
        if cgroups.version != CgroupVersion::V1 {
            return;
        }
        let rel = format!("berth-res-{}", std::process::id());
        cgroups.create(&rel).expect("create");
        let r = Resources {
            cpu_shares: 512,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            memory_limit_in_bytes: 64 * 1024 * 1024,
            hugepage_limits: [("2MB".to_string(), 0)].into(),
            ..Default::default()
        };
        let result = apply(&cgroups, &rel, &r);
        let read = |c: &str, f: &str| {
            fs::read_to_string(cgroups.controller_dir(c, &rel).expect("dir").join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let seen = (
            read("cpu", "cpu.shares"),
            read("cpu", "cpu.cfs_quota_us"),
            read("memory", "memory.limit_in_bytes"),
        );
        cgroups.remove(&rel).expect("remove");
        result.expect("apply");
        assert_eq!(
            seen,
            ("512".into(), "50000".into(), (64 * 1024 * 1024).to_string())
        );
    }
}
