//! Unpacks one untrusted OCI layer tar into a fresh directory used as an overlayfs
//! lower dir: OCI whiteouts become overlayfs ones, and nothing is written outside it.
//!
//! Every file operation is relative to a directory fd reached from the layer's root
//! fd one component at a time with `O_NOFOLLOW`, so no path from the tar is ever
//! resolved by the kernel against the host and no symlink is ever followed.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens,
    makedev, mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use thiserror::Error;
use tracing::{debug, warn};

use super::digest::{Digest, DigestingReader};

/// Prefix of an OCI whiteout file: `.wh.name` deletes `name` of lower layers.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of aufs metadata (`.wh..wh.plnk` …); the opaque marker is the one we use.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Xattrs overlayfs reads as its own metadata (`user.overlay.*` with `userxattr`):
/// a layer must not forge them, or it could redirect lookups or fake whiteouts.
const OVERLAY_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay", b"user.overlay"];
/// Longest path we accept from a tar, as Linux's PATH_MAX; also bounds the depth.
const PATH_MAX: usize = 4096;

/// Layer media types and how their blobs are compressed.
const PLAIN_MEDIA_TYPES: [&str; 3] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
];
const GZIP_MEDIA_TYPES: [&str; 4] = [
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];
const ZSTD_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

/// Why a layer could not be unpacked. Entry errors carry the entry's path as
/// written in the tar. On any error the layer directory holds a partial layer,
/// which the caller removes.
#[derive(Debug, Error)]
pub enum UnpackError {
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("layer directory {}: {source}", path.display())]
    Destination {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer directory {} is not empty", .0.display())]
    DestinationNotEmpty(PathBuf),
    #[error("reading layer: {0}")]
    Read(#[source] io::Error),
    #[error("layer entry {path:?}: path escapes the layer directory")]
    PathEscapes { path: String },
    #[error("layer entry {path:?}: hard link target {target:?} escapes the layer directory")]
    LinkEscapes { path: String, target: String },
    #[error("layer entry {path:?}: hard link target {target:?} is not in this layer")]
    LinkTargetMissing { path: String, target: String },
    #[error("layer entry {path:?}: {component:?} is a symbolic link, refusing to write through it")]
    SymlinkInPath { path: String, component: String },
    #[error("layer entry {path:?}: {component:?} is not a directory")]
    NotADirectory { path: String, component: String },
    #[error("layer entry {path:?}: unsupported entry type {kind:?}")]
    UnsupportedType { path: String, kind: char },
    #[error("layer entry {path:?}: {reason}")]
    InvalidEntry { path: String, reason: String },
    #[error("layer entry {path:?}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What an unpack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackSummary {
    /// Tar entries read, including directories, whiteouts and skipped ones.
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes_written: u64,
    /// sha256 of the whole uncompressed tar stream: compare with the image
    /// config's `rootfs.diff_ids`.
    pub diff_id: Digest,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of an OCI or Docker layer media type.
    pub fn from_media_type(media_type: &str) -> Result<Compression, UnpackError> {
        if PLAIN_MEDIA_TYPES.contains(&media_type) {
            Ok(Compression::None)
        } else if GZIP_MEDIA_TYPES.contains(&media_type) {
            Ok(Compression::Gzip)
        } else if ZSTD_MEDIA_TYPES.contains(&media_type) {
            Ok(Compression::Zstd)
        } else {
            Err(UnpackError::UnsupportedMediaType(media_type.to_owned()))
        }
    }

    /// Wraps `blob` so reading it yields the uncompressed tar.
    pub fn decoder<'a, R: Read + 'a>(self, blob: R) -> Result<Box<dyn Read + 'a>, UnpackError> {
        Ok(match self {
            Compression::None => Box::new(blob),
            // Multi-member: pigz and eStargz write gzip streams of several members.
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(blob).map_err(UnpackError::Read)?)
            }
        })
    }
}

/// Decompresses a layer blob of `media_type` and unpacks it into `dest`. The blob
/// is read to its end, also past the end of the compressed data, so a
/// [`VerifyingReader`](super::digest::VerifyingReader) passed as `&mut` has seen
/// every byte when it is finished afterwards.
pub fn unpack_compressed_layer<R: Read>(
    media_type: &str,
    mut blob: R,
    dest: &Path,
) -> Result<UnpackSummary, UnpackError> {
    let tar = Compression::from_media_type(media_type)?.decoder(&mut blob)?;
    let summary = unpack_layer(tar, dest)?;
    io::copy(&mut blob, &mut io::sink()).map_err(UnpackError::Read)?;
    Ok(summary)
}

/// Unpacks an uncompressed layer tar into `dest`, an existing empty directory.
pub fn unpack_layer<R: Read>(tar: R, dest: &Path) -> Result<UnpackSummary, UnpackError> {
    let dest_err = |source: io::Error| UnpackError::Destination {
        path: dest.to_owned(),
        source,
    };
    // `dest` comes from berthd, not from the layer, so following it is fine.
    let root = openat(
        nix::fcntl::AT_FDCWD,
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| dest_err(e.into()))?;
    // Emptiness is what makes "a hard link target was unpacked by this layer" true.
    if std::fs::read_dir(dest).map_err(dest_err)?.next().is_some() {
        return Err(UnpackError::DestinationNotEmpty(dest.to_owned()));
    }

    let mut unpacker = Unpacker {
        root,
        dirs: Vec::new(),
        bytes_written: 0,
    };
    let mut archive = tar::Archive::new(DigestingReader::new(tar));
    let mut entries = 0u64;
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        entries += 1;
        unpacker.unpack_entry(&mut entry)?;
    }
    unpacker.set_directory_times()?;

    // The diff_id covers the whole stream, also the padding after the end marker.
    let mut reader = archive.into_inner();
    reader.drain().map_err(UnpackError::Read)?;
    let (diff_id, _, _) = reader.finish();
    Ok(UnpackSummary {
        entries,
        bytes_written: unpacker.bytes_written,
        diff_id,
    })
}

/// A cleaned path inside the layer: no empty, `.` or `..` components, no NUL.
type LayerPath = Vec<CString>;

/// Metadata of an entry, read from its header and PAX records.
struct EntryMeta {
    mode: Mode,
    uid: Uid,
    gid: Gid,
    atime: TimeSpec,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

struct Unpacker {
    root: OwnedFd,
    /// Directories with their times, set once all entries are in place.
    dirs: Vec<(LayerPath, TimeSpec, TimeSpec)>,
    bytes_written: u64,
}

/// Where a walk down the layer's directories stopped.
enum WalkError {
    Missing,
    Symlink(usize),
    NotDir(usize),
    Io(&'static str, Errno),
}

impl Unpacker {
    fn unpack_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        let path = String::from_utf8_lossy(&raw_path).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            debug!(entry = %path, "ignoring PAX global header");
            return Ok(());
        }
        // Absolute paths: contained, read relative to the layer root as containerd does.
        // `..` that climbs above the root: refused.
        let parts = clean_path(&raw_path).map_err(|reason| match reason {
            CleanError::Escapes => UnpackError::PathEscapes { path: path.clone() },
            CleanError::Invalid(reason) => UnpackError::InvalidEntry {
                path: path.clone(),
                reason: reason.to_owned(),
            },
        })?;
        let Some((name, parents)) = parts.split_last() else {
            // The root itself (`./`): its metadata belongs to the snapshot, not the layer.
            return Ok(());
        };

        // Missing parents are made (0755, root); a symlink or file as parent: refused.
        let parent = self
            .walk(parents, true)
            .map_err(|e| walk_error(e, &path, parents, None))?;

        let base = name.as_bytes();
        if base.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&parent, base, &path);
        }

        let meta = entry_meta(entry, &path)?;
        if kind.is_dir() {
            self.make_dir(&parent, name, &parts, &meta, &path)
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            self.make_file(&parent, name, entry, &meta, &path)
        } else if kind.is_symlink() {
            let target = entry.link_name_bytes().unwrap_or_default();
            self.make_symlink(&parent, name, &target, &meta, &path)
        } else if kind.is_hard_link() {
            let target = entry.link_name_bytes().unwrap_or_default().into_owned();
            self.make_hardlink(&parent, name, &parts, &target, &path)
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let (file_type, dev) = if kind.is_fifo() {
                (SFlag::S_IFIFO, 0)
            } else {
                let header = entry.header();
                // Device fields sit at the same offsets in ustar and GNU headers.
                let raw = header.as_bytes();
                let major = header.device_major().map(|d| u64::from(d.unwrap_or(0)));
                let minor = header.device_minor().map(|d| u64::from(d.unwrap_or(0)));
                let major = numeric_field(&path, "device major", &raw[329..337], major)?;
                let minor = numeric_field(&path, "device minor", &raw[337..345], minor)?;
                let file_type = if kind.is_block_special() {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFCHR
                };
                (file_type, makedev(major, minor))
            };
            self.make_node(&parent, name, file_type, dev, &meta, &path)
        } else {
            // Anything else (GNU volume labels, multi-volume, dumpdir …): refused, as
            // containerd does; an image layer has no use for them.
            Err(UnpackError::UnsupportedType {
                path,
                kind: char::from(kind.as_byte()),
            })
        }
    }

    /// Opens the directory at `parts` below the root without following symlinks,
    /// making missing ones if `create`.
    fn walk(&self, parts: &[CString], create: bool) -> Result<OwnedFd, WalkError> {
        let mut dir = self
            .root
            .try_clone()
            .map_err(|e| WalkError::Io("dup layer root", io_errno(&e)))?;
        for (i, part) in parts.iter().enumerate() {
            dir = match open_dir_at(dir.as_fd(), part) {
                Ok(next) => next,
                Err(Errno::ENOENT) if create => {
                    mkdirat(
                        dir.as_fd(),
                        part.as_c_str(),
                        Mode::from_bits_truncate(0o755),
                    )
                    .map_err(|e| WalkError::Io("create parent directory", e))?;
                    let next = open_dir_at(dir.as_fd(), part)
                        .map_err(|e| WalkError::Io("open parent directory", e))?;
                    // mkdir applied the umask; parents implied by a tar are 0755.
                    fchmod(next.as_fd(), Mode::from_bits_truncate(0o755))
                        .map_err(|e| WalkError::Io("chmod parent directory", e))?;
                    next
                }
                Err(Errno::ENOENT) => return Err(WalkError::Missing),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(match lstat_at(dir.as_fd(), part) {
                        Ok(Some(st)) if file_type(&st) == SFlag::S_IFLNK => WalkError::Symlink(i),
                        Ok(_) => WalkError::NotDir(i),
                        Err(e) => WalkError::Io("stat parent directory", e),
                    });
                }
                Err(e) => return Err(WalkError::Io("open parent directory", e)),
            };
        }
        Ok(dir)
    }

    /// `.wh.name` → a 0:0 character device `name`; `.wh..wh..opq` → opaque parent.
    fn whiteout(&self, parent: &OwnedFd, base: &[u8], path: &str) -> Result<(), UnpackError> {
        if base == WHITEOUT_OPAQUE {
            return set_xattr_fd(parent.as_fd(), OVERLAY_OPAQUE_XATTR, b"y")
                .map_err(|e| io_error(path, "mark directory opaque", e));
        }
        if base.starts_with(WHITEOUT_META_PREFIX) {
            debug!(entry = %path, "ignoring aufs whiteout metadata");
            return Ok(());
        }
        let target = &base[WHITEOUT_PREFIX.len()..];
        // `.wh.`, `.wh..`, `.wh...` would white out the directory itself or its parent.
        if target.is_empty() || target == b"." || target == b".." {
            return Err(UnpackError::InvalidEntry {
                path: path.to_owned(),
                reason: "whiteout names no file".to_owned(),
            });
        }
        let target = CString::new(target).map_err(|_| UnpackError::InvalidEntry {
            path: path.to_owned(),
            reason: "path contains NUL".to_owned(),
        })?;
        // A whiteout hides only lower layers (OCI spec): if this layer already has the
        // name, that entry stays, and it hides the lower one anyway. In the other order
        // the later entry replaces the whiteout device.
        if lstat_at(parent.as_fd(), &target)
            .map_err(|e| io_error(path, "stat whiteout target", e))?
            .is_some()
        {
            return Ok(());
        }
        mknodat(
            parent.as_fd(),
            target.as_c_str(),
            SFlag::S_IFCHR,
            Mode::empty(),
            makedev(0, 0),
        )
        .map_err(|e| io_error(path, "create whiteout device", e))
    }

    fn make_dir(
        &mut self,
        parent: &OwnedFd,
        name: &CStr,
        parts: &[CString],
        meta: &EntryMeta,
        path: &str,
    ) -> Result<(), UnpackError> {
        // An existing directory stays (entries merge); anything else is replaced.
        let existing = lstat_at(parent.as_fd(), name).map_err(|e| io_error(path, "stat", e))?;
        let is_dir = existing.is_some_and(|st| file_type(&st) == SFlag::S_IFDIR);
        if !is_dir {
            if existing.is_some() {
                remove_at(parent.as_fd(), name, false).map_err(|e| io_error(path, "remove", e))?;
            }
            mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700))
                .map_err(|e| io_error(path, "create directory", e))?;
        }
        let dir = open_dir_at(parent.as_fd(), name).map_err(|e| io_error(path, "open", e))?;
        apply_meta_fd(dir.as_fd(), meta, path)?;
        self.dirs.push((parts.to_vec(), meta.atime, meta.mtime));
        Ok(())
    }

    fn make_file<R: Read>(
        &mut self,
        parent: &OwnedFd,
        name: &CStr,
        content: &mut R,
        meta: &EntryMeta,
        path: &str,
    ) -> Result<(), UnpackError> {
        // A file replacing a directory or symlink: contained, the old entry is removed.
        remove_at(parent.as_fd(), name, true).map_err(|e| io_error(path, "remove", e))?;
        // O_EXCL|O_NOFOLLOW: never write through something that appeared meanwhile.
        let fd = openat(
            parent.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| io_error(path, "create file", e))?;
        let mut file = File::from(fd);
        let written = io::copy(content, &mut file).map_err(|e| UnpackError::Io {
            path: path.to_owned(),
            op: "write file content",
            source: e,
        })?;
        self.bytes_written += written;
        // Content before chmod: writing clears setuid.
        apply_meta_fd(file.as_fd(), meta, path)?;
        futimens(file.as_fd(), &meta.atime, &meta.mtime).map_err(|e| io_error(path, "set times", e))
    }

    fn make_symlink(
        &self,
        parent: &OwnedFd,
        name: &CStr,
        target: &[u8],
        meta: &EntryMeta,
        path: &str,
    ) -> Result<(), UnpackError> {
        // The target is stored verbatim, absolute or not: it is resolved inside the
        // container later, and this unpacker never follows it.
        if target.is_empty() || target.len() >= PATH_MAX {
            return Err(invalid(path, "symlink target is empty or too long"));
        }
        let target =
            CString::new(target).map_err(|_| invalid(path, "symlink target contains NUL"))?;
        remove_at(parent.as_fd(), name, true).map_err(|e| io_error(path, "remove", e))?;
        symlinkat(target.as_c_str(), parent.as_fd(), name)
            .map_err(|e| io_error(path, "create symlink", e))?;
        fchownat(
            parent.as_fd(),
            name,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_error(path, "chown", e))?;
        set_xattrs_at(parent.as_fd(), name, meta, SFlag::S_IFLNK, path)?;
        utimensat(
            parent.as_fd(),
            name,
            &meta.atime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_error(path, "set times", e))
    }

    fn make_hardlink(
        &self,
        parent: &OwnedFd,
        name: &CStr,
        parts: &[CString],
        raw_target: &[u8],
        path: &str,
    ) -> Result<(), UnpackError> {
        let target = String::from_utf8_lossy(raw_target).into_owned();
        let missing = || UnpackError::LinkTargetMissing {
            path: path.to_owned(),
            target: target.clone(),
        };
        // Absolute targets are read from the layer root like entry paths (a host path
        // is never linked); `..` that climbs above the root: refused.
        let target_parts = clean_path(raw_target).map_err(|e| match e {
            CleanError::Escapes => UnpackError::LinkEscapes {
                path: path.to_owned(),
                target: target.clone(),
            },
            CleanError::Invalid(reason) => invalid(path, reason),
        })?;
        if target_parts == parts {
            // Linking an entry to itself changes nothing.
            return Ok(());
        }
        let Some((target_name, target_parents)) = target_parts.split_last() else {
            return Err(missing());
        };
        // The target must be in this layer, reached without following symlinks.
        let target_dir = self
            .walk(target_parents, false)
            .map_err(|e| walk_error(e, path, target_parents, Some(missing())))?;
        match lstat_at(target_dir.as_fd(), target_name) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(missing()),
            Err(e) => return Err(io_error(path, "stat hard link target", e)),
        }
        remove_at(parent.as_fd(), name, true).map_err(|e| io_error(path, "remove", e))?;
        // No AT_SYMLINK_FOLLOW: a target that is a symlink is linked itself, never
        // what it points to. The new name shares the target's inode and metadata.
        linkat(
            target_dir.as_fd(),
            target_name.as_c_str(),
            parent.as_fd(),
            name,
            AtFlags::empty(),
        )
        .map_err(|e| io_error(path, "create hard link", e))
    }

    fn make_node(
        &self,
        parent: &OwnedFd,
        name: &CStr,
        kind: SFlag,
        dev: libc::dev_t,
        meta: &EntryMeta,
        path: &str,
    ) -> Result<(), UnpackError> {
        // Device nodes and fifos are allowed: containers need /dev/null & co. in images.
        remove_at(parent.as_fd(), name, true).map_err(|e| io_error(path, "remove", e))?;
        mknodat(
            parent.as_fd(),
            name,
            kind,
            Mode::from_bits_truncate(0o600),
            dev,
        )
        .map_err(|e| io_error(path, "create device node", e))?;
        fchownat(
            parent.as_fd(),
            name,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_error(path, "chown", e))?;
        // Following is harmless here: mknodat just made `name`, it is no symlink.
        // (Opening a device to fchmod it could trigger its driver.)
        fchmodat(
            parent.as_fd(),
            name,
            meta.mode,
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| io_error(path, "chmod", e))?;
        set_xattrs_at(parent.as_fd(), name, meta, kind, path)?;
        utimensat(
            parent.as_fd(),
            name,
            &meta.atime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_error(path, "set times", e))
    }

    /// Sets directory times last, since creating children changed them. In reverse
    /// so that a directory listed twice gets the times of its last entry.
    fn set_directory_times(&self) -> Result<(), UnpackError> {
        let mut done: HashSet<&[CString]> = HashSet::new();
        for (parts, atime, mtime) in self.dirs.iter().rev() {
            if !done.insert(parts) {
                continue;
            }
            // A directory replaced by a later non-directory entry has no times to set.
            let dir = match self.walk(parts, false) {
                Ok(dir) => dir,
                Err(WalkError::Io(op, e)) => {
                    return Err(io_error(&join_lossy(parts), op, e));
                }
                Err(_) => continue,
            };
            futimens(dir.as_fd(), atime, mtime)
                .map_err(|e| io_error(&join_lossy(parts), "set directory times", e))?;
        }
        Ok(())
    }
}

enum CleanError {
    Escapes,
    Invalid(&'static str),
}

/// Splits a tar path into components, dropping a leading `/`, empty and `.`
/// components, and resolving `..` lexically; climbing above the root is an error.
fn clean_path(raw: &[u8]) -> Result<LayerPath, CleanError> {
    if raw.len() >= PATH_MAX {
        return Err(CleanError::Invalid("path is longer than PATH_MAX"));
    }
    if raw.contains(&0) {
        return Err(CleanError::Invalid("path contains NUL"));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(CleanError::Escapes);
                }
            }
            other => parts.push(other),
        }
    }
    parts
        .into_iter()
        .map(|p| CString::new(p).map_err(|_| CleanError::Invalid("path contains NUL")))
        .collect()
}

fn entry_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &str,
) -> Result<EntryMeta, UnpackError> {
    let header = entry.header();
    let old = header.as_old();
    let mode = numeric_field(path, "mode", &old.mode, header.mode().map(u64::from))?;
    // PAX uid/gid are already folded into the header by the tar crate.
    let uid = numeric_field(path, "uid", &old.uid, header.uid())?;
    let gid = numeric_field(path, "gid", &old.gid, header.gid())?;
    let header_mtime = numeric_field(path, "mtime", &old.mtime, header.mtime())?;
    // Permission, setuid, setgid and sticky bits; the file type comes from the entry type.
    let mode = (mode & 0o7777) as u32;
    let uid = u32::try_from(uid).map_err(|_| invalid(path, "uid out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| invalid(path, "gid out of range"))?;

    let mut mtime = TimeSpec::new(i64::try_from(header_mtime).unwrap_or(i64::MAX), 0);
    let mut atime = None;
    let mut xattrs = Vec::new();
    if let Some(pax) = entry
        .pax_extensions()
        .map_err(|e| invalid(path, &format!("bad PAX header: {e}")))?
    {
        for record in pax {
            let record = record.map_err(|e| invalid(path, &format!("bad PAX record: {e}")))?;
            let key = record.key_bytes();
            let value = record.value_bytes();
            if key == b"mtime" {
                mtime = parse_pax_time(value).ok_or_else(|| invalid(path, "bad PAX mtime"))?;
            } else if key == b"atime" {
                atime = Some(parse_pax_time(value).ok_or_else(|| invalid(path, "bad PAX atime"))?);
            } else if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p)) {
                    // Contained: dropped, so a layer cannot forge overlay metadata.
                    let xattr = String::from_utf8_lossy(name);
                    warn!(entry = %path, %xattr, "dropping overlayfs xattr from layer");
                    continue;
                }
                let name =
                    CString::new(name).map_err(|_| invalid(path, "xattr name contains NUL"))?;
                xattrs.push((name, value.to_vec()));
            }
        }
    }
    Ok(EntryMeta {
        mode: Mode::from_bits_truncate(mode),
        uid: Uid::from_raw(uid),
        gid: Gid::from_raw(gid),
        atime: atime.unwrap_or(mtime),
        mtime,
        xattrs,
    })
}

/// A numeric header field. An empty one reads as 0, as in Go's archive/tar (which
/// wrote most layers); anything else unparsable is refused.
fn numeric_field(
    path: &str,
    what: &str,
    field: &[u8],
    parsed: io::Result<u64>,
) -> Result<u64, UnpackError> {
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if field.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(invalid(path, &format!("bad {what} in header: {e}"))),
    }
}

/// A PAX time: decimal seconds since the epoch with an optional fraction, maybe negative.
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(value).ok()?;
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    // Nanoseconds from the first nine fraction digits; more precision is dropped.
    let mut nanos: i64 = 0;
    for i in 0..9 {
        let digit = frac.as_bytes().get(i).map_or(0, |b| i64::from(b - b'0'));
        nanos = nanos * 10 + digit;
    }
    Some(if !negative {
        TimeSpec::new(secs, nanos)
    } else if nanos == 0 {
        TimeSpec::new(-secs, 0)
    } else {
        TimeSpec::new(-secs - 1, 1_000_000_000 - nanos)
    })
}

/// Owner, mode and xattrs through an open fd of a file or directory. chown first:
/// it clears setuid/setgid and `security.capability`, which come after.
fn apply_meta_fd(fd: BorrowedFd<'_>, meta: &EntryMeta, path: &str) -> Result<(), UnpackError> {
    fchown(fd, Some(meta.uid), Some(meta.gid)).map_err(|e| io_error(path, "chown", e))?;
    fchmod(fd, meta.mode).map_err(|e| io_error(path, "chmod", e))?;
    for (name, value) in &meta.xattrs {
        match set_xattr_fd(fd, name, value) {
            Ok(()) => {}
            Err(Errno::ENOTSUP) => warn_xattr_skipped(path, name, Errno::ENOTSUP),
            Err(e) => return Err(io_error(path, "set xattr", e)),
        }
    }
    Ok(())
}

/// Xattrs of a symlink or device node, which have no fd to set them through.
fn set_xattrs_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    meta: &EntryMeta,
    kind: SFlag,
    path: &str,
) -> Result<(), UnpackError> {
    if meta.xattrs.is_empty() {
        return Ok(());
    }
    // /proc/self/fd/N jumps straight to the directory we hold open, and lsetxattr
    // does not follow `name`; so no path from the tar is resolved against the host.
    let mut proc_path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    proc_path.extend_from_slice(name.to_bytes());
    let proc_path = CString::new(proc_path).map_err(|_| invalid(path, "path contains NUL"))?;
    for (key, value) in &meta.xattrs {
        // SAFETY: both strings are NUL-terminated CStrings and value's pointer and
        // length describe one live slice.
        let rc = unsafe {
            libc::lsetxattr(
                proc_path.as_ptr(),
                key.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        match Errno::result(rc) {
            Ok(_) => {}
            Err(Errno::ENOTSUP) => warn_xattr_skipped(path, key, Errno::ENOTSUP),
            // Linux allows user.* only on regular files and directories.
            Err(Errno::EPERM) if key.to_bytes().starts_with(b"user.") && kind != SFlag::S_IFREG => {
                warn_xattr_skipped(path, key, Errno::EPERM)
            }
            Err(e) => return Err(io_error(path, "set xattr", e)),
        }
    }
    Ok(())
}

fn warn_xattr_skipped(path: &str, name: &CStr, e: Errno) {
    warn!(entry = %path, xattr = %name.to_string_lossy(), error = %e, "skipping xattr the filesystem refuses");
}

fn set_xattr_fd(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> Result<(), Errno> {
    // SAFETY: fd is open for the duration of the call, name is NUL-terminated, and
    // value's pointer and length describe one live slice.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Option<FileStat>, Errno> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Removes `name` in `dir` if it exists; a directory with all its contents if
/// `recursive`, else only if empty.
fn remove_at(dir: BorrowedFd<'_>, name: &CStr, recursive: bool) -> Result<(), Errno> {
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if file_type(&st) == SFlag::S_IFDIR => {
            if recursive {
                remove_tree_contents(dir, name)?;
            }
            unlinkat(dir, name, UnlinkatFlags::RemoveDir)
        }
        Some(_) => unlinkat(dir, name, UnlinkatFlags::NoRemoveDir),
    }
}

/// Empties directory `name` in `parent`, never following symlinks. Iterative, with
/// one open fd per level, so a deep hostile tree cannot overflow the stack.
fn remove_tree_contents(parent: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    // Each level: the open directory, and its name in the level above.
    let mut stack: Vec<(OwnedFd, CString)> = vec![(open_dir_at(parent, name)?, name.to_owned())];
    while let Some((dir, _)) = stack.last() {
        match unlink_all_but_one_subdir(dir.as_fd())? {
            Some(sub) => {
                let fd = open_dir_at(dir.as_fd(), &sub)?;
                stack.push((fd, sub));
            }
            None => {
                let Some((_, emptied)) = stack.pop() else {
                    break;
                };
                // The outermost level is removed by the caller.
                if let Some((above, _)) = stack.last() {
                    unlinkat(above.as_fd(), emptied.as_c_str(), UnlinkatFlags::RemoveDir)?;
                }
            }
        }
    }
    Ok(())
}

/// Unlinks every non-directory in `dir` and returns the name of one subdirectory,
/// if any is left.
fn unlink_all_but_one_subdir(dir: BorrowedFd<'_>) -> Result<Option<CString>, Errno> {
    // Listed through /proc/self/fd/N: that names exactly the directory we hold open.
    let mut names = Vec::new();
    for item in
        std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(|e| io_errno(&e))?
    {
        let item = item.map_err(|e| io_errno(&e))?;
        names.push(CString::new(item.file_name().as_bytes()).map_err(|_| Errno::EINVAL)?);
    }
    let mut subdir = None;
    for name in names {
        match lstat_at(dir, &name)? {
            Some(st) if file_type(&st) == SFlag::S_IFDIR => subdir = Some(name),
            Some(_) => unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir)?,
            None => {}
        }
    }
    Ok(subdir)
}

fn walk_error(
    e: WalkError,
    path: &str,
    parts: &[CString],
    missing: Option<UnpackError>,
) -> UnpackError {
    let component = |i: usize| join_lossy(&parts[..=i]);
    match e {
        WalkError::Symlink(i) => UnpackError::SymlinkInPath {
            path: path.to_owned(),
            component: component(i),
        },
        WalkError::NotDir(i) => UnpackError::NotADirectory {
            path: path.to_owned(),
            component: component(i),
        },
        WalkError::Missing => missing.unwrap_or_else(|| invalid(path, "parent directory vanished")),
        WalkError::Io(op, errno) => io_error(path, op, errno),
    }
}

fn join_lossy(parts: &[CString]) -> String {
    let joined: Vec<u8> = parts
        .iter()
        .map(|p| p.as_bytes())
        .collect::<Vec<_>>()
        .join(&b'/');
    String::from_utf8_lossy(&joined).into_owned()
}

fn io_error(path: &str, op: &'static str, e: Errno) -> UnpackError {
    UnpackError::Io {
        path: path.to_owned(),
        op,
        source: e.into(),
    }
}

fn invalid(path: &str, reason: &str) -> UnpackError {
    UnpackError::InvalidEntry {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

fn io_errno(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::{Builder, EntryType, Header};

    const MTIME: u64 = 1_600_000_000;

    /// Builds tars in memory, writing names raw so hostile paths get through.
    struct TarBuilder(Builder<Vec<u8>>);

    impl TarBuilder {
        fn new() -> TarBuilder {
            TarBuilder(Builder::new(Vec::new()))
        }

        fn entry(
            &mut self,
            kind: EntryType,
            path: &str,
            link: &str,
            mode: u32,
            data: &[u8],
        ) -> &mut Self {
            self.entry_full(kind, path, link, mode, (0, 0), MTIME, data)
        }

        #[allow(clippy::too_many_arguments)]
        fn entry_full(
            &mut self,
            kind: EntryType,
            path: &str,
            link: &str,
            mode: u32,
            (uid, gid): (u64, u64),
            mtime: u64,
            data: &[u8],
        ) -> &mut Self {
            let mut header = Header::new_gnu();
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            header.set_uid(uid);
            header.set_gid(gid);
            header.set_mtime(mtime);
            let gnu = header.as_gnu_mut().unwrap();
            assert!(
                path.len() < 100 && link.len() < 100,
                "use pax for long names"
            );
            gnu.name[..path.len()].copy_from_slice(path.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_cksum();
            self.0.append(&header, data).unwrap();
            self
        }

        fn dir(&mut self, path: &str) -> &mut Self {
            self.entry(EntryType::Directory, path, "", 0o755, b"")
        }

        fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
            self.entry(EntryType::Regular, path, "", 0o644, data)
        }

        fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.entry(EntryType::Symlink, path, target, 0o777, b"")
        }

        fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.entry(EntryType::Link, path, target, 0o644, b"")
        }

        /// PAX records for the next entry.
        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
            self.0
                .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
                .unwrap();
            self
        }

        fn finish(&mut self) -> Vec<u8> {
            self.0.finish().unwrap();
            self.0.get_ref().clone()
        }
    }

    /// A temp dir holding the layer dir and an "outside" sibling with one secret file.
    struct Fixture {
        _tmp: tempfile::TempDir,
        layer: PathBuf,
        outside: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let layer = tmp.path().join("layer");
            let outside = tmp.path().join("outside");
            fs::create_dir(&layer).unwrap();
            fs::create_dir(&outside).unwrap();
            fs::write(outside.join("secret"), b"secret").unwrap();
            Fixture {
                _tmp: tmp,
                layer,
                outside,
            }
        }

        fn unpack(&self, tar: &[u8]) -> Result<UnpackSummary, UnpackError> {
            unpack_layer(tar, &self.layer)
        }

        /// Nothing outside the layer changed: only the secret, unlinked elsewhere,
        /// unchanged, with no xattrs added.
        fn assert_outside_untouched(&self, case: &str) {
            let names: Vec<_> = fs::read_dir(&self.outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["secret"], "{case}: outside dir changed");
            let secret = self.outside.join("secret");
            let meta = fs::symlink_metadata(&secret).unwrap();
            assert!(meta.is_file(), "{case}");
            assert_eq!(meta.nlink(), 1, "{case}: secret was hard linked");
            assert_eq!(fs::read(&secret).unwrap(), b"secret", "{case}");
            assert_eq!(
                lgetxattr(&self.outside, "trusted.overlay.opaque"),
                None,
                "{case}"
            );
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.layer.join(rel)
        }
    }

    fn is_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("skipping: unpacking layers needs root (chown, mknod, trusted.* xattrs)");
        false
    }

    fn lgetxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let name = CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: path and name are NUL-terminated; buf is a live buffer of buf.len() bytes.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    enum Expect {
        Refused(fn(&UnpackError) -> bool),
        Contained(fn(&Fixture)),
    }

    #[test]
    fn hostile_layers_stay_inside() {
        if !is_root() {
            return;
        }
        type Build = Box<dyn Fn(&Fixture) -> Vec<u8>>;
        let out = |f: &Fixture| f.outside.display().to_string();
        let cases: Vec<(&str, Build, Expect)> = vec![
            (
                "absolute path is read from the layer root",
                Box::new(move |f| {
                    TarBuilder::new()
                        .file(&format!("{}/pwned", out(f)), b"x")
                        .finish()
                }),
                Expect::Contained(|f| {
                    let rel = format!("{}/pwned", f.outside.display());
                    assert!(f.path(rel.trim_start_matches('/')).is_file());
                }),
            ),
            (
                "absolute /etc path",
                Box::new(|_| {
                    TarBuilder::new()
                        .file("/etc/berth-test-pwned", b"x")
                        .finish()
                }),
                Expect::Contained(|f| {
                    assert!(f.path("etc/berth-test-pwned").is_file());
                    assert!(!Path::new("/etc/berth-test-pwned").exists());
                }),
            ),
            (
                "../ escape",
                Box::new(|_| TarBuilder::new().file("../outside/pwned", b"x").finish()),
                Expect::Refused(|e| matches!(e, UnpackError::PathEscapes { .. })),
            ),
            (
                "/../ escape",
                Box::new(|_| TarBuilder::new().file("/../outside/pwned", b"x").finish()),
                Expect::Refused(|e| matches!(e, UnpackError::PathEscapes { .. })),
            ),
            (
                "deep a/../../x escape",
                Box::new(|_| {
                    TarBuilder::new()
                        .file("a/../../outside/pwned", b"x")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::PathEscapes { .. })),
            ),
            (
                "a/../b stays inside",
                Box::new(|_| TarBuilder::new().file("a/../b", b"x").finish()),
                Expect::Contained(|f| {
                    assert!(f.path("b").is_file());
                    assert!(!f.path("a").exists());
                }),
            ),
            (
                "PAX path escape",
                Box::new(|_| {
                    TarBuilder::new()
                        .pax(&[("path", b"../outside/pwned")])
                        .file("harmless", b"x")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::PathEscapes { .. })),
            ),
            (
                "absolute symlink parent",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("evil", &out(f))
                        .file("evil/pwned", b"x")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::SymlinkInPath { .. })),
            ),
            (
                "relative symlink parent",
                Box::new(|_| {
                    TarBuilder::new()
                        .symlink("evil", "../outside")
                        .file("evil/pwned", b"x")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::SymlinkInPath { .. })),
            ),
            (
                "symlink parent deeper in the path",
                Box::new(move |f| {
                    TarBuilder::new()
                        .dir("a/")
                        .symlink("a/evil", &out(f))
                        .file("a/evil/pwned", b"x")
                        .finish()
                }),
                Expect::Refused(
                    |e| matches!(e, UnpackError::SymlinkInPath { component, .. } if component == "a/evil"),
                ),
            ),
            (
                "symlink chain as parent",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("b", &out(f))
                        .symlink("a", "b")
                        .file("a/pwned", b"x")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::SymlinkInPath { .. })),
            ),
            (
                "symlink parent pointing inside is refused too",
                Box::new(|_| {
                    TarBuilder::new()
                        .dir("d/")
                        .symlink("l", "d")
                        .file("l/f", b"x")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::SymlinkInPath { .. })),
            ),
            (
                "symlinks are stored, never followed",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("b", &format!("{}/secret", out(f)))
                        .symlink("a", "b")
                        .finish()
                }),
                Expect::Contained(|f| {
                    assert_eq!(fs::read_link(f.path("a")).unwrap(), Path::new("b"));
                    assert_eq!(
                        fs::read_link(f.path("b")).unwrap(),
                        f.outside.join("secret")
                    );
                }),
            ),
            (
                "hardlink to absolute host path",
                Box::new(move |f| {
                    TarBuilder::new()
                        .hardlink("h", &format!("{}/secret", out(f)))
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::LinkTargetMissing { .. })),
            ),
            (
                "hardlink to /etc/passwd",
                Box::new(|_| TarBuilder::new().hardlink("h", "/etc/passwd").finish()),
                Expect::Refused(|e| matches!(e, UnpackError::LinkTargetMissing { .. })),
            ),
            (
                "hardlink with ../ target",
                Box::new(|_| {
                    TarBuilder::new()
                        .hardlink("h", "../outside/secret")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::LinkEscapes { .. })),
            ),
            (
                "hardlink with deep a/../../ target",
                Box::new(|_| {
                    TarBuilder::new()
                        .dir("a/")
                        .hardlink("h", "a/../../outside/secret")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::LinkEscapes { .. })),
            ),
            (
                "hardlink whose own path escapes",
                Box::new(|_| {
                    TarBuilder::new()
                        .file("t", b"x")
                        .hardlink("../outside/h", "t")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::PathEscapes { .. })),
            ),
            (
                "hardlink through a symlinked directory",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("s", &out(f))
                        .hardlink("h", "s/secret")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::SymlinkInPath { .. })),
            ),
            (
                "hardlink to a symlink pointing outside links the symlink",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("s", &format!("{}/secret", out(f)))
                        .hardlink("h", "s")
                        .finish()
                }),
                Expect::Contained(|f| {
                    let h = fs::symlink_metadata(f.path("h")).unwrap();
                    let s = fs::symlink_metadata(f.path("s")).unwrap();
                    assert!(h.file_type().is_symlink());
                    assert_eq!(h.ino(), s.ino());
                }),
            ),
            (
                "file replaces a symlink instead of writing through it",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("f", &format!("{}/secret", out(f)))
                        .file("f", b"mine")
                        .finish()
                }),
                Expect::Contained(|f| {
                    assert!(fs::symlink_metadata(f.path("f")).unwrap().is_file());
                    assert_eq!(fs::read(f.path("f")).unwrap(), b"mine");
                }),
            ),
            (
                "directory replaces a symlink",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("d", &out(f))
                        .dir("d/")
                        .file("d/pwned", b"x")
                        .finish()
                }),
                Expect::Contained(|f| {
                    assert!(fs::symlink_metadata(f.path("d")).unwrap().is_dir());
                    assert!(f.path("d/pwned").is_file());
                }),
            ),
            (
                "file replaces a directory tree",
                Box::new(|_| {
                    TarBuilder::new()
                        .dir("d/")
                        .dir("d/e/")
                        .file("d/e/x", b"x")
                        .symlink("d/e/l", "/")
                        .file("d", b"now a file")
                        .finish()
                }),
                Expect::Contained(|f| {
                    assert_eq!(fs::read(f.path("d")).unwrap(), b"now a file");
                }),
            ),
            (
                "symlink replaces a file",
                Box::new(move |f| {
                    TarBuilder::new()
                        .file("l", b"x")
                        .symlink("l", &out(f))
                        .finish()
                }),
                Expect::Contained(|f| {
                    assert!(
                        fs::symlink_metadata(f.path("l"))
                            .unwrap()
                            .file_type()
                            .is_symlink()
                    );
                }),
            ),
            (
                "whiteout through a symlinked directory",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("s", &out(f))
                        .file("s/.wh.secret", b"")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::SymlinkInPath { .. })),
            ),
            (
                "opaque marker through a symlinked directory",
                Box::new(move |f| {
                    TarBuilder::new()
                        .symlink("s", &out(f))
                        .file("s/.wh..wh..opq", b"")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::SymlinkInPath { .. })),
            ),
            (
                "whiteout of ..",
                Box::new(|_| TarBuilder::new().dir("d/").file("d/.wh...", b"").finish()),
                Expect::Refused(|e| matches!(e, UnpackError::InvalidEntry { .. })),
            ),
            (
                "a file as parent",
                Box::new(|_| TarBuilder::new().file("f", b"x").file("f/g", b"y").finish()),
                Expect::Refused(|e| matches!(e, UnpackError::NotADirectory { .. })),
            ),
            (
                "forged overlay xattrs are dropped",
                Box::new(|_| {
                    TarBuilder::new()
                        .pax(&[
                            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                            ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
                            ("SCHILY.xattr.user.overlay.opaque", b"y"),
                        ])
                        .dir("d/")
                        .finish()
                }),
                Expect::Contained(|f| {
                    let d = f.path("d");
                    assert!(d.is_dir());
                    assert_eq!(lgetxattr(&d, "trusted.overlay.opaque"), None);
                    assert_eq!(lgetxattr(&d, "trusted.overlay.redirect"), None);
                    assert_eq!(lgetxattr(&d, "user.overlay.opaque"), None);
                }),
            ),
            (
                "root entries are ignored",
                Box::new(|_| {
                    TarBuilder::new()
                        .dir("./")
                        .dir("/")
                        .entry(EntryType::Directory, ".", "", 0o700, b"")
                        .finish()
                }),
                Expect::Contained(|f| {
                    assert_eq!(fs::read_dir(&f.layer).unwrap().count(), 0);
                }),
            ),
            (
                "path longer than PATH_MAX",
                Box::new(|_| {
                    let long = "a/".repeat(2100);
                    TarBuilder::new()
                        .pax(&[("path", long.as_bytes())])
                        .file("x", b"")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::InvalidEntry { .. })),
            ),
            (
                "NUL in a PAX path",
                Box::new(|_| {
                    TarBuilder::new()
                        .pax(&[("path", b"a\0/../../x")])
                        .file("x", b"")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::InvalidEntry { .. })),
            ),
            (
                "unsupported entry type",
                Box::new(|_| {
                    TarBuilder::new()
                        .entry(EntryType::new(b'V'), "label", "", 0o644, b"")
                        .finish()
                }),
                Expect::Refused(|e| matches!(e, UnpackError::UnsupportedType { kind: 'V', .. })),
            ),
        ];

        for (case, build, expect) in cases {
            let f = Fixture::new();
            let tar = build(&f);
            let result = f.unpack(&tar);
            match (&expect, &result) {
                (Expect::Refused(is_expected), Err(e)) => {
                    assert!(is_expected(e), "{case}: unexpected error {e}");
                    // The message names the entry.
                    assert!(e.to_string().contains("layer entry"), "{case}: {e}");
                }
                (Expect::Contained(check), Ok(_)) => check(&f),
                (Expect::Refused(_), Ok(_)) => panic!("{case}: was not refused"),
                (Expect::Contained(_), Err(e)) => panic!("{case}: refused: {e}"),
            }
            f.assert_outside_untouched(case);
        }
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        if !is_root() {
            return;
        }
        let f = Fixture::new();
        let tar = TarBuilder::new()
            .file(".wh.gone", b"")
            .dir("d/")
            .file("d/.wh.x", b"")
            .file("keep", b"k")
            .file(".wh.keep", b"")
            .file(".wh.later", b"")
            .file("later", b"l")
            .file("d/.wh..wh.plnk", b"")
            .finish();
        f.unpack(&tar).unwrap();
        for path in ["gone", "d/x"] {
            let meta = fs::symlink_metadata(f.path(path)).unwrap();
            assert!(meta.file_type().is_char_device(), "{path}");
            assert_eq!(meta.rdev(), 0, "{path}");
        }
        // A same-layer file wins over its whiteout, in either order.
        assert_eq!(fs::read(f.path("keep")).unwrap(), b"k");
        assert_eq!(fs::read(f.path("later")).unwrap(), b"l");
        for path in [
            ".wh.gone",
            "d/.wh.x",
            ".wh.keep",
            ".wh.later",
            "d/.wh..wh.plnk",
            "d/plnk",
        ] {
            assert!(fs::symlink_metadata(f.path(path)).is_err(), "{path} exists");
        }
    }

    #[test]
    fn opaque_markers_set_the_overlay_xattr() {
        if !is_root() {
            return;
        }
        let f = Fixture::new();
        let tar = TarBuilder::new()
            .dir("d/")
            .file("d/.wh..wh..opq", b"")
            .file("d/kept", b"x")
            .file("new/.wh..wh..opq", b"")
            .file(".wh..wh..opq", b"")
            .finish();
        f.unpack(&tar).unwrap();
        for dir in ["d", "new", ""] {
            assert_eq!(
                lgetxattr(&f.path(dir), "trusted.overlay.opaque").as_deref(),
                Some(&b"y"[..]),
                "{dir:?}"
            );
        }
        assert!(f.path("d/kept").is_file());
        assert!(!f.path("d/.wh..wh..opq").exists());
    }

    #[test]
    fn modes_owners_and_special_bits_survive() {
        if !is_root() {
            return;
        }
        let f = Fixture::new();
        let tar = TarBuilder::new()
            .entry(EntryType::Regular, "suid-root", "", 0o4755, b"#!")
            .entry_full(
                EntryType::Regular,
                "suid-user",
                "",
                0o6750,
                (1000, 1001),
                MTIME,
                b"#!",
            )
            .entry_full(
                EntryType::Directory,
                "sgid/",
                "",
                0o2775,
                (0, 50),
                MTIME,
                b"",
            )
            .entry(EntryType::Directory, "tmp/", "", 0o1777, b"")
            .entry_full(
                EntryType::Symlink,
                "link",
                "suid-root",
                0o777,
                (7, 8),
                MTIME,
                b"",
            )
            .entry(EntryType::Regular, "private", "", 0o600, b"")
            .finish();
        f.unpack(&tar).unwrap();
        let meta = |p: &str| fs::symlink_metadata(f.path(p)).unwrap();
        assert_eq!(meta("suid-root").mode() & 0o7777, 0o4755);
        assert_eq!(meta("suid-root").uid(), 0);
        assert_eq!(meta("suid-user").mode() & 0o7777, 0o6750);
        assert_eq!(
            (meta("suid-user").uid(), meta("suid-user").gid()),
            (1000, 1001)
        );
        assert_eq!(meta("sgid").mode() & 0o7777, 0o2775);
        assert_eq!(meta("sgid").gid(), 50);
        assert_eq!(meta("tmp").mode() & 0o7777, 0o1777);
        assert_eq!((meta("link").uid(), meta("link").gid()), (7, 8));
        assert_eq!(meta("private").mode() & 0o7777, 0o600);
    }

    #[test]
    fn xattrs_including_file_capabilities_survive() {
        if !is_root() {
            return;
        }
        // VFS_CAP_REVISION_2, effective, permitted = CAP_NET_BIND_SERVICE.
        let cap: &[u8] = &[
            0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let f = Fixture::new();
        let tar = TarBuilder::new()
            .pax(&[
                ("SCHILY.xattr.security.capability", cap),
                ("SCHILY.xattr.user.note", b"hello"),
            ])
            .entry_full(
                EntryType::Regular,
                "ping",
                "",
                0o4755,
                (1000, 1000),
                MTIME,
                b"\x7fELF",
            )
            .pax(&[("SCHILY.xattr.user.note", b"on a symlink")])
            .symlink("l", "ping")
            .pax(&[("SCHILY.xattr.trusted.note", b"dir")])
            .dir("d/")
            .finish();
        f.unpack(&tar).unwrap();
        let ping = f.path("ping");
        assert_eq!(
            lgetxattr(&ping, "security.capability").as_deref(),
            Some(cap)
        );
        assert_eq!(
            lgetxattr(&ping, "user.note").as_deref(),
            Some(&b"hello"[..])
        );
        // chown came first, so neither the capability nor setuid were cleared by it.
        assert_eq!(fs::metadata(&ping).unwrap().mode() & 0o7777, 0o4755);
        assert_eq!(
            lgetxattr(&f.path("d"), "trusted.note").as_deref(),
            Some(&b"dir"[..])
        );
        // user.* is not allowed on symlinks; it is skipped, not fatal.
        assert_eq!(lgetxattr(&f.path("l"), "user.note"), None);
    }

    #[test]
    fn hardlinks_share_an_inode() {
        if !is_root() {
            return;
        }
        let f = Fixture::new();
        let tar = TarBuilder::new()
            .dir("bin/")
            .file("bin/busybox", b"bb")
            .hardlink("bin/sh", "bin/busybox")
            .hardlink("bin/ls", "/bin/busybox")
            .hardlink("bin/cat", "./bin/../bin/busybox")
            .hardlink("bin/busybox", "bin/busybox")
            .finish();
        f.unpack(&tar).unwrap();
        let ino = fs::metadata(f.path("bin/busybox")).unwrap().ino();
        for name in ["bin/sh", "bin/ls", "bin/cat"] {
            assert_eq!(fs::metadata(f.path(name)).unwrap().ino(), ino, "{name}");
        }
        assert_eq!(fs::metadata(f.path("bin/busybox")).unwrap().nlink(), 4);
    }

    #[test]
    fn mtimes_are_kept() {
        if !is_root() {
            return;
        }
        let f = Fixture::new();
        let tar = TarBuilder::new()
            .entry_full(
                EntryType::Directory,
                "d/",
                "",
                0o755,
                (0, 0),
                1_400_000_000,
                b"",
            )
            .entry_full(
                EntryType::Regular,
                "d/f",
                "",
                0o644,
                (0, 0),
                1_500_000_000,
                b"x",
            )
            .entry_full(
                EntryType::Directory,
                "d/e/",
                "",
                0o755,
                (0, 0),
                1_450_000_000,
                b"",
            )
            .entry_full(
                EntryType::Symlink,
                "d/l",
                "f",
                0o777,
                (0, 0),
                1_300_000_000,
                b"",
            )
            .entry_full(
                EntryType::Fifo,
                "d/p",
                "",
                0o644,
                (0, 0),
                1_350_000_000,
                b"",
            )
            .pax(&[("mtime", b"1600000000.5"), ("atime", b"1600000001.25")])
            .file("d/e/precise", b"")
            .finish();
        f.unpack(&tar).unwrap();
        let meta = |p: &str| fs::symlink_metadata(f.path(p)).unwrap();
        assert_eq!(meta("d").mtime(), 1_400_000_000);
        assert_eq!(meta("d/e").mtime(), 1_450_000_000);
        assert_eq!(meta("d/f").mtime(), 1_500_000_000);
        assert_eq!(meta("d/l").mtime(), 1_300_000_000);
        assert_eq!(meta("d/p").mtime(), 1_350_000_000);
        let precise = meta("d/e/precise");
        assert_eq!(
            (precise.mtime(), precise.mtime_nsec()),
            (1_600_000_000, 500_000_000)
        );
        assert_eq!(
            (precise.atime(), precise.atime_nsec()),
            (1_600_000_001, 250_000_000)
        );
    }

    #[test]
    fn device_nodes_and_fifos() {
        if !is_root() {
            return;
        }
        let f = Fixture::new();
        let mut b = TarBuilder::new();
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Char);
        header.set_path("dev/null").unwrap();
        header.set_mode(0o666);
        header.set_device_major(1).unwrap();
        header.set_device_minor(3).unwrap();
        header.set_size(0);
        header.as_old_mut().uid = [0; 8];
        header.as_old_mut().gid = [b' '; 8];
        header.as_old_mut().mtime = [0; 12];
        header.set_cksum();
        b.dir("dev/");
        b.0.append(&header, &b""[..]).unwrap();
        b.entry(EntryType::Block, "dev/loop0", "", 0o660, b"");
        b.entry(EntryType::Fifo, "run/fifo", "", 0o620, b"");
        f.unpack(&b.finish()).unwrap();
        let null = fs::symlink_metadata(f.path("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o666);
        assert!(
            fs::symlink_metadata(f.path("dev/loop0"))
                .unwrap()
                .file_type()
                .is_block_device()
        );
        let fifo = fs::symlink_metadata(f.path("run/fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o620);
    }

    #[test]
    fn later_entries_override_earlier_ones() {
        if !is_root() {
            return;
        }
        let f = Fixture::new();
        let tar = TarBuilder::new()
            .entry(EntryType::Directory, "d/", "", 0o700, b"")
            .file("d/x", b"1")
            .entry(EntryType::Directory, "d/", "", 0o750, b"")
            .file("d/x", b"2")
            .finish();
        f.unpack(&tar).unwrap();
        assert_eq!(fs::metadata(f.path("d")).unwrap().mode() & 0o7777, 0o750);
        assert_eq!(fs::read(f.path("d/x")).unwrap(), b"2");
    }

    fn sample_tar() -> Vec<u8> {
        let mut tar = TarBuilder::new()
            .dir("etc/")
            .file("etc/hostname", b"berth\n")
            .file("bin/tool", &[7u8; 10_000])
            .finish();
        // Trailing zero blocks after the end marker are part of the diff_id.
        tar.extend_from_slice(&[0u8; 4096]);
        tar
    }

    #[test]
    fn summary_and_diff_id() {
        if !is_root() {
            return;
        }
        let f = Fixture::new();
        let tar = sample_tar();
        let summary = f.unpack(&tar).unwrap();
        assert_eq!(summary.entries, 3);
        assert_eq!(summary.bytes_written, 6 + 10_000);
        assert_eq!(summary.diff_id, Digest::sha256_of(&tar));
        assert_eq!(fs::read(f.path("bin/tool")).unwrap(), vec![7u8; 10_000]);
    }

    #[test]
    fn gzip_and_zstd_layers() {
        if !is_root() {
            return;
        }
        let tar = sample_tar();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
        for (media_type, blob) in [
            ("application/vnd.oci.image.layer.v1.tar+gzip", &gz),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", &gz),
            ("application/vnd.oci.image.layer.v1.tar+zstd", &zst),
            ("application/vnd.oci.image.layer.v1.tar", &tar),
        ] {
            let f = Fixture::new();
            let summary = unpack_compressed_layer(media_type, &blob[..], &f.layer)
                .unwrap_or_else(|e| panic!("{media_type}: {e}"));
            assert_eq!(summary.diff_id, Digest::sha256_of(&tar), "{media_type}");
            assert_eq!(fs::read(f.path("etc/hostname")).unwrap(), b"berth\n");
        }
        let f = Fixture::new();
        assert!(matches!(
            unpack_compressed_layer(
                "application/vnd.oci.image.layer.v1.tar+lz4",
                &tar[..],
                &f.layer
            ),
            Err(UnpackError::UnsupportedMediaType(_))
        ));
        // A corrupt blob is a read error, not a panic.
        let mut bad = gz.clone();
        let mid = bad.len() / 2;
        bad[mid..].iter_mut().for_each(|b| *b = !*b);
        let f = Fixture::new();
        assert!(matches!(
            unpack_compressed_layer(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                &bad[..],
                &f.layer
            ),
            Err(UnpackError::Read(_) | UnpackError::Io { .. })
        ));
    }

    #[test]
    fn destination_must_be_an_empty_directory() {
        let f = Fixture::new();
        let tar = sample_tar();
        assert!(matches!(
            unpack_layer(&tar[..], &f.outside),
            Err(UnpackError::DestinationNotEmpty(_))
        ));
        assert!(matches!(
            unpack_layer(&tar[..], &f.outside.join("secret")),
            Err(UnpackError::Destination { .. })
        ));
    }

    #[test]
    fn pax_times_parse() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(t("12"), Some((12, 0)));
        assert_eq!(t("12.5"), Some((12, 500_000_000)));
        assert_eq!(t("12.0000000019"), Some((12, 1)));
        assert_eq!(t("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        for bad in ["", ".5", "1.x", "abc", "1e9", "--1"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }
}
