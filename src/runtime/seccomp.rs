//! Seccomp for containers: containerd's default profile as data, Localhost
//! profiles read from OCI JSON files, the compiler from an OCI `LinuxSeccomp`
//! to a BPF program (libseccomp), a per-profile cache of compiled programs,
//! the program file berthd leaves in the bundle, and the loader that the
//! container init and the exec helper call.
//!
//! berthd compiles each distinct profile once ([`SeccompCache`]) and writes
//! the program next to `config.json` as [`PROGRAM_FILE`]; the init only reads
//! and loads it. The file names the profile it was compiled from (a sha256 of
//! the profile's JSON), so a missing, stale or torn file is never loaded: the
//! init then compiles `linux.seccomp` itself ([`program_for`]).
//!
//! When to load (as runc does): loading a filter needs either no_new_privs or
//! CAP_SYS_ADMIN. With `noNewPrivileges` the filter is loaded last, right
//! before exec, so that the fewest syscalls run under it. Without it the
//! filter must be loaded while the process still holds CAP_SYS_ADMIN, that
//! is before the uid change and the capability drop; the syscalls of that
//! step (setgroups, setresuid, capset, prctl) then run under the filter.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use nix::sys::memfd::{MFdFlags, memfd_create};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompFilterFlag,
    LinuxSeccompOperator, LinuxSyscall,
};
use sha2::{Digest, Sha256};

/// The compiled filter in a container's bundle, beside `config.json`.
pub const PROGRAM_FILE: &str = "seccomp.bpf";

/// First bytes of a [`PROGRAM_FILE`].
const PROGRAM_MAGIC: &[u8; 8] = b"berthsc1";
/// Magic, profile key, flags and instruction count.
const PROGRAM_HEADER: usize = 8 + 32 + 4 + 4;
/// The kernel's limit on the length of one filter (BPF_MAXINSNS).
const MAX_INSTRUCTIONS: usize = 4096;
/// Size of one `struct sock_filter`.
const INSTRUCTION: usize = 8;
/// Linux system calls have at most six arguments.
const MAX_ARGS: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profile {}: no such file", path.display())]
    ProfileMissing { path: PathBuf },
    #[error("seccomp profile {}: the path must be absolute", path.display())]
    ProfileNotAbsolute { path: PathBuf },
    #[error("seccomp profile {}: cannot read it: {source}", path.display())]
    ProfileRead { path: PathBuf, source: io::Error },
    #[error("seccomp profile {}: not a valid OCI seccomp profile: {source}", path.display())]
    ProfileMalformed {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The profile is well-formed JSON but asks for something berth cannot do.
    #[error("seccomp profile: {0}")]
    Invalid(String),
    #[error("seccomp: cannot compile the profile: {0}")]
    Compile(String),
    #[error("seccomp: compiled filter {}: {reason}", path.display())]
    Program { path: PathBuf, reason: String },
    #[error("seccomp: {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("seccomp: cannot load the filter: {0}")]
    Install(String),
}

fn invalid(reason: impl Into<String>) -> SeccompError {
    SeccompError::Invalid(reason.into())
}

// ---------------------------------------------------------------------------
// The default profile (RuntimeDefault): containerd's, which is moby's.

/// Allowed whatever the capabilities.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lsm_get_self_attr",
    "lsm_list_modules",
    "lsm_set_self_attr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "map_shadow_stack",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Allowed whatever the capabilities: process_vm_readv, process_vm_writev
/// and ptrace (containerd allows them on kernels from 4.8 on; berth needs a
/// newer kernel anyway).
const ALLOWED_SINCE_4_8: &[&str] = &["process_vm_readv", "process_vm_writev", "ptrace"];

/// Allowed on x86_64 only.
const ALLOWED_X86_64: &[&str] = &["arch_prctl", "modify_ldt"];

/// Allowed on arm and aarch64 only.
const ALLOWED_ARM: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "breakpoint",
    "cacheflush",
    "set_tls",
];

/// Allowed when argument 0 compares so with the value; one rule each, so
/// they combine as "or". socket(2) for every address family but AF_ALG (38)
/// and AF_VSOCK (40); personality(2) for the few harmless personas.
const ALLOWED_BY_ARG0: &[(&str, LinuxSeccompOperator, u64)] = &[
    (
        "socket",
        LinuxSeccompOperator::ScmpCmpLt,
        libc::AF_ALG as u64,
    ),
    (
        "socket",
        LinuxSeccompOperator::ScmpCmpEq,
        libc::AF_ALG as u64 + 1,
    ),
    (
        "socket",
        LinuxSeccompOperator::ScmpCmpGt,
        libc::AF_VSOCK as u64,
    ),
    ("personality", LinuxSeccompOperator::ScmpCmpEq, 0x0),
    ("personality", LinuxSeccompOperator::ScmpCmpEq, 0x0008),
    ("personality", LinuxSeccompOperator::ScmpCmpEq, 0x20000),
    ("personality", LinuxSeccompOperator::ScmpCmpEq, 0x20008),
    ("personality", LinuxSeccompOperator::ScmpCmpEq, 0xffff_ffff),
];

/// Allowed when the bounding set holds the capability (named without CAP_).
const ALLOWED_BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("SYS_BOOT", &["reboot"]),
    ("SYS_CHROOT", &["chroot"]),
    (
        "SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("SYS_PACCT", &["acct"]),
    (
        "SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("SYS_TTY_CONFIG", &["vhangup"]),
    (
        "SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("SYSLOG", &["syslog"]),
    ("BPF", &["bpf"]),
    ("PERFMON", &["perf_event_open"]),
];

/// Flags of clone(2) that make new namespaces: without CAP_SYS_ADMIN, clone
/// is allowed only when argument 0 has none of them.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// The architectures a filter of this host covers: the native one and those
/// whose programs it can also run.
fn host_architectures() -> Vec<Arch> {
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchArm, Arch::ScmpArchAarch64]
    } else {
        Vec::new()
    }
}

fn syscall_rule(names: &[&str], action: LinuxSeccompAction) -> LinuxSyscall {
    let mut rule = LinuxSyscall::default();
    rule.set_names(names.iter().map(|n| n.to_string()).collect());
    rule.set_action(action);
    rule
}

fn arg0_rule(
    name: &str,
    action: LinuxSeccompAction,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> LinuxSyscall {
    let arg = LinuxSeccompArgBuilder::default()
        .index(0usize)
        .op(op)
        .value(value);
    let arg = match value_two {
        Some(two) => arg.value_two(two),
        None => arg,
    };
    // Every field has a default: building cannot fail.
    let arg = arg.build().unwrap_or_default();
    let mut rule = syscall_rule(&[name], action);
    rule.set_args(Some(vec![arg]));
    rule
}

/// The RuntimeDefault profile for a container whose bounding set is
/// `capabilities` ("CAP_SYS_ADMIN" or "SYS_ADMIN"): containerd's default,
/// which is moby's. Everything not allowed fails with EPERM, but clone3
/// without CAP_SYS_ADMIN fails with ENOSYS, so that glibc falls back to
/// clone (whose namespace flags the filter can see). The same set, in any
/// order, gives the same profile, hence one compiled program per set.
pub fn default_profile(capabilities: &[String]) -> LinuxSeccomp {
    let has = |cap: &str| {
        capabilities.iter().any(|c| {
            let c = c.trim();
            let c = c
                .get(..4)
                .filter(|p| p.eq_ignore_ascii_case("CAP_"))
                .map_or(c, |_| &c[4..]);
            c.eq_ignore_ascii_case(cap)
        })
    };
    let allow = LinuxSeccompAction::ScmpActAllow;
    let mut rules = vec![syscall_rule(ALLOWED, allow)];
    for (name, op, value) in ALLOWED_BY_ARG0 {
        rules.push(arg0_rule(name, allow, *op, *value, None));
    }
    rules.push(syscall_rule(ALLOWED_SINCE_4_8, allow));
    if cfg!(target_arch = "x86_64") {
        rules.push(syscall_rule(ALLOWED_X86_64, allow));
    } else if cfg!(target_arch = "aarch64") {
        rules.push(syscall_rule(ALLOWED_ARM, allow));
    }
    for (cap, names) in ALLOWED_BY_CAPABILITY {
        if has(cap) {
            rules.push(syscall_rule(names, allow));
        }
    }
    if !has("SYS_ADMIN") {
        rules.push(arg0_rule(
            "clone",
            allow,
            LinuxSeccompOperator::ScmpCmpMaskedEq,
            CLONE_NAMESPACE_FLAGS,
            Some(0),
        ));
        let mut clone3 = syscall_rule(&["clone3"], LinuxSeccompAction::ScmpActErrno);
        clone3.set_errno_ret(Some(libc::ENOSYS as u32));
        rules.push(clone3);
    }
    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(LinuxSeccompAction::ScmpActErrno);
    profile.set_architectures(Some(host_architectures()));
    profile.set_syscalls(Some(rules));
    profile
}

// ---------------------------------------------------------------------------
// Localhost profiles.

/// A Localhost profile: an OCI `LinuxSeccomp` in a JSON file on the node
/// (the format of containerd's and Docker's profiles; unknown keys such as
/// Docker's `archMap` are ignored). Checked as far as it can be without
/// compiling it.
pub fn load_localhost(path: &Path) -> Result<LinuxSeccomp, SeccompError> {
    if !path.is_absolute() {
        return Err(SeccompError::ProfileNotAbsolute {
            path: path.to_path_buf(),
        });
    }
    let data = std::fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            SeccompError::ProfileMissing {
                path: path.to_path_buf(),
            }
        } else {
            SeccompError::ProfileRead {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let profile: LinuxSeccomp =
        serde_json::from_slice(&data).map_err(|source| SeccompError::ProfileMalformed {
            path: path.to_path_buf(),
            source,
        })?;
    check(&profile)?;
    Ok(profile)
}

/// What makes a profile impossible to compile, found without compiling.
fn check(profile: &LinuxSeccomp) -> Result<(), SeccompError> {
    if profile.listener_path().is_some() {
        return Err(invalid(
            "listenerPath (a seccomp agent for SCMP_ACT_NOTIFY) is not supported",
        ));
    }
    action(profile.default_action(), profile.default_errno_ret())?;
    for rule in profile.syscalls().iter().flatten() {
        action(rule.action(), rule.errno_ret())?;
        conditions(rule)?;
        if rule.names().iter().any(|n| n.is_empty()) {
            return Err(invalid("a syscall name is empty"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Compiling.

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    let data = |what: &str| -> Result<u16, SeccompError> {
        let value = errno.unwrap_or(libc::EPERM as u32);
        u16::try_from(value).map_err(|_| invalid(format!("{what} value {value} is too large")))
    };
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(i32::from(data("errnoRet")?)),
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(data("SCMP_ACT_TRACE")?),
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(invalid(
                "SCMP_ACT_NOTIFY needs a seccomp agent, which berth does not support",
            ));
        }
    })
}

/// The rule's argument conditions as groups, each group one libseccomp rule.
/// libseccomp takes at most one condition per argument in a rule, so when an
/// argument has several, every condition becomes a rule of its own (and they
/// combine as "or"), as runc does.
fn conditions(rule: &LinuxSyscall) -> Result<Vec<Vec<ScmpArgCompare>>, SeccompError> {
    let args = rule.args().as_deref().unwrap_or_default();
    let mut per_index = [0usize; MAX_ARGS];
    let mut all = Vec::with_capacity(args.len());
    for arg in args {
        let index = arg.index();
        let count = per_index.get_mut(index).ok_or_else(|| {
            invalid(format!(
                "syscalls {:?}: argument index {index} is out of range 0-5",
                rule.names()
            ))
        })?;
        *count += 1;
        let value = arg.value();
        let op = match arg.op() {
            LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
            LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
            LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
            LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
            LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
            LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
            // OCI: value is the mask, valueTwo what the masked argument must be.
            LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(value),
        };
        let datum = match arg.op() {
            LinuxSeccompOperator::ScmpCmpMaskedEq => arg.value_two().unwrap_or(0),
            _ => value,
        };
        // Index is below MAX_ARGS, checked above.
        all.push(ScmpArgCompare::new(index as u32, op, datum));
    }
    if all.is_empty() {
        return Ok(vec![Vec::new()]);
    }
    if per_index.iter().any(|&n| n > 1) {
        return Ok(all.into_iter().map(|c| vec![c]).collect());
    }
    Ok(vec![all])
}

fn scmp_arch(arch: Arch) -> ScmpArch {
    match arch {
        Arch::ScmpArchNative => ScmpArch::Native,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        Arch::ScmpArchMips => ScmpArch::Mips,
        Arch::ScmpArchMips64 => ScmpArch::Mips64,
        Arch::ScmpArchMips64n32 => ScmpArch::Mips64N32,
        Arch::ScmpArchMipsel => ScmpArch::Mipsel,
        Arch::ScmpArchMipsel64 => ScmpArch::Mipsel64,
        Arch::ScmpArchMipsel64n32 => ScmpArch::Mipsel64N32,
        Arch::ScmpArchPpc => ScmpArch::Ppc,
        Arch::ScmpArchPpc64 => ScmpArch::Ppc64,
        Arch::ScmpArchPpc64le => ScmpArch::Ppc64Le,
        Arch::ScmpArchS390 => ScmpArch::S390,
        Arch::ScmpArchS390x => ScmpArch::S390X,
        Arch::ScmpArchRiscv64 => ScmpArch::Riscv64,
    }
}

/// The seccomp(2) flags the profile asks for. TSYNC is left out: the init
/// and the exec helper load the filter with a single thread.
pub fn filter_flags(profile: &LinuxSeccomp) -> u32 {
    profile
        .flags()
        .iter()
        .flatten()
        .map(|flag| match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG as u32,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW as u32
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
        })
        .fold(0, |all, f| all | f)
}

/// Compiles the profile for this host's architecture into a BPF program:
/// `struct sock_filter` entries in host byte order, ready for [`install`].
/// As runc does: syscall names this libseccomp does not know are skipped,
/// rules whose action is the default action are skipped, the architectures
/// listed are added to the native one, and syscalls newer than any the
/// profile names fail with ENOSYS rather than the default action
/// ([`enosys_stub`]).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<u8>, SeccompError> {
    check(profile)?;
    let failed = |what: String| {
        move |e: libseccomp::error::SeccompError| SeccompError::Compile(format!("{what}: {e}"))
    };
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut filter = ScmpFilterContext::new(default).map_err(failed("create a filter".into()))?;
    for arch in profile.architectures().iter().flatten() {
        let arch = scmp_arch(*arch);
        let present = filter
            .is_arch_present(arch)
            .map_err(failed(format!("architecture {arch:?}")))?;
        if !present {
            filter
                .add_arch(arch)
                .map_err(failed(format!("add architecture {arch:?}")))?;
        }
    }
    filter
        .set_ctl_nnp(false)
        .map_err(failed("leave no_new_privs alone".into()))?;
    let rules = profile.syscalls().as_deref().unwrap_or_default();
    // A binary tree keeps long allowlists fast; libseccomp up to 2.5.4
    // misbehaves with it on empty filters (runc's threshold, which counts
    // names: runc keeps one rule per name).
    if rules.iter().map(|r| r.names().len()).sum::<usize>() > 32 {
        let _ = filter.set_ctl_optimize(2);
    }
    for rule in rules {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let groups = conditions(rule)?;
        for name in rule.names() {
            // Unknown to this libseccomp: not a syscall this kernel build can
            // be asked for by name, skipped like runc does.
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                continue;
            };
            for group in &groups {
                let added = if group.is_empty() {
                    filter.add_rule(act, syscall)
                } else {
                    filter.add_rule_conditional(act, syscall, group)
                };
                added.map_err(failed(format!("rule for {name}")))?;
            }
        }
    }
    let exported = export(&filter)?;
    if exported.is_empty() || !exported.len().is_multiple_of(INSTRUCTION) {
        return Err(SeccompError::Compile(format!(
            "libseccomp produced {} bytes, not a BPF program",
            exported.len()
        )));
    }
    let mut bpf = enosys_stub(profile, default);
    bpf.extend_from_slice(&exported);
    let instructions = bpf.len() / INSTRUCTION;
    if instructions > MAX_INSTRUCTIONS {
        return Err(SeccompError::Compile(format!(
            "the program has {instructions} instructions; the kernel takes at most {MAX_INSTRUCTIONS}"
        )));
    }
    Ok(bpf)
}

/// The filter's BPF program, through a memfd (libseccomp before 2.6 exports
/// only to a file descriptor).
fn export(filter: &ScmpFilterContext) -> Result<Vec<u8>, SeccompError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| SeccompError::Io { what, source: e }
    };
    let fd = memfd_create(c"berth-seccomp", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| io("memfd_create")(e.into()))?;
    filter
        .export_bpf(&fd)
        .map_err(|e| SeccompError::Compile(format!("export the program: {e}")))?;
    let mut file = File::from(fd);
    file.seek(SeekFrom::Start(0))
        .map_err(io("rewind the exported program"))?;
    let mut bpf = Vec::new();
    file.read_to_end(&mut bpf)
        .map_err(io("read the exported program"))?;
    Ok(bpf)
}

// ---------------------------------------------------------------------------
// ENOSYS for syscalls the profile cannot know.

/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// AUDIT_ARCH_* of the architectures whose syscall ranges the stub checks.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
const AUDIT_ARCH_ARM: u32 = 0x4000_0028;
/// x32 syscalls arrive as x86_64 ones with this bit set.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const LD_ABS_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const RET_ERRNO_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

/// The highest syscall number among the profile's names on `arch`.
fn highest_syscall(profile: &LinuxSeccomp, arch: ScmpArch) -> Option<u32> {
    profile
        .syscalls()
        .iter()
        .flatten()
        .flat_map(|rule| rule.names())
        .filter_map(|name| ScmpSyscall::from_name_by_arch(name, arch).ok())
        .filter_map(|nr| u32::try_from(nr.as_raw_syscall()).ok())
        .max()
}

/// A prologue for the libseccomp program, as runc's patchbpf adds one: a
/// syscall numbered above every syscall the profile names (one newer than
/// the profile, or than this libseccomp) fails with ENOSYS, as on a kernel
/// without it, instead of the default action; programs then take their
/// fallbacks, as glibc does for clone3. Nothing when the default action lets
/// syscalls through. Architectures other than x86 and arm are left alone.
fn enosys_stub(profile: &LinuxSeccomp, default: ScmpAction) -> Vec<u8> {
    if matches!(
        default,
        ScmpAction::Allow | ScmpAction::Log | ScmpAction::Trace(_)
    ) {
        return Vec::new();
    }
    let mut archs: Vec<ScmpArch> = profile
        .architectures()
        .iter()
        .flatten()
        .map(|a| scmp_arch(*a))
        .filter(|a| *a != ScmpArch::Native)
        .collect();
    archs.push(ScmpArch::native());
    let highest = |arch: ScmpArch| {
        if archs.contains(&arch) {
            highest_syscall(profile, arch)
        } else {
            None
        }
    };
    // (audit arch, highest syscall, highest x32 syscall if x32 is filtered too)
    let mut sections: Vec<(u32, u32, Option<u32>)> = Vec::new();
    match (highest(ScmpArch::X8664), highest(ScmpArch::X32)) {
        (Some(nr), x32) => sections.push((AUDIT_ARCH_X86_64, nr, x32)),
        (None, Some(x32)) => sections.push((AUDIT_ARCH_X86_64, x32, None)),
        (None, None) => {}
    }
    for (arch, audit) in [
        (ScmpArch::X86, AUDIT_ARCH_I386),
        (ScmpArch::Aarch64, AUDIT_ARCH_AARCH64),
        (ScmpArch::Arm, AUDIT_ARCH_ARM),
    ] {
        if let Some(nr) = highest(arch) {
            sections.push((audit, nr, None));
        }
    }
    if sections.is_empty() {
        return Vec::new();
    }
    let length = |x32: &Option<u32>| if x32.is_some() { 5 } else { 3 };
    // Load arch, the sections, "ja filter", "ret ENOSYS", then the filter.
    let total = 1 + sections.iter().map(|s| length(&s.2)).sum::<usize>() + 2;
    let (enosys, filter) = (total - 1, total);
    let mut code: Vec<(u16, u8, u8, u32)> = vec![(LD_ABS_W, 0, 0, DATA_ARCH)];
    // A jump from the instruction at `at` to `to`; the stub is short.
    let jump = |at: usize, to: usize| u8::try_from(to - at - 1).unwrap_or(u8::MAX);
    for (audit, nr, x32) in &sections {
        let start = code.len();
        let next = start + length(x32);
        code.push((JEQ_K, 0, jump(start, next), *audit));
        code.push((LD_ABS_W, 0, 0, DATA_NR));
        match x32 {
            None => {
                let at = start + 2;
                code.push((JGT_K, jump(at, enosys), jump(at, filter), *nr));
            }
            Some(x32) => {
                code.push((JSET_K, 1, 0, X32_SYSCALL_BIT));
                let at = start + 3;
                code.push((JGT_K, jump(at, enosys), jump(at, filter), *nr));
                let at = start + 4;
                code.push((JGT_K, jump(at, enosys), jump(at, filter), *x32));
            }
        }
    }
    code.push((JA, 0, 0, 1));
    code.push((RET_K, 0, 0, RET_ERRNO_ENOSYS));
    let mut bytes = Vec::with_capacity(code.len() * INSTRUCTION);
    for (op, jt, jf, k) in code {
        bytes.extend_from_slice(&op.to_ne_bytes());
        bytes.extend_from_slice(&[jt, jf]);
        bytes.extend_from_slice(&k.to_ne_bytes());
    }
    bytes
}

// ---------------------------------------------------------------------------
// Compiled programs, their file and their cache.

/// What a program was compiled from: the sha256 of the profile's JSON.
pub type ProfileKey = [u8; 32];

/// The key of a profile. A profile read back from `config.json` has the key
/// of the one written there.
pub fn profile_key(profile: &LinuxSeccomp) -> Result<ProfileKey, SeccompError> {
    let json = serde_json::to_vec(profile)
        .map_err(|e| invalid(format!("cannot serialize the profile: {e}")))?;
    Ok(Sha256::digest(&json).into())
}

/// A compiled filter: the BPF program and how to load it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// The profile it was compiled from.
    pub key: ProfileKey,
    /// seccomp(2) flags (SECCOMP_FILTER_FLAG_*).
    pub flags: u32,
    /// `struct sock_filter` entries in host byte order.
    pub bpf: Vec<u8>,
}

impl Program {
    /// Compiles the profile.
    pub fn compile(profile: &LinuxSeccomp) -> Result<Program, SeccompError> {
        Ok(Program {
            key: profile_key(profile)?,
            flags: filter_flags(profile),
            bpf: compile(profile)?,
        })
    }

    pub fn instructions(&self) -> usize {
        self.bpf.len() / INSTRUCTION
    }

    /// The file's content: magic, key, flags, instruction count, program.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PROGRAM_HEADER + self.bpf.len());
        out.extend_from_slice(PROGRAM_MAGIC);
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.flags.to_le_bytes());
        let count = u32::try_from(self.instructions()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&self.bpf);
        out
    }

    /// Parses a file's content; the reason when it is not a whole program.
    pub fn from_bytes(data: &[u8]) -> Result<Program, String> {
        let header = data
            .get(..PROGRAM_HEADER)
            .ok_or_else(|| format!("{} bytes is too short", data.len()))?;
        let (magic, rest) = header.split_at(PROGRAM_MAGIC.len());
        if magic != PROGRAM_MAGIC {
            return Err("not a berth seccomp program".into());
        }
        let (key, rest) = rest.split_at(32);
        let (flags, count) = rest.split_at(4);
        let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let bpf = &data[PROGRAM_HEADER..];
        let count = word(count) as usize;
        if count == 0 || count > MAX_INSTRUCTIONS || bpf.len() != count * INSTRUCTION {
            return Err(format!(
                "{count} instructions announced, {} bytes of program",
                bpf.len()
            ));
        }
        let mut program = Program {
            key: [0; 32],
            flags: word(flags),
            bpf: bpf.to_vec(),
        };
        program.key.copy_from_slice(key);
        Ok(program)
    }

    /// Writes the program to `path`. No temporary file and rename: a reader
    /// takes only a whole program of its own profile ([`program_for`]).
    pub fn write(&self, path: &Path) -> Result<(), SeccompError> {
        std::fs::write(path, self.to_bytes()).map_err(|source| SeccompError::Io {
            what: format!("write {}", path.display()),
            source,
        })
    }

    /// Reads the program at `path`; None if there is no file.
    pub fn read(path: &Path) -> Result<Option<Program>, SeccompError> {
        let data = match std::fs::read(path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SeccompError::Io {
                    what: format!("read {}", path.display()),
                    source,
                });
            }
        };
        Program::from_bytes(&data)
            .map(Some)
            .map_err(|reason| SeccompError::Program {
                path: path.to_path_buf(),
                reason,
            })
    }

    /// Loads the filter into the calling thread; see the module doc for when.
    pub fn install(&self) -> Result<(), SeccompError> {
        install(&self.bpf, self.flags)
    }
}

/// The program for `profile`: the one at `compiled` if that file holds the
/// program of this very profile, else compiled now. The file is only a
/// cache, so a missing, stale or damaged one costs time, never the filter.
pub fn program_for(
    profile: &LinuxSeccomp,
    compiled: Option<&Path>,
) -> Result<Program, SeccompError> {
    let key = profile_key(profile)?;
    if let Some(path) = compiled
        && let Ok(Some(program)) = Program::read(path)
        && program.key == key
    {
        return Ok(program);
    }
    Program::compile(profile)
}

/// berthd's compiled programs, one per distinct profile (in practice one per
/// capability set of RuntimeDefault, plus the Localhost profiles in use).
#[derive(Debug, Default)]
pub struct SeccompCache {
    programs: Mutex<HashMap<ProfileKey, Arc<Program>>>,
}

impl SeccompCache {
    pub fn new() -> SeccompCache {
        SeccompCache::default()
    }

    /// The program of `profile`, compiled on first use. Compiling takes
    /// about a millisecond of CPU: call it off the async workers.
    pub fn get_or_compile(&self, profile: &LinuxSeccomp) -> Result<Arc<Program>, SeccompError> {
        let key = profile_key(profile)?;
        if let Some(program) = self.lock().get(&key) {
            return Ok(Arc::clone(program));
        }
        // Compiled without the lock; a concurrent first use compiles twice
        // and keeps the first.
        let program = Arc::new(Program {
            key,
            flags: filter_flags(profile),
            bpf: compile(profile)?,
        });
        Ok(Arc::clone(self.lock().entry(key).or_insert(program)))
    }

    /// How many programs are cached.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProfileKey, Arc<Program>>> {
        self.programs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

// ---------------------------------------------------------------------------
// Loading.

/// Loads the BPF program (host-order `struct sock_filter` entries) as a
/// seccomp filter of the calling thread, inherited by its children and kept
/// across execve. Needs no_new_privs or CAP_SYS_ADMIN. Allocates only to
/// report an error.
pub fn install(bpf: &[u8], flags: u32) -> Result<(), SeccompError> {
    if bpf.is_empty()
        || !bpf.len().is_multiple_of(INSTRUCTION)
        || bpf.len() / INSTRUCTION > MAX_INSTRUCTIONS
    {
        return Err(SeccompError::Install(format!(
            "{} bytes is not a BPF program",
            bpf.len()
        )));
    }
    let program = libc::sock_fprog {
        // At most MAX_INSTRUCTIONS, checked above.
        len: (bpf.len() / INSTRUCTION) as libc::c_ushort,
        // Only the kernel reads through it (copy_from_user takes any
        // alignment); nothing here dereferences it.
        filter: bpf.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: nix has no seccomp(2). `program` points into `bpf`, whose
    // whole length it names and which outlives the call; the kernel copies
    // the program and keeps no pointer. Nothing allocates before the call,
    // so this may run between fork and exec.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::c_ulong::from(flags),
            &program as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EACCES) => " (needs no_new_privs or CAP_SYS_ADMIN)",
            _ => "",
        };
        return Err(SeccompError::Install(format!("{e}{hint}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn rules_for<'a>(profile: &'a LinuxSeccomp, name: &str) -> Vec<&'a LinuxSyscall> {
        profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.names().iter().any(|n| n == name))
            .collect()
    }

    fn allowed_unconditionally(profile: &LinuxSeccomp, name: &str) -> bool {
        rules_for(profile, name).iter().any(|r| {
            r.action() == LinuxSeccompAction::ScmpActAllow
                && r.args().as_deref().unwrap_or_default().is_empty()
        })
    }

    fn profile_json(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("profile json")
    }

    #[test]
    fn without_sys_admin_clone3_is_enosys_and_namespaces_are_closed() {
        let p = default_profile(&caps(&["CAP_CHOWN", "CAP_SYS_CHROOT"]));
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), None, "EPERM, the default errno");
        let clone3 = rules_for(&p, "clone3");
        assert_eq!(clone3.len(), 1);
        assert_eq!(clone3[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3[0].errno_ret(), Some(libc::ENOSYS as u32));
        let clone = rules_for(&p, "clone");
        assert_eq!(clone.len(), 1);
        let arg = clone[0].args().as_ref().expect("args")[0];
        assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!((arg.index(), arg.value_two()), (0, Some(0)));
        assert_eq!(arg.value(), 0x7e02_0000);
        for name in [
            "mount",
            "unshare",
            "setns",
            "sethostname",
            "keyctl",
            "bpf",
            "reboot",
        ] {
            assert!(!allowed_unconditionally(&p, name), "{name}");
        }
        for name in ["read", "execve", "futex", "rseq", "chroot", "ptrace"] {
            assert!(allowed_unconditionally(&p, name), "{name}");
        }
        if cfg!(target_arch = "x86_64") {
            assert!(allowed_unconditionally(&p, "arch_prctl"));
            assert_eq!(
                p.architectures().as_deref(),
                Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
            );
        }
    }

    #[test]
    fn capabilities_open_their_syscalls() {
        let p = default_profile(&caps(&["CAP_SYS_ADMIN", "SYS_TIME", "cap_bpf"]));
        for name in [
            "clone",
            "clone3",
            "mount",
            "unshare",
            "setns",
            "clock_settime",
            "bpf",
        ] {
            assert!(allowed_unconditionally(&p, name), "{name}");
        }
        assert!(
            rules_for(&p, "clone3")
                .iter()
                .all(|r| r.errno_ret().is_none())
        );
        assert!(!allowed_unconditionally(&p, "chroot"));
        assert!(!allowed_unconditionally(&p, "reboot"));
    }

    #[test]
    fn the_same_capability_set_gives_the_same_profile() {
        let a = default_profile(&caps(&["CAP_KILL", "CAP_SYS_PTRACE", "CAP_CHOWN"]));
        let b = default_profile(&caps(&["SYS_PTRACE", "CAP_CHOWN", "CAP_KILL", "CAP_KILL"]));
        assert_eq!(a, b);
        assert_eq!(profile_key(&a).expect("key"), profile_key(&b).expect("key"));
        let c = default_profile(&caps(&["CAP_KILL"]));
        assert_ne!(profile_key(&a).expect("key"), profile_key(&c).expect("key"));
    }

    #[test]
    fn the_default_profile_compiles_within_the_kernel_limit() {
        let p = default_profile(&caps(&["CAP_CHOWN"]));
        let bpf = compile(&p).expect("compile");
        let n = bpf.len() / INSTRUCTION;
        assert!(n > 100 && n <= MAX_INSTRUCTIONS, "{n} instructions");
        assert_eq!(bpf, compile(&p).expect("compile again"), "deterministic");
        let admin = compile(&default_profile(&caps(&["CAP_SYS_ADMIN"]))).expect("compile");
        assert_ne!(bpf, admin);
    }

    #[test]
    fn the_key_survives_config_json() {
        let p = default_profile(&caps(&["CAP_CHOWN"]));
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/x"},
            "linux": {"seccomp": serde_json::to_value(&p).expect("value")},
        });
        let text = serde_json::to_string_pretty(&spec).expect("json");
        let back: oci_spec::runtime::Spec = serde_json::from_str(&text).expect("spec");
        let back = back
            .linux()
            .as_ref()
            .and_then(|l| l.seccomp().clone())
            .expect("seccomp");
        assert_eq!(
            profile_key(&back).expect("key"),
            profile_key(&p).expect("key")
        );
    }

    #[test]
    fn localhost_profiles_fail_with_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.json");
        let err = load_localhost(&missing).expect_err("missing");
        assert!(matches!(err, SeccompError::ProfileMissing { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("seccomp profile {}: no such file", missing.display())
        );

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"defaultAction\": \"SCMP_ACT_ERRNO\", ").expect("write");
        let err = load_localhost(&bad).expect_err("malformed");
        assert!(
            matches!(err, SeccompError::ProfileMalformed { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("not a valid OCI seccomp profile"),
            "{err}"
        );

        std::fs::write(&bad, r#"{"defaultAction": "SCMP_ACT_SOMETIMES"}"#).expect("write");
        let err = load_localhost(&bad).expect_err("unknown action");
        assert!(err.to_string().contains("SCMP_ACT_SOMETIMES"), "{err}");

        std::fs::write(&bad, r#"{"syscalls": []}"#).expect("write");
        let err = load_localhost(&bad).expect_err("no default action");
        assert!(err.to_string().contains("defaultAction"), "{err}");

        let notify = r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}"#;
        std::fs::write(&bad, notify).expect("write");
        let err = load_localhost(&bad).expect_err("notify");
        assert!(matches!(err, SeccompError::Invalid(_)), "{err}");

        let err = load_localhost(Path::new("profiles/x.json")).expect_err("relative");
        assert!(
            matches!(err, SeccompError::ProfileNotAbsolute { .. }),
            "{err}"
        );

        let good = dir.path().join("good.json");
        let text = r#"{"defaultAction": "SCMP_ACT_ALLOW", "archMap": [],
            "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]}"#;
        std::fs::write(&good, text).expect("write");
        let p = load_localhost(&good).expect("good profile");
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        compile(&p).expect("compile");
    }

    #[test]
    fn impossible_rules_are_refused() {
        let p = profile_json(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#,
        );
        let err = compile(&p).expect_err("index 6");
        assert!(err.to_string().contains("out of range"), "{err}");
        let p = profile_json(r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}"#);
        assert!(compile(&p).is_err());
        let p = profile_json(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [""], "action": "SCMP_ACT_KILL"}]}"#,
        );
        assert!(compile(&p).is_err());
    }

    #[test]
    fn every_oci_action_and_operator_compiles() {
        let p = profile_json(
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"],
                "syscalls": [
                {"names": ["read", "write", "no_such_syscall_berth"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["getpid"], "action": "SCMP_ACT_LOG"},
                {"names": ["kill"], "action": "SCMP_ACT_KILL"},
                {"names": ["tkill"], "action": "SCMP_ACT_KILL_THREAD"},
                {"names": ["tgkill"], "action": "SCMP_ACT_KILL_PROCESS"},
                {"names": ["getppid"], "action": "SCMP_ACT_TRAP"},
                {"names": ["getuid"], "action": "SCMP_ACT_TRACE", "errnoRet": 5},
                {"names": ["getgid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["dup3"], "action": "SCMP_ACT_ALLOW", "args": [
                    {"index": 0, "value": 1, "op": "SCMP_CMP_NE"},
                    {"index": 1, "value": 2, "op": "SCMP_CMP_LT"},
                    {"index": 2, "value": 3, "op": "SCMP_CMP_LE"}]},
                {"names": ["lseek"], "action": "SCMP_ACT_ALLOW", "args": [
                    {"index": 3, "value": 1, "op": "SCMP_CMP_GE"},
                    {"index": 4, "value": 2, "op": "SCMP_CMP_GT"},
                    {"index": 5, "value": 255, "valueTwo": 7, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["fcntl"], "action": "SCMP_ACT_ALLOW", "args": [
                    {"index": 1, "value": 1, "op": "SCMP_CMP_EQ"},
                    {"index": 1, "value": 2, "op": "SCMP_CMP_EQ"}]},
                {"names": ["getpgid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]}"#,
        );
        let program = Program::compile(&p).expect("compile");
        assert_eq!(program.flags, libc::SECCOMP_FILTER_FLAG_LOG as u32);
        assert!(program.instructions() > 10);
    }

    #[test]
    fn repeated_argument_indexes_become_separate_rules() {
        let p = profile_json(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["fcntl"],
                "action": "SCMP_ACT_ERRNO", "args": [
                {"index": 1, "value": 1, "op": "SCMP_CMP_EQ"},
                {"index": 1, "value": 2, "op": "SCMP_CMP_EQ"},
                {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]}]}"#,
        );
        let rule = &p.syscalls().as_ref().expect("rules")[0];
        assert_eq!(conditions(rule).expect("conditions").len(), 3);
        let p = profile_json(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["fcntl"],
                "action": "SCMP_ACT_ERRNO", "args": [
                {"index": 1, "value": 1, "op": "SCMP_CMP_EQ"},
                {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]}]}"#,
        );
        let rule = &p.syscalls().as_ref().expect("rules")[0];
        let groups = conditions(rule).expect("conditions");
        assert_eq!((groups.len(), groups[0].len()), (1, 2));
    }

    #[test]
    fn program_files_round_trip_and_reject_damage() {
        let p = default_profile(&caps(&["CAP_CHOWN"]));
        let program = Program::compile(&p).expect("compile");
        let bytes = program.to_bytes();
        assert_eq!(Program::from_bytes(&bytes), Ok(program.clone()));
        assert!(Program::from_bytes(&bytes[..bytes.len() - 3]).is_err());
        assert!(Program::from_bytes(&bytes[..20]).is_err());
        let mut wrong = bytes.clone();
        wrong[0] ^= 1;
        assert!(Program::from_bytes(&wrong).is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(PROGRAM_FILE);
        assert_eq!(Program::read(&path).expect("absent"), None);
        program.write(&path).expect("write");
        assert_eq!(Program::read(&path).expect("read"), Some(program.clone()));
        std::fs::write(&path, &bytes[..100]).expect("damage");
        assert!(matches!(
            Program::read(&path),
            Err(SeccompError::Program { .. })
        ));
    }

    #[test]
    fn a_program_file_is_used_only_for_its_own_profile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(PROGRAM_FILE);
        let p = default_profile(&caps(&["CAP_CHOWN"]));
        let real = Program::compile(&p).expect("compile");
        // A marked program under the right key is taken as it is.
        let marked = Program {
            bpf: vec![6, 0, 0, 0, 0, 0, 0xff, 0x7f],
            ..real.clone()
        };
        marked.write(&path).expect("write");
        assert_eq!(program_for(&p, Some(&path)).expect("program"), marked);
        // Another profile's program, a damaged file, no file: compiled.
        let other = Program::compile(&default_profile(&caps(&["CAP_SYS_ADMIN"]))).expect("c");
        other.write(&path).expect("write");
        assert_eq!(program_for(&p, Some(&path)).expect("program"), real);
        std::fs::write(&path, b"berthsc1").expect("damage");
        assert_eq!(program_for(&p, Some(&path)).expect("program"), real);
        assert_eq!(program_for(&p, None).expect("program"), real);
    }

    #[test]
    fn the_cache_compiles_each_profile_once() {
        let cache = SeccompCache::new();
        let a = default_profile(&caps(&["CAP_CHOWN", "CAP_KILL"]));
        let first = cache.get_or_compile(&a).expect("compile");
        let again = cache
            .get_or_compile(&default_profile(&caps(&["CAP_KILL", "CAP_CHOWN"])))
            .expect("cached");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(cache.len(), 1);
        let b = cache
            .get_or_compile(&default_profile(&caps(&["CAP_SYS_ADMIN"])))
            .expect("compile");
        assert!(!Arc::ptr_eq(&first, &b));
        assert_eq!(cache.len(), 2);
        assert_eq!(*first, Program::compile(&a).expect("compile"));
    }

    fn decode(bytes: &[u8]) -> Vec<(u16, u8, u8, u32)> {
        bytes
            .chunks_exact(INSTRUCTION)
            .map(|c| {
                (
                    u16::from_ne_bytes([c[0], c[1]]),
                    c[2],
                    c[3],
                    u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn newer_syscalls_than_the_profile_get_enosys() {
        let p = default_profile(&caps(&["CAP_CHOWN"]));
        let errno = ScmpAction::Errno(libc::EPERM);
        let stub = decode(&enosys_stub(&p, errno));
        // arch; x86_64 with x32 (5); i386 (3); ja; ret.
        assert_eq!(stub.len(), 1 + 5 + 3 + 2, "{stub:?}");
        assert_eq!(stub[0], (LD_ABS_W, 0, 0, DATA_ARCH));
        assert_eq!(stub[1], (JEQ_K, 0, 4, AUDIT_ARCH_X86_64));
        assert_eq!(stub[3], (JSET_K, 1, 0, X32_SYSCALL_BIT));
        let x86_64 = highest_syscall(&p, ScmpArch::X8664).expect("x86_64");
        assert!(x86_64 >= 435, "{x86_64}");
        // From the JGT at 4: ENOSYS is at 10, the filter at 11.
        assert_eq!(stub[4], (JGT_K, 5, 6, x86_64));
        assert!(stub[5].3 > X32_SYSCALL_BIT);
        assert_eq!(stub[6], (JEQ_K, 0, 2, AUDIT_ARCH_I386));
        assert_eq!(stub[9], (JA, 0, 0, 1));
        assert_eq!(stub[10], (RET_K, 0, 0, RET_ERRNO_ENOSYS));
        let program = compile(&p).expect("compile");
        assert_eq!(decode(&program)[..stub.len()], stub[..]);

        let allow = profile_json(
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_ERRNO"}]}"#,
        );
        assert!(enosys_stub(&allow, ScmpAction::Allow).is_empty());
        let native_only = profile_json(
            r#"{"defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]}"#,
        );
        let stub = decode(&enosys_stub(&native_only, errno));
        assert_eq!(stub.len(), 1 + 3 + 2);
        assert_eq!(stub[3], (JGT_K, 1, 2, libc::SYS_write as u32));
    }

    #[test]
    fn install_refuses_what_is_no_program() {
        assert!(install(&[], 0).is_err());
        assert!(install(&[0; 12], 0).is_err());
    }
}
