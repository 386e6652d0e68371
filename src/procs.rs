//! Processes found by their command line. berth's helper processes (monitor
//! launches, pod infra) carry a path under berth's own state dir in their
//! arguments, which proves whose they are when no record is left to say so.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Kills, with SIGKILL, every process whose arguments after the program
/// name begin with `args`, until none is left (a process may fork once more
/// between a scan and its kill). Zombies have no command line and are not
/// matched. Blocking: scans /proc.
pub fn kill_with_args(args: &[&[u8]]) {
    for _ in 0..20 {
        let mut found = false;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let given: Vec<&[u8]> = cmdline
                .split(|b| *b == 0)
                .skip(1)
                .take(args.len())
                .collect();
            if given == args {
                found = true;
                let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                tracing::info!(pid, cmdline = %shown.trim_end(), "killing a leftover process");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
