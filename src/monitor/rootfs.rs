//! The container's filesystem, built by the init in its new mount namespace:
//! root propagation, the spec's mounts in order under the (already mounted)
//! root, /dev with its nodes and links, pivot_root, then read-only root,
//! read-only and masked paths. Destinations are resolved inside the root, so
//! a symlink in the image never sends a mount out to the host.

use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{Gid, Uid, chown, fchdir, pivot_root};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::{Step, StepError};

/// Parsed fstab-style options of one mount.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MountOptions {
    pub(crate) flags: MsFlags,
    /// Propagation changes, applied one by one after the mount.
    pub(crate) propagation: Vec<MsFlags>,
    /// Options the filesystem gets as data, e.g. "mode=755,size=65536k".
    pub(crate) data: String,
    /// `rro`: read-only through every submount (mount_setattr, AT_RECURSIVE).
    pub(crate) recursive_readonly: bool,
    /// `idmap`: owners seen through the container's user namespace.
    pub(crate) idmap: bool,
}

impl MountOptions {
    fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }
}

/// Parses mount options the way runc does: flags set or cleared, propagation
/// kinds, and everything else passed on as data.
pub(crate) fn parse_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: String::new(),
        recursive_readonly: false,
        idmap: false,
    };
    let mut data = Vec::new();
    for option in options {
        let (clear, flag) = match option.as_str() {
            "defaults" => continue,
            "ro" => (false, MsFlags::MS_RDONLY),
            "rw" => (true, MsFlags::MS_RDONLY),
            "bind" => (false, MsFlags::MS_BIND),
            "rbind" => (false, MsFlags::MS_BIND | MsFlags::MS_REC),
            "nosuid" => (false, MsFlags::MS_NOSUID),
            "suid" => (true, MsFlags::MS_NOSUID),
            "nodev" => (false, MsFlags::MS_NODEV),
            "dev" => (true, MsFlags::MS_NODEV),
            "noexec" => (false, MsFlags::MS_NOEXEC),
            "exec" => (true, MsFlags::MS_NOEXEC),
            "sync" => (false, MsFlags::MS_SYNCHRONOUS),
            "async" => (true, MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (false, MsFlags::MS_DIRSYNC),
            "remount" => (false, MsFlags::MS_REMOUNT),
            "mand" => (false, MsFlags::MS_MANDLOCK),
            "nomand" => (true, MsFlags::MS_MANDLOCK),
            "atime" => (true, MsFlags::MS_NOATIME),
            "noatime" => (false, MsFlags::MS_NOATIME),
            "diratime" => (true, MsFlags::MS_NODIRATIME),
            "nodiratime" => (false, MsFlags::MS_NODIRATIME),
            "relatime" => (false, MsFlags::MS_RELATIME),
            "norelatime" => (true, MsFlags::MS_RELATIME),
            "strictatime" => (false, MsFlags::MS_STRICTATIME),
            "nostrictatime" => (true, MsFlags::MS_STRICTATIME),
            "acl" => (false, MsFlags::MS_POSIXACL),
            "noacl" => (true, MsFlags::MS_POSIXACL),
            // runc extensions without a kernel flag that berth does not do.
            "tmpcopyup" | "ridmap" => continue,
            "idmap" => {
                out.idmap = true;
                continue;
            }
            "rro" => {
                out.recursive_readonly = true;
                continue;
            }
            other => {
                if let Some(p) = propagation(other) {
                    out.propagation.push(p);
                } else {
                    data.push(other);
                }
                continue;
            }
        };
        if clear {
            out.flags.remove(flag);
        } else {
            out.flags.insert(flag);
        }
    }
    out.data = data.join(",");
    out
}

fn propagation(name: &str) -> Option<MsFlags> {
    Some(match name {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

/// Resolves `path` as if `root` were "/": symlinks (absolute or relative)
/// and ".." never leave `root`. Missing components are kept as they are.
pub(crate) fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, StepError> {
    let mut resolved = PathBuf::new();
    // Components still to walk, last first.
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, path);
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = root.join(&resolved).join(&name);
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 255 {
                    return Err(StepError::msg(
                        format!("resolve {} in {}", path.display(), root.display()),
                        "too many levels of symbolic links",
                    ));
                }
                let target = fs::read_link(&candidate)
                    .step(|| format!("read link {}", candidate.display()))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                push_components(&mut pending, &target);
            }
            _ => resolved.push(&name),
        }
    }
    Ok(root.join(resolved))
}

fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::Normal(name) => pending.push(name.to_os_string()),
            Component::ParentDir => pending.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

fn mount_at(
    source: Option<&OsStr>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), StepError> {
    let data = data.filter(|d| !d.is_empty());
    mount(source, target, fstype, flags, data).step(|| {
        format!(
            "mount {} on {} (type {}, flags {flags:?}, data {:?})",
            source.map_or("none".into(), |s| s.to_string_lossy()),
            target.display(),
            fstype.unwrap_or("none"),
            data.unwrap_or("")
        )
    })
}

/// nosuid, nodev, noexec of the mount holding `path`: kept on a remount, so
/// a read-only bind never loosens its source's restrictions.
fn kept_flags(path: &Path) -> Result<MsFlags, StepError> {
    let st = statvfs(path).step(|| format!("statvfs {}", path.display()))?;
    let mut flags = MsFlags::empty();
    for (st_flag, ms_flag) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if st.flags().contains(st_flag) {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

/// Flags of a bind mount that only a remount can apply.
fn remount_flags(flags: MsFlags) -> MsFlags {
    flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT)
}

fn create_dir_all(path: &Path) -> Result<(), StepError> {
    fs::create_dir_all(path).step(|| format!("create {}", path.display()))
}

/// Creates an empty file at `path` (and its directory) unless something is there.
fn create_file(path: &Path) -> Result<(), StepError> {
    if let Some(dir) = path.parent() {
        create_dir_all(dir)?;
    }
    if fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(drop)
        .step(|| format!("create {}", path.display()))
}

/// The root propagation the spec asks for, rslave by default.
fn root_propagation(spec: &Spec) -> Result<Option<MsFlags>, StepError> {
    match spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().as_deref())
    {
        None | Some("") => Ok(None),
        Some(name) => propagation(name).map(Some).ok_or_else(|| {
            StepError::msg("linux.rootfsPropagation", format!("unknown value {name:?}"))
        }),
    }
}

/// The root directory of the spec, made absolute.
pub(crate) fn root_path(spec: &Spec) -> Result<PathBuf, StepError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| StepError::msg("spec", "root is missing"))?;
    if !root.path().is_absolute() {
        return Err(StepError::msg(
            "spec",
            format!("root.path {} is not absolute", root.path().display()),
        ));
    }
    fs::canonicalize(root.path()).step(|| format!("root {}", root.path().display()))
}

/// Id-mapped copies of the spec's `idmap` bind sources, by mount index,
/// mapped through `userns`. Cut while the init is still host root in the
/// host's mounts: only that may id-map a host filesystem.
pub(crate) fn idmapped_sources(
    spec: &Spec,
    userns: BorrowedFd<'_>,
) -> Result<Vec<Option<OwnedFd>>, StepError> {
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    mounts
        .iter()
        .map(|m| {
            let options = parse_options(m.options().as_deref().unwrap_or_default());
            let (true, Some(source)) = (options.idmap, m.source()) else {
                return Ok(None);
            };
            let recursive = options.flags.contains(MsFlags::MS_REC);
            crate::runtime::userns::idmapped_tree(source, recursive, userns)
                .map(Some)
                .step(|| format!("id-map {}", source.display()))
        })
        .collect()
}

/// Everything before pivot_root, in the init's new mount namespace.
/// `idmapped` holds [`idmapped_sources`] (none without a user namespace).
pub(crate) fn prepare(
    spec: &Spec,
    root: &Path,
    cgroup_dirs: &[PathBuf],
    mut idmapped: Vec<Option<OwnedFd>>,
) -> Result<(), StepError> {
    // Nothing mounted from here on may reach the host.
    let flags = root_propagation(spec)?.unwrap_or(MsFlags::MS_SLAVE | MsFlags::MS_REC);
    mount_at(None, Path::new("/"), None, flags, None)?;
    make_parent_private(root)?;
    // pivot_root needs the new root to be a mount point.
    mount_at(
        Some(root.as_os_str()),
        root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    idmapped.resize_with(mounts.len(), || None);
    for (m, tree) in mounts.iter().zip(idmapped) {
        mount_entry(root, m, cgroup_dirs, tree)?;
    }
    if dev_needs_setup(mounts) {
        let devices = spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_deref())
            .unwrap_or_default();
        create_devices(root, devices)?;
        create_dev_links(root)?;
    }
    if let Some(process) = spec.process() {
        let cwd = resolve_in_root(root, process.cwd())?;
        create_dir_all(&cwd)?;
    }
    Ok(())
}

/// pivot_root requires the new root's parent mount not to be shared.
fn make_parent_private(root: &Path) -> Result<(), StepError> {
    let info = fs::read_to_string("/proc/self/mountinfo").step(|| "read mountinfo".into())?;
    let Some((mount_point, shared)) = parent_mount(&info, root) else {
        return Ok(());
    };
    if shared {
        mount_at(None, &mount_point, None, MsFlags::MS_PRIVATE, None)?;
    }
    Ok(())
}

/// The mount holding `path` (the longest mount point above it, the last one
/// mounted if stacked) and whether it is shared.
fn parent_mount(mountinfo: &str, path: &Path) -> Option<(PathBuf, bool)> {
    let mut best: Option<(PathBuf, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mount_point) = fields.get(4).map(|m| unescape_mountinfo(m)) else {
            continue;
        };
        if !path.starts_with(&mount_point) {
            continue;
        }
        let shared = fields
            .iter()
            .skip(6)
            .take_while(|f| **f != "-")
            .any(|f| f.starts_with("shared:"));
        let longer = best
            .as_ref()
            .is_none_or(|(b, _)| mount_point.as_os_str().len() >= b.as_os_str().len());
        if longer {
            best = Some((mount_point, shared));
        }
    }
    best
}

/// Undoes mountinfo's octal escapes (\040 for a space, ...).
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

fn mount_entry(
    root: &Path,
    m: &Mount,
    cgroup_dirs: &[PathBuf],
    idmapped: Option<OwnedFd>,
) -> Result<(), StepError> {
    let destination = m.destination();
    if !destination.is_absolute() {
        return Err(StepError::msg(
            "spec mounts",
            format!("destination {} is not absolute", destination.display()),
        ));
    }
    let options = parse_options(m.options().as_deref().unwrap_or_default());
    let typ = m.typ().as_deref().unwrap_or("");
    let dest = resolve_in_root(root, destination)?;
    if typ == "bind" || options.is_bind() {
        bind_mount(m, &dest, &options, idmapped)?;
    } else if typ == "cgroup" || typ == "cgroup2" {
        mount_cgroup(&dest, &options, cgroup_dirs)?;
    } else {
        create_dir_all(&dest)?;
        let source = m
            .source()
            .as_ref()
            .map_or_else(|| OsStr::new(typ), |s| s.as_os_str());
        mount_at(
            Some(source),
            &dest,
            Some(typ),
            options.flags,
            Some(&options.data),
        )?;
    }
    for p in &options.propagation {
        mount_at(None, &dest, None, *p, None)?;
    }
    Ok(())
}

fn bind_mount(
    m: &Mount,
    dest: &Path,
    options: &MountOptions,
    idmapped: Option<OwnedFd>,
) -> Result<(), StepError> {
    let source = m.source().as_ref().ok_or_else(|| {
        StepError::msg(
            format!("bind mount on {}", m.destination().display()),
            "no source",
        )
    })?;
    let meta = fs::metadata(source).step(|| format!("bind source {}", source.display()))?;
    if meta.is_dir() {
        create_dir_all(dest)?;
    } else {
        create_file(dest)?;
    }
    match (idmapped, options.idmap) {
        (Some(tree), _) => crate::runtime::userns::attach(&tree, dest)
            .step(|| format!("mount id-mapped {} on {}", source.display(), dest.display()))?,
        (None, true) => {
            return Err(StepError::msg(
                format!("bind mount on {}", m.destination().display()),
                "idmap needs the container's user namespace",
            ));
        }
        (None, false) => mount_at(
            Some(source.as_os_str()),
            dest,
            None,
            options.flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
            None,
        )?,
    }
    let extra = remount_flags(options.flags);
    if !extra.is_empty() {
        let flags = extra | kept_flags(dest)? | MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
        mount_at(None, dest, None, flags, None)?;
    }
    if options.recursive_readonly {
        recursive_readonly(dest)?;
    }
    Ok(())
}

/// Makes the mount at `dest` and every mount below it read-only.
fn recursive_readonly(dest: &Path) -> Result<(), StepError> {
    let path = std::ffi::CString::new(dest.as_os_str().as_encoded_bytes())
        .map_err(|_| StepError::msg(format!("rro {}", dest.display()), "path has a NUL byte"))?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: nix lacks mount_setattr; path is a valid C string and attr a
    // valid mount_attr of the size passed, both living across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .step(|| format!("make {} recursively read-only", dest.display()));
    }
    Ok(())
}

/// The container's own cgroups at the cgroup mount: for v1 a tmpfs with a
/// read-only (as asked) bind of each controller's container directory, plus
/// links for combined controllers ("cpu" -> "cpu,cpuacct"); for v2 a bind of
/// the container's directory. With no cgroups named, v2 mounts the cgroup2
/// filesystem and v1 leaves the tmpfs empty.
fn mount_cgroup(
    dest: &Path,
    options: &MountOptions,
    cgroup_dirs: &[PathBuf],
) -> Result<(), StepError> {
    create_dir_all(dest)?;
    let restrict = options.flags
        & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY);
    let host = Path::new("/sys/fs/cgroup");
    let v2 = statfs(host).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC);
    if v2 {
        return match cgroup_dirs.first() {
            Some(dir) => bind_restricted(dir, dest, restrict),
            None => mount_at(
                Some(OsStr::new("cgroup2")),
                dest,
                Some("cgroup2"),
                restrict,
                None,
            ),
        };
    }
    mount_at(
        Some(OsStr::new("tmpfs")),
        dest,
        Some("tmpfs"),
        restrict - MsFlags::MS_RDONLY,
        Some("mode=755"),
    )?;
    for dir in cgroup_dirs {
        let Some(Component::Normal(controller)) = dir
            .strip_prefix(host)
            .ok()
            .and_then(|rel| rel.components().next())
        else {
            continue;
        };
        let target = dest.join(controller);
        create_dir_all(&target)?;
        bind_restricted(dir, &target, restrict)?;
        let name = controller.to_string_lossy();
        if name.contains(',') {
            for part in name.split(',') {
                let link = dest.join(part);
                if fs::symlink_metadata(&link).is_err() {
                    symlink(controller, &link).step(|| format!("link {}", link.display()))?;
                }
            }
        }
    }
    if restrict.contains(MsFlags::MS_RDONLY) {
        mount_at(None, dest, None, restrict | MsFlags::MS_REMOUNT, None)?;
    }
    Ok(())
}

fn bind_restricted(source: &Path, dest: &Path, restrict: MsFlags) -> Result<(), StepError> {
    mount_at(
        Some(source.as_os_str()),
        dest,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    if !restrict.is_empty() {
        let flags = restrict | kept_flags(dest)? | MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
        mount_at(None, dest, None, flags, None)?;
    }
    Ok(())
}

/// /dev gets its nodes unless the spec binds a /dev from elsewhere.
fn dev_needs_setup(mounts: &[Mount]) -> bool {
    !mounts.iter().any(|m| {
        m.destination() == Path::new("/dev")
            && (m.typ().as_deref() == Some("bind")
                || parse_options(m.options().as_deref().unwrap_or_default()).is_bind())
    })
}

/// A device node to create: the spec's, or one of those every container has.
struct DeviceNode {
    path: PathBuf,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// /dev/null, zero, full, random, urandom and tty, which the OCI spec says
/// the runtime supplies.
fn default_devices() -> Vec<DeviceNode> {
    [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
    .into_iter()
    .map(|(path, major, minor)| DeviceNode {
        path: PathBuf::from(path),
        kind: SFlag::S_IFCHR,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

fn spec_device(d: &LinuxDevice) -> Result<DeviceNode, StepError> {
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(StepError::msg(
                format!("device {}", d.path().display()),
                "type \"a\" is no device node",
            ));
        }
    };
    let number = |n: i64| {
        u64::try_from(n).map_err(|_| {
            StepError::msg(
                format!("device {}", d.path().display()),
                "negative device number",
            )
        })
    };
    Ok(DeviceNode {
        path: d.path().clone(),
        kind,
        major: number(d.major())?,
        minor: number(d.minor())?,
        mode: d.file_mode().unwrap_or(0o666),
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

fn create_devices(root: &Path, spec_devices: &[LinuxDevice]) -> Result<(), StepError> {
    let mut nodes: Vec<DeviceNode> = default_devices()
        .into_iter()
        .filter(|d| !spec_devices.iter().any(|s| s.path() == &d.path))
        .collect();
    for d in spec_devices {
        nodes.push(spec_device(d)?);
    }
    for node in &nodes {
        create_device(root, node)?;
    }
    Ok(())
}

fn create_device(root: &Path, node: &DeviceNode) -> Result<(), StepError> {
    let dest = resolve_in_root(root, &node.path)?;
    if let Some(dir) = dest.parent() {
        create_dir_all(dir)?;
    }
    if fs::symlink_metadata(&dest).is_ok_and(|m| !m.is_dir()) {
        fs::remove_file(&dest).step(|| format!("replace {}", dest.display()))?;
    }
    let mode = Mode::from_bits_truncate((node.mode & 0o7777) as libc::mode_t);
    match mknod(&dest, node.kind, mode, makedev(node.major, node.minor)) {
        Ok(()) => {}
        // Not allowed to make nodes here: bind the host's instead.
        Err(Errno::EPERM) => {
            create_file(&dest)?;
            mount_at(
                Some(node.path.as_os_str()),
                &dest,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
            return Ok(());
        }
        Err(e) => return Err(e).step(|| format!("mknod {}", dest.display())),
    }
    chown(
        &dest,
        Some(Uid::from_raw(node.uid)),
        Some(Gid::from_raw(node.gid)),
    )
    .step(|| format!("chown {}", dest.display()))
}

/// /dev/ptmx to the container's own devpts instance, and the usual /dev links.
fn create_dev_links(root: &Path) -> Result<(), StepError> {
    let dev = resolve_in_root(root, Path::new("/dev"))?;
    let ptmx = dev.join("ptmx");
    if fs::symlink_metadata(&ptmx).is_ok() {
        fs::remove_file(&ptmx).step(|| format!("replace {}", ptmx.display()))?;
    }
    symlink("pts/ptmx", &ptmx).step(|| format!("link {}", ptmx.display()))?;
    let mut links = vec![
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ];
    if Path::new("/proc/kcore").exists() {
        links.push(("/proc/kcore", "core"));
    }
    for (target, name) in links {
        let link = dev.join(name);
        match symlink(target, &link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).step(|| format!("link {}", link.display())),
        }
    }
    Ok(())
}

/// Makes `root` the process's "/" and detaches the old root.
pub(crate) fn pivot(root: &Path) -> Result<(), StepError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let old = open("/", flags, Mode::empty()).step(|| "open /".into())?;
    let new = open(root, flags, Mode::empty()).step(|| format!("open {}", root.display()))?;
    fchdir(&new).step(|| format!("chdir to {}", root.display()))?;
    // Stack the old root under the new one at ".", then take it away.
    pivot_root(".", ".").step(|| format!("pivot_root to {}", root.display()))?;
    fchdir(&old).step(|| "chdir to the old root".into())?;
    // Its unmount must not propagate to the host.
    mount_at(
        None,
        Path::new("."),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detach the old root".into())?;
    nix::unistd::chdir("/").step(|| "chdir to /".into())
}

/// After pivot_root: read-only root and the root propagation asked for.
pub(crate) fn finalize(spec: &Spec) -> Result<(), StepError> {
    let readonly = spec.root().as_ref().and_then(|r| r.readonly()) == Some(true);
    let root = Path::new("/");
    if readonly {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept_flags(root)?;
        mount_at(None, root, None, flags, None)?;
    }
    if let Some(flags) = root_propagation(spec)? {
        mount_at(None, root, None, flags, None)?;
    }
    Ok(())
}

/// The terminal's slave at /dev/console, as the OCI spec asks.
pub(crate) fn mount_console(slave: &Path) -> Result<(), StepError> {
    let console = Path::new("/dev/console");
    create_file(console)?;
    mount_at(
        Some(slave.as_os_str()),
        console,
        None,
        MsFlags::MS_BIND,
        None,
    )
}

/// Bind-mounts each existing path read-only on itself (after pivot_root).
pub(crate) fn readonly_paths(spec: &Spec) -> Result<(), StepError> {
    let paths = spec
        .linux()
        .as_ref()
        .and_then(|l| l.readonly_paths().as_deref());
    for path in paths.unwrap_or_default() {
        let path = Path::new(path);
        match mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => {}
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e).step(|| format!("bind {} read-only", path.display())),
        }
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept_flags(path)?;
        mount_at(None, path, None, flags, None)?;
    }
    Ok(())
}

/// Hides each existing path: /dev/null over a file, an empty read-only
/// tmpfs over a directory (after pivot_root).
pub(crate) fn masked_paths(spec: &Spec) -> Result<(), StepError> {
    let paths = spec
        .linux()
        .as_ref()
        .and_then(|l| l.masked_paths().as_deref());
    for path in paths.unwrap_or_default() {
        let path = Path::new(path);
        match mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::ENOTDIR) => mount_at(
                Some(OsStr::new("tmpfs")),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                Some("size=0"),
            )?,
            Err(e) => return Err(e).step(|| format!("mask {}", path.display())),
        }
    }
    Ok(())
}

/// Writes the spec's sysctls (after pivot_root, through the container's /proc).
pub(crate) fn write_sysctls(spec: &Spec) -> Result<(), StepError> {
    let Some(sysctl) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) else {
        return Ok(());
    };
    for (key, value) in sysctl {
        if key.contains('/') || key.split('.').any(|p| p.is_empty() || p == "..") {
            return Err(StepError::msg(
                "linux.sysctl",
                format!("invalid key {key:?}"),
            ));
        }
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        fs::write(&path, value.as_bytes()).step(|| format!("sysctl {key}={value}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> MountOptions {
        parse_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_become_flags_propagation_and_data() {
        let o = opts(&[
            "nosuid",
            "noexec",
            "nodev",
            "mode=755",
            "size=65536k",
            "rprivate",
            "ro",
        ]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        assert_eq!(o.data, "mode=755,size=65536k");
        let o = opts(&["rbind", "ro", "rw"]);
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(o.is_bind());
        assert_eq!(
            remount_flags(opts(&["bind", "ro"]).flags),
            MsFlags::MS_RDONLY
        );
        assert!(remount_flags(opts(&["rbind"]).flags).is_empty());
    }

    #[test]
    fn paths_resolve_inside_the_root_whatever_the_links_say() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).expect("mkdir");
        symlink("/host-secret", root.join("etc/abs")).expect("link");
        symlink("../../../../outside", root.join("etc/rel")).expect("link");
        symlink("etc", root.join("cfg")).expect("link");
        symlink("loop", root.join("loop")).expect("link");
        let r = |p: &str| resolve_in_root(root, Path::new(p));
        assert_eq!(r("/etc/abs").expect("abs"), root.join("host-secret"));
        assert_eq!(r("/etc/rel/x").expect("rel"), root.join("outside/x"));
        assert_eq!(r("/cfg/hosts").expect("dir link"), root.join("etc/hosts"));
        assert_eq!(
            r("/../../etc/./hosts").expect("dots"),
            root.join("etc/hosts")
        );
        assert_eq!(r("/new/dir").expect("missing"), root.join("new/dir"));
        assert!(r("/loop/x").is_err());
    }

    #[test]
    fn the_parent_mount_is_the_longest_prefix() {
        let info = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 27 0:40 / /var/lib rw,relatime - ext4 /dev/vdb rw
41 27 0:41 / /var/lib\\040x rw shared:7 master:2 - ext4 /dev/vdc rw
";
        assert_eq!(
            parent_mount(info, Path::new("/var/lib/berth/rootfs")),
            Some((PathBuf::from("/var/lib"), false))
        );
        assert_eq!(
            parent_mount(info, Path::new("/var/lib x/r")),
            Some((PathBuf::from("/var/lib x"), true))
        );
        assert_eq!(
            parent_mount(info, Path::new("/tmp/r")),
            Some((PathBuf::from("/"), true))
        );
    }

    #[test]
    fn dev_is_set_up_unless_bound() {
        let tmpfs = Mount::default();
        assert!(dev_needs_setup(&[tmpfs]));
        let mut bound = Mount::default();
        bound.set_destination(PathBuf::from("/dev"));
        bound.set_typ(Some("bind".into()));
        assert!(!dev_needs_setup(&[bound]));
    }
}
