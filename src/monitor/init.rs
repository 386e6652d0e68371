//! The container init: the monitor's child that enters the container's
//! namespaces, builds its filesystem, takes on its process settings, reports
//! "created", waits for start and execs. Its steps, top to bottom, are the
//! list in [`create_and_exec`]; security profiles (seccomp, AppArmor,
//! SELinux) go into [`apply_security`], right before exec. Seccomp is the
//! exception when no_new_privs is off: loading a filter then needs
//! CAP_SYS_ADMIN, so it is loaded before the uid change and the capability
//! drop, as runc does (see `runtime::seccomp`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::{Mode, umask};
use nix::unistd::{ForkResult, dup2_stderr, dup2_stdin, dup2_stdout, fork, setsid};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::sync::{FromInit, FromMonitor, SyncSocket};
use super::{MonitorConfig, Step, StepError, process, rootfs};
use crate::runtime::seccomp::{self, Program};

/// The init's standard streams as the monitor made them: pipe ends or
/// /dev/null (with a terminal, /dev/null until the pty exists).
#[derive(Debug)]
pub(crate) struct InitStdio {
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
}

/// How the init ends when it does not exec.
enum Failure {
    Setup(StepError),
    Exec(String),
    /// The monitor went away; nobody to report to.
    MonitorGone,
}

impl From<StepError> for Failure {
    fn from(e: StepError) -> Failure {
        Failure::Setup(e)
    }
}

/// Runs in the forked child; never returns.
pub(crate) fn run(spec: &Spec, config: &MonitorConfig, sync: SyncSocket, stdio: InitStdio) -> ! {
    let code = match create_and_exec(spec, config, &sync, stdio) {
        Err(Failure::Setup(e)) => {
            let _ = sync.send_to_monitor(&FromInit::SetupError(e.to_string()));
            1
        }
        Err(Failure::Exec(message)) => {
            let _ = sync.send_to_monitor(&FromInit::ExecError(message));
            super::START_ERROR_EXIT_CODE
        }
        Err(Failure::MonitorGone) => 1,
        Ok(never) => match never {},
    };
    std::process::exit(code)
}

fn create_and_exec(
    spec: &Spec,
    config: &MonitorConfig,
    sync: &SyncSocket,
    stdio: InitStdio,
) -> Result<std::convert::Infallible, Failure> {
    // Device nodes and files get exactly the modes asked for.
    umask(Mode::empty());
    process::unblock_signals()?;
    let default_process = oci_spec::runtime::Process::default();
    let process = spec.process().as_ref().unwrap_or(&default_process);
    let tty = process.terminal() == Some(true);
    if tty != config.tty {
        return Err(
            StepError::msg("spec", "process.terminal and monitor.json tty disagree").into(),
        );
    }
    // The monitor has put us into the container's cgroups.
    match sync.recv_from_monitor()? {
        Some(FromMonitor::Proceed) => {}
        _ => return Err(Failure::MonitorGone),
    }
    set_stdio(stdio)?;
    setsid().step(|| "setsid".into())?;
    // While the bundle is still in sight: berth's bundle holds the rootfs.
    let compiled = spec.root().as_ref().and_then(|r| r.path().parent());
    let seccomp = seccomp_program(spec, compiled)?;
    // Host root still: in a user namespace raising a hard limit is refused,
    // and /proc/self/oom_score_adj belongs to an unmapped root.
    process::set_rlimits(process)?;
    process::set_oom_score_adj(process.oom_score_adj())?;
    let userns = user_namespace(spec)?;
    let idmapped = match &userns {
        Some(ns) => rootfs::idmapped_sources(spec, ns.as_fd())?,
        None => Vec::new(),
    };
    let in_userns = userns.is_some();
    let owns_uts = enter_namespaces(spec, userns)?;
    if in_userns && pid_namespace(spec) == Some(None) {
        become_pid1(sync)?;
    }
    let root = rootfs::root_path(spec)?;
    rootfs::prepare(spec, &root, &super::cgroup_dirs(config), idmapped)?;
    rootfs::pivot(&root)?;
    if tty {
        open_terminal(sync)?;
    }
    rootfs::finalize(spec)?;
    if owns_uts && let Some(hostname) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(hostname).step(|| format!("sethostname {hostname}"))?;
    }
    rootfs::write_sysctls(spec)?;
    rootfs::readonly_paths(spec)?;
    rootfs::masked_paths(spec)?;
    process::set_no_new_privs(process)?;
    let seccomp_last = process.no_new_privileges() == Some(true);
    if !seccomp_last {
        load_seccomp(seccomp.as_ref())?;
    }
    process::set_identity(process)?;
    process::chdir(process)?;
    process::set_umask(process);
    process::cloexec_above_stdio()?;
    sync.send_to_monitor(&FromInit::Ready)?;
    match sync.recv_from_monitor()? {
        Some(FromMonitor::Start) => {}
        _ => return Err(Failure::MonitorGone),
    }
    // Past Start a failure is the start's: kubelet shows it as StartError.
    apply_security(spec, seccomp.as_ref().filter(|_| seccomp_last))
        .map_err(|e| Failure::Exec(e.to_string()))?;
    let args = process.args().as_deref().unwrap_or_default();
    let env = process.env().as_deref().unwrap_or_default();
    Err(Failure::Exec(process::exec(args, env)))
}

fn set_stdio(stdio: InitStdio) -> Result<(), StepError> {
    dup2_stdin(&stdio.stdin).step(|| "set stdin".into())?;
    dup2_stdout(&stdio.stdout).step(|| "set stdout".into())?;
    dup2_stderr(&stdio.stderr).step(|| "set stderr".into())?;
    Ok(())
}

fn clone_flag(typ: LinuxNamespaceType) -> CloneFlags {
    match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

/// The spec's pid namespace: Some(Some(path)) to join, Some(None) for a new
/// one, None to stay in the monitor's.
fn pid_namespace(spec: &Spec) -> Option<Option<PathBuf>> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Pid)
        .map(|ns| ns.path().clone())
}

/// The user namespace the spec joins, by path: berth's pods pin theirs.
fn user_namespace_path(spec: &Spec) -> Result<Option<PathBuf>, StepError> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or_default();
    match namespaces
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::User)
    {
        None => Ok(None),
        Some(ns) => match ns.path() {
            Some(path) => Ok(Some(path.clone())),
            None => Err(StepError::msg(
                "spec namespaces",
                "a new user namespace per container is not supported; join the pod's by path",
            )),
        },
    }
}

/// The spec's user namespace, opened.
fn user_namespace(spec: &Spec) -> Result<Option<File>, StepError> {
    user_namespace_path(spec)?
        .map(|path| File::open(&path).step(|| format!("open user namespace {}", path.display())))
        .transpose()
}

/// Run by the monitor right before it forks the init: the child is born in
/// the container's pid namespace (as its PID 1 when the namespace is new).
pub(crate) fn enter_pid_namespace(spec: &Spec) -> Result<(), StepError> {
    match pid_namespace(spec) {
        None => Ok(()),
        // Made by the init inside the user namespace: see [`become_pid1`].
        Some(None) if user_namespace_path(spec)?.is_some() => Ok(()),
        Some(None) => unshare(CloneFlags::CLONE_NEWPID).step(|| "unshare the pid namespace".into()),
        Some(Some(path)) => {
            let file =
                File::open(&path).step(|| format!("open pid namespace {}", path.display()))?;
            setns(file.as_fd(), CloneFlags::CLONE_NEWPID)
                .step(|| format!("join pid namespace {}", path.display()))
        }
    }
}

/// A new pid namespace for a container in a user namespace must be made
/// inside it (else its /proc cannot be mounted), so by the init, not by the
/// host-root monitor: the init unshares it and forks its PID 1, which goes
/// on as the init; this process reports the new pid and exits, and the
/// monitor, a subreaper, inherits the new init.
fn become_pid1(sync: &SyncSocket) -> Result<(), Failure> {
    unshare(CloneFlags::CLONE_NEWPID).step(|| "unshare the pid namespace".into())?;
    // SAFETY: the init has a single thread; the child goes on with the setup.
    match unsafe { fork() }.step(|| "fork the container's PID 1".into())? {
        // Its own session, as the first init had: a terminal needs that.
        ForkResult::Child => Ok(setsid().map(drop).step(|| "setsid".into())?),
        ForkResult::Parent { child } => {
            let code = match sync.send_to_monitor(&FromInit::Pid(child.as_raw())) {
                Ok(()) => 0,
                Err(_) => {
                    let _ = kill(child, Signal::SIGKILL);
                    1
                }
            };
            std::process::exit(code)
        }
    }
}

/// Joins the user namespace (`userns`, first: it owns the others) and
/// becomes its root, joins the namespaces the spec names by path, then
/// unshares the new ones (always a new mount namespace). Returns whether the
/// UTS namespace is the container's own (then its hostname is set).
fn enter_namespaces(spec: &Spec, userns: Option<File>) -> Result<bool, StepError> {
    if let Some(ns) = userns {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWUSER).step(|| "join the user namespace".into())?;
        process::become_userns_root()?;
    }
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or_default();
    let mut joins = Vec::new();
    let mut new = CloneFlags::CLONE_NEWNS;
    let mut owns_uts = false;
    for ns in namespaces {
        let typ = ns.typ();
        match (typ, ns.path()) {
            // The monitor placed us already; the user namespace is joined.
            (LinuxNamespaceType::Pid, _) | (LinuxNamespaceType::User, Some(_)) => {}
            (LinuxNamespaceType::User | LinuxNamespaceType::Time, _) => {
                return Err(StepError::msg(
                    "spec namespaces",
                    format!("{typ} namespaces are not supported yet"),
                ));
            }
            (LinuxNamespaceType::Mount, Some(path)) => {
                return Err(StepError::msg(
                    "spec namespaces",
                    format!(
                        "joining mount namespace {} is not supported",
                        path.display()
                    ),
                ));
            }
            (_, Some(path)) => {
                let file =
                    File::open(path).step(|| format!("open {typ} namespace {}", path.display()))?;
                joins.push((file, typ, path));
            }
            (_, None) => {
                owns_uts |= typ == LinuxNamespaceType::Uts;
                new |= clone_flag(typ);
            }
        }
    }
    for (file, typ, path) in &joins {
        setns(file.as_fd(), clone_flag(*typ))
            .step(|| format!("join {typ} namespace {}", path.display()))?;
    }
    unshare(new).step(|| format!("unshare {new:?}"))?;
    Ok(owns_uts)
}

/// A pty from the container's own devpts: the master goes to the monitor,
/// the slave becomes /dev/console, the controlling terminal and stdio.
fn open_terminal(sync: &SyncSocket) -> Result<(), StepError> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .step(|| "open /dev/ptmx".into())?;
    grantpt(&master).step(|| "grantpt".into())?;
    unlockpt(&master).step(|| "unlockpt".into())?;
    let name = ptsname_r(&master).step(|| "ptsname".into())?;
    let slave = nix::fcntl::open(
        Path::new(&name),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .step(|| format!("open {name}"))?;
    sync.send_to_monitor(&FromInit::Pty(OwnedFd::from(master)))?;
    rootfs::mount_console(Path::new(&name))?;
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal) and no pointers.
    let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .step(|| "make the pty the controlling terminal".into());
    }
    set_stdio(InitStdio {
        stdin: slave.try_clone().step(|| "dup the pty".into())?,
        stdout: slave.try_clone().step(|| "dup the pty".into())?,
        stderr: slave,
    })
}

/// Security profiles, applied as late as possible before exec: the seccomp
/// filter when no_new_privs is on (else it is loaded already); AppArmor
/// (process.apparmorProfile) and SELinux (process.selinuxLabel) come here in
/// a later change and are ignored until then.
fn apply_security(_spec: &Spec, seccomp: Option<&Program>) -> Result<(), StepError> {
    load_seccomp(seccomp)
}

/// The spec's seccomp filter, if it has `linux.seccomp`: the program berthd
/// compiled into `bundle` if it is this profile's, else compiled now.
pub(super) fn seccomp_program(
    spec: &Spec,
    bundle: Option<&Path>,
) -> Result<Option<Program>, StepError> {
    let Some(profile) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) else {
        return Ok(None);
    };
    let compiled = bundle.map(|dir| dir.join(seccomp::PROGRAM_FILE));
    seccomp::program_for(profile, compiled.as_deref())
        .map(Some)
        .map_err(std::io::Error::other)
        .step(|| "linux.seccomp".into())
}

/// Loads the seccomp filter into this process (inherited across exec).
pub(super) fn load_seccomp(program: Option<&Program>) -> Result<(), StepError> {
    match program {
        Some(program) => program
            .install()
            .map_err(std::io::Error::other)
            .step(|| "linux.seccomp".into()),
        None => Ok(()),
    }
}
