//! Linux capabilities of the container process: the spec's names mapped to
//! kernel numbers, and the bounding, effective/permitted/inheritable and
//! ambient sets applied with prctl and capset (which nix lacks).

use std::collections::HashSet;

use oci_spec::runtime::{Capability, LinuxCapabilities};

use super::{Step, StepError};

/// Kernel capability names by number (linux/capability.h).
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The kernel number of a capability, if this build knows it.
fn number(cap: &Capability) -> Option<u32> {
    let name = cap.to_string();
    let name = name.strip_prefix("CAP_").unwrap_or(&name);
    NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
}

/// A set as a bit mask, leaving out capabilities this kernel lacks.
fn mask(set: Option<&HashSet<Capability>>, last_cap: u32) -> u64 {
    set.into_iter()
        .flatten()
        .filter_map(number)
        .filter(|&n| n <= last_cap)
        .fold(0, |m, n| m | (1 << n))
}

/// The highest capability number of the running kernel.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The masks to apply, computed before the uid changes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CapSets {
    bounding: u64,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: u64,
}

impl CapSets {
    /// From the spec, each set cut down to what this process may hold: a
    /// capability outside the current bounding set (e.g. CAP_SYS_RESOURCE on
    /// a host whose root lacks it) cannot be granted and is left out.
    pub(crate) fn from_spec(caps: &LinuxCapabilities) -> Result<CapSets, StepError> {
        let last = last_cap();
        let held = current_bounding(last)?;
        let get = |set: &Option<HashSet<Capability>>| mask(set.as_ref(), last) & held;
        let permitted = get(caps.permitted());
        let inheritable = get(caps.inheritable());
        Ok(CapSets {
            bounding: get(caps.bounding()),
            effective: get(caps.effective()) & permitted,
            permitted,
            inheritable,
            // Ambient needs both permitted and inheritable.
            ambient: get(caps.ambient()) & permitted & inheritable,
        })
    }

    /// Drops every capability outside the bounding set (needs CAP_SETPCAP,
    /// so before the uid changes).
    pub(crate) fn apply_bounding(&self) -> Result<(), StepError> {
        for cap in 0..=last_cap() {
            if self.bounding & (1 << cap) == 0 {
                // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
                let rc =
                    unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .step(|| format!("drop capability {} from the bounding set", name(cap)));
                }
            }
        }
        Ok(())
    }

    /// Sets effective, permitted and inheritable in one capset, then the
    /// ambient set (after the uid change, with keep-caps on).
    pub(crate) fn apply(&self) -> Result<(), StepError> {
        capset(self.effective, self.permitted, self.inheritable)?;
        // SAFETY: PR_CAP_AMBIENT with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .step(|| "clear ambient capabilities".into());
        }
        for cap in 0..64u32 {
            if self.ambient & (1 << cap) != 0 {
                // SAFETY: PR_CAP_AMBIENT with integer arguments only.
                let rc = unsafe {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap as libc::c_ulong,
                        0,
                        0,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .step(|| format!("raise ambient capability {}", name(cap)));
                }
            }
        }
        Ok(())
    }
}

fn name(cap: u32) -> String {
    NAMES
        .get(cap as usize)
        .map_or_else(|| format!("#{cap}"), |n| format!("CAP_{n}"))
}

fn current_bounding(last: u32) -> Result<u64, StepError> {
    let mut held = 0u64;
    for cap in 0..=last.min(63) {
        // SAFETY: PR_CAPBSET_READ takes a capability number and no pointers.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        match rc {
            1 => held |= 1 << cap,
            0 => {}
            _ => {
                return Err(std::io::Error::last_os_error())
                    .step(|| "read the capability bounding set".into());
            }
        }
    }
    Ok(held)
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability of the calling process (effective, permitted,
/// inheritable); the bounding set no longer matters then.
pub(crate) fn drop_all() -> Result<(), StepError> {
    capset(0, 0, 0)
}

fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), StepError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    for (i, d) in data.iter_mut().enumerate() {
        let shift = 32 * i;
        d.effective = (effective >> shift) as u32;
        d.permitted = (permitted >> shift) as u32;
        d.inheritable = (inheritable >> shift) as u32;
    }
    // SAFETY: header and two data structs of the v3 layout, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).step(|| {
            format!("capset effective={effective:#x} permitted={permitted:#x} inheritable={inheritable:#x}")
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_map_to_kernel_numbers() {
        assert_eq!(number(&Capability::Chown), Some(0));
        assert_eq!(number(&Capability::NetBindService), Some(10));
        assert_eq!(number(&Capability::SysAdmin), Some(21));
        assert_eq!(number(&Capability::CheckpointRestore), Some(40));
    }

    #[test]
    fn masks_leave_out_unknown_capabilities() {
        let set: HashSet<Capability> = [Capability::Kill, Capability::Bpf].into_iter().collect();
        assert_eq!(mask(Some(&set), 40), (1 << 5) | (1 << 39));
        assert_eq!(mask(Some(&set), 38), 1 << 5);
        assert_eq!(mask(None, 40), 0);
    }
}
