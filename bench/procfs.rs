//! What the benchmark reads from /proc about a daemon (resident memory now and
//! at its peak, CPU time spent) and about the machine (cores, memory, kernel,
//! CPU, load), plus the flag that SIGINT/SIGTERM/SIGHUP raise so a run stops
//! cleanly.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// Memory of one process, from /proc/<pid>/status, in KiB.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// VmRSS: resident set now.
    pub rss_kib: u64,
    /// VmHWM: the highest resident set since the process started.
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Result<Memory, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    let field = |name: &str| -> Result<u64, String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// Resident and proportional set of one process, from
/// /proc/<pid>/smaps_rollup, in KiB. PSS divides each shared page by the
/// number of processes mapping it, so the PSS of a set of processes adds up
/// to the memory they take together.
#[derive(Clone, Copy, Debug, Default)]
pub struct Footprint {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl std::ops::AddAssign for Footprint {
    fn add_assign(&mut self, other: Footprint) {
        self.rss_kib += other.rss_kib;
        self.pss_kib += other.pss_kib;
    }
}

pub fn footprint(pid: u32) -> Result<Footprint, String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    let field = |name: &str| -> Result<u64, String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in {path}"))
    };
    Ok(Footprint {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:")?,
    })
}

/// The cgroup hierarchy the benchmark files each daemon under, so that
/// everything a daemon forks and leaves where it was born (berth's monitors,
/// containerd's shims) can be found by cgroup, however it was reparented:
/// the v1 `pids` controller where there is one, else the v2 hierarchy.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    /// Where it is mounted, e.g. /sys/fs/cgroup/pids.
    pub mount: std::path::PathBuf,
    /// How /proc/<pid>/cgroup names it: Some("pids") for a v1 controller,
    /// None for the v2 line "0::/path".
    controller: Option<&'static str>,
}

impl Hierarchy {
    pub fn find() -> Result<Hierarchy, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
        let mut v2 = None;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut fields = right.split(' ');
            let fstype = fields.next().unwrap_or_default();
            let options = fields.nth(1).unwrap_or_default();
            let Some(point) = left.split(' ').nth(4) else {
                continue;
            };
            if fstype == "cgroup" && options.split(',').any(|o| o == "pids") {
                return Ok(Hierarchy {
                    mount: point.into(),
                    controller: Some("pids"),
                });
            }
            if fstype == "cgroup2" && v2.is_none() {
                v2 = Some(point.to_string());
            }
        }
        // A v2 mount beside v1 controllers (hybrid) holds no process moves by
        // the runtimes' v1 code, so it would do too; a pure v2 host has only it.
        v2.map(|point| Hierarchy {
            mount: point.into(),
            controller: None,
        })
        .ok_or_else(|| "no cgroup v1 pids controller and no cgroup2 mount".to_string())
    }

    /// The cgroup of `pid` in this hierarchy, e.g. "/berth-bench-1-0";
    /// None when the process is gone.
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        text.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let wanted = match self.controller {
                Some(c) => controllers.split(',').any(|x| x == c),
                None => controllers.is_empty(),
            };
            wanted.then(|| path.to_string())
        })
    }

    /// Every process on the host with its cgroup in this hierarchy.
    pub fn processes(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(cgroup) = self.cgroup_of(pid) {
                out.push((pid, cgroup));
            }
        }
        out
    }
}

/// The short command name of a process (/proc/<pid>/comm).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// CPU time of one process (all its threads), in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub user: f64,
    pub system: f64,
}

impl Cpu {
    pub fn total(self) -> f64 {
        self.user + self.system
    }

    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

pub fn cpu(pid: u32) -> Result<Cpu, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    // The command name (field 2) may hold spaces; fields 14 and 15 (utime,
    // stime) are the 12th and 13th after its closing parenthesis.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("malformed /proc/{pid}/stat"))
    };
    let hz = clock_ticks_per_second();
    Ok(Cpu {
        user: ticks(11)? as f64 / hz,
        system: ticks(12)? as f64 / hz,
    })
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The machine, for the header of the table.
pub struct Machine {
    pub cores: usize,
    pub mem_gib: f64,
    pub kernel: String,
    pub cpu: String,
}

pub fn machine() -> Machine {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_gib: mem_kib as f64 / (1024.0 * 1024.0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu,
    }
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg says them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT, SIGTERM and SIGHUP only raise a flag: the run checks
/// it between steps and while it waits, and then stops what it started.
pub fn catch_interrupts() -> Result<(), String> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }
            .map_err(|e| format!("install {signal} handler: {e}"))?;
    }
    Ok(())
}

/// Err("interrupted") once a signal came.
pub fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".to_string())
    } else {
        Ok(())
    }
}

/// Resolves once a signal came (checked every 50 ms).
pub async fn interrupted() {
    while !INTERRUPTED.load(Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
