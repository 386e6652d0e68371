//! Small OCI test images, built by this code (tar + gzip + sha256) into one
//! OCI image layout, cached per source version, and pushed to a test
//! [`Registry`]. Nothing is downloaded: binaries come from Debian's busybox
//! packages on this host.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::registry::Registry;

/// Repository namespace of every pushed fixture: `berth-test/<name>:<tag>`
/// (spelled out in [`Fixture::repo`] so it can return `&'static str`).
pub const REPO_PREFIX: &str = "berth-test";

pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// mtime of every tar entry, and `created` of every config: fixed so that
/// digests are the same on every build.
const FIXED_MTIME: u64 = 1_700_000_000;
const CREATED: &str = "2023-11-14T22:13:20Z";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Default root of the unpacked Debian `busybox` (dynamic) package.
const BUSYBOX_DEB_ROOT: &str = "/var/cache/berth/busybox-deb/root";
/// Debian's `busybox-static`.
const BUSYBOX_STATIC: &str = "/bin/busybox";
/// Host libraries the dynamic busybox links, and where they go in the image.
const HOST_LIBS: [(&str, &str); 3] = [
    (
        "/lib/x86_64-linux-gnu/libc.so.6",
        "lib/x86_64-linux-gnu/libc.so.6",
    ),
    (
        "/lib/x86_64-linux-gnu/libresolv.so.2",
        "lib/x86_64-linux-gnu/libresolv.so.2",
    ),
    (
        "/lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    ),
];

/// Users of every busybox-based image. uid 1003 is left out on purpose:
/// `User: "1003:1003"` names ids with no passwd entry.
const ETC_PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
www-data:x:33:33:www-data:/var/www:/bin/false\n\
user1002:x:1002:1002:user1002:/home/user1002:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// user1002 is also in `users` (100) and `extra` (2000), so tests can check
/// supplementary groups taken from /etc/group.
const ETC_GROUP: &str = "root:x:0:\n\
daemon:x:1:\n\
www-data:x:33:\n\
users:x:100:user1002\n\
user1002:x:1002:\n\
extra:x:2000:user1002,www-data\n\
nogroup:x:65534:\n";

/// One image (or multi-platform index) of the fixture layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fixture {
    /// Dynamic busybox with its libs, /etc/passwd, /etc/group, applet
    /// symlinks in /bin; CMD ["sh"]. /etc/berth-release says "busybox latest".
    BusyboxLatest,
    /// Same base layer, /etc/berth-release "busybox 1.0".
    Busybox10,
    /// Same base layer, /etc/berth-release "busybox 1.1".
    Busybox11,
    /// busybox-static alone in /bin with applet symlinks; one layer.
    Static,
    /// Busybox base + 3 layers: whiteout of /a/deleted.txt, opaque /opq,
    /// an overwritten file and a hard link; see `layers_image` for the files.
    Layers,
    /// Busybox base, config User "www-data" (uid 33, gid 33).
    UserWwwData,
    /// Busybox base, config User "1002" (user1002; groups 1002, 100, 2000).
    User1002,
    /// Busybox base, config User "1003:1003" (no passwd entry).
    User1003,
    /// Env, WorkingDir, Entrypoint, Cmd, ExposedPorts, Volumes, StopSignal,
    /// Labels; see `config_image`.
    Config,
    /// /bin/suid-busybox (04755, 0:0) and /usr/local/bin/capfile carrying
    /// security.capability = cap_net_raw+ep.
    Caps,
    /// OCI index: linux/amd64 (busybox base + /etc/berth-arch "amd64") and
    /// linux/arm64 (/etc/berth-arch "arm64" only).
    MultiArch,
    /// zstd-compressed layers: the busybox base (same diff_id as the gzip
    /// one, other blob) and /etc/berth-release "busybox zstd".
    Zstd,
}

impl Fixture {
    pub const ALL: [Fixture; 12] = [
        Fixture::BusyboxLatest,
        Fixture::Busybox10,
        Fixture::Busybox11,
        Fixture::Static,
        Fixture::Layers,
        Fixture::UserWwwData,
        Fixture::User1002,
        Fixture::User1003,
        Fixture::Config,
        Fixture::Caps,
        Fixture::MultiArch,
        Fixture::Zstd,
    ];

    /// Repository, e.g. "berth-test/busybox".
    pub fn repo(self) -> &'static str {
        match self {
            Fixture::BusyboxLatest | Fixture::Busybox10 | Fixture::Busybox11 => {
                "berth-test/busybox"
            }
            Fixture::Static => "berth-test/static",
            Fixture::Layers => "berth-test/layers",
            Fixture::UserWwwData | Fixture::User1002 | Fixture::User1003 => "berth-test/user",
            Fixture::Config => "berth-test/config",
            Fixture::Caps => "berth-test/caps",
            Fixture::MultiArch => "berth-test/multiarch",
            Fixture::Zstd => "berth-test/zstd",
        }
    }

    /// Tag, e.g. "latest".
    pub fn tag(self) -> &'static str {
        match self {
            Fixture::Busybox10 => "1.0",
            Fixture::Busybox11 => "1.1",
            Fixture::UserWwwData => "www-data",
            Fixture::User1002 => "1002",
            Fixture::User1003 => "1003-1003",
            _ => "latest",
        }
    }

    /// "berth-test/busybox:latest".
    pub fn repo_tag(self) -> String {
        format!("{}:{}", self.repo(), self.tag())
    }

    /// The image's ref name in the layout (its `org.opencontainers.image.ref.name`),
    /// e.g. "busybox:latest": the repository without the prefix, and the tag.
    pub fn layout_ref(self) -> String {
        let name = self.repo()[REPO_PREFIX.len()..].trim_start_matches('/');
        format!("{name}:{}", self.tag())
    }

    /// Whether the fixture is a multi-platform index rather than one image.
    pub fn is_index(self) -> bool {
        self == Fixture::MultiArch
    }
}

/// What the layout holds for one fixture, read back from its blobs.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub fixture: Fixture,
    /// Media type of what the tag points at: manifest or index.
    pub media_type: String,
    /// Digest of that manifest or index ("sha256:…"): what a registry
    /// reports as Docker-Content-Digest, and the repo digest.
    pub manifest_digest: String,
    pub manifest_size: u64,
    /// Config digest, i.e. the image id. For an index: of its linux/amd64 image.
    pub config_digest: String,
    /// Layer blob digests (compressed), bottom first. Index: linux/amd64's.
    pub layers: Vec<String>,
    /// Uncompressed layer digests from config.rootfs.diff_ids.
    pub diff_ids: Vec<String>,
    /// The whole image config JSON. Index: linux/amd64's.
    pub config: Value,
    /// For an index, each platform's image; empty otherwise.
    pub platforms: Vec<PlatformImage>,
}

/// One image of a multi-platform index.
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub os: String,
    pub architecture: String,
    pub manifest_digest: String,
    pub config_digest: String,
}

/// A fixture pushed to a registry.
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub fixture: Fixture,
    /// Full reference to pull: "127.0.0.1:PORT/berth-test/busybox:latest".
    pub reference: String,
    /// Manifest (or index) digest as the registry stored it.
    pub manifest_digest: String,
    /// Image id (config digest); for an index, of its linux/amd64 image.
    pub config_digest: String,
}

impl PushedImage {
    /// "127.0.0.1:PORT/berth-test/busybox@sha256:…".
    pub fn digest_reference(&self) -> String {
        let repo_part = self
            .reference
            .rsplit_once(':')
            .map_or(self.reference.as_str(), |(r, _)| r);
        format!("{repo_part}@{}", self.manifest_digest)
    }
}

struct Built {
    dir: PathBuf,
    infos: BTreeMap<Fixture, ImageInfo>,
}

static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();

fn built() -> &'static Built {
    match BUILT.get_or_init(build_cached) {
        Ok(b) => b,
        Err(e) => panic!("building fixture images failed: {e}"),
    }
}

/// The OCI layout holding every fixture, built on first use (once per source
/// version and host binaries; later processes reuse it). Panics with the
/// reason if it cannot be built.
pub fn layout() -> &'static Path {
    &built().dir
}

/// Digests and config of a fixture, read from the layout.
pub fn info(f: Fixture) -> &'static ImageInfo {
    &built().infos[&f]
}

/// Push one fixture as `<registry>/<repo>:<tag>`. Fails if the registry
/// stored a different digest than the layout holds.
pub fn push(registry: &Registry, f: Fixture) -> Result<PushedImage, String> {
    let info = info(f);
    let digest = registry.push(layout(), &f.layout_ref(), &f.repo_tag())?;
    if digest != info.manifest_digest {
        return Err(format!(
            "push {}: registry stored {digest}, layout has {}",
            f.repo_tag(),
            info.manifest_digest
        ));
    }
    Ok(PushedImage {
        fixture: f,
        reference: format!("{}/{}", registry.addr(), f.repo_tag()),
        manifest_digest: digest,
        config_digest: info.config_digest.clone(),
    })
}

/// Push every fixture of [`Fixture::ALL`]. Two skopeo processes at a time:
/// pushes mostly wait on round trips, and the machine has two cores.
pub fn push_all(registry: &Registry) -> Result<HashMap<Fixture, PushedImage>, String> {
    layout(); // build before the threads start, so a failure panics here
    let results: Vec<Result<PushedImage, String>> = std::thread::scope(|s| {
        let (even, odd): (Vec<_>, Vec<_>) = Fixture::ALL
            .iter()
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        let handles: Vec<_> = [even, odd]
            .into_iter()
            .map(|half| {
                s.spawn(move || {
                    half.into_iter()
                        .map(|(_, f)| push(registry, *f))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("push thread panicked"))
            .collect()
    });
    let mut out = HashMap::new();
    for r in results {
        let p = r?;
        out.insert(p.fixture, p);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Cache

/// Where built layouts live: cargo's per-target scratch dir, so `cargo clean`
/// removes them.
fn cache_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Inputs of the build, read once: binaries from the host.
struct Inputs {
    busybox: Vec<u8>,
    busybox_applets: Vec<String>,
    libs: Vec<(&'static str, Vec<u8>)>,
    busybox_static: Vec<u8>,
    static_applets: Vec<String>,
}

impl Inputs {
    fn read() -> Result<Inputs, String> {
        let root = std::env::var_os("BERTH_BUSYBOX_ROOT")
            .map_or_else(|| PathBuf::from(BUSYBOX_DEB_ROOT), PathBuf::from);
        let busybox_path = root.join("bin/busybox");
        let busybox = fs::read(&busybox_path).map_err(|e| {
            format!(
                "read dynamic busybox {} (unpack Debian's busybox .deb there, or set BERTH_BUSYBOX_ROOT): {e}",
                busybox_path.display()
            )
        })?;
        let mut libs = Vec::new();
        for (host, in_image) in HOST_LIBS {
            // fs::read follows symlinks (/lib64/ld-linux-x86-64.so.2 is one).
            let data = fs::read(host).map_err(|e| format!("read host library {host}: {e}"))?;
            libs.push((in_image, data));
        }
        let busybox_static = fs::read(BUSYBOX_STATIC)
            .map_err(|e| format!("read {BUSYBOX_STATIC} (apt-get install busybox-static): {e}"))?;
        Ok(Inputs {
            busybox_applets: applets(&busybox_path)?,
            static_applets: applets(Path::new(BUSYBOX_STATIC))?,
            busybox,
            libs,
            busybox_static,
        })
    }

    /// Hash of everything the layout is made from, this source included.
    fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(include_str!("fixtures.rs"));
        for part in [&self.busybox, &self.busybox_static] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        for (name, data) in &self.libs {
            h.update(name);
            h.update((data.len() as u64).to_le_bytes());
            h.update(data);
        }
        // The compressors' own output: a different flate2 backend (features
        // unify across the build) or zstd version gives other bytes.
        h.update(compressor_fingerprint());
        hex(&h.finalize())[..16].to_string()
    }
}

/// Gzip and zstd output of a fixed sample, as the layers are compressed.
fn compressor_fingerprint() -> Vec<u8> {
    let sample: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 % 61)
        .collect();
    let mut out = Vec::new();
    for level in [flate2::Compression::fast(), flate2::Compression::default()] {
        let mut gz = flate2::GzBuilder::new().write(Vec::new(), level);
        if gz.write_all(&sample).is_ok()
            && let Ok(blob) = gz.finish()
        {
            out.extend_from_slice(&blob);
        }
    }
    if let Ok(blob) = zstd::bulk::compress(&sample, 3) {
        out.extend_from_slice(&blob);
    }
    out
}

/// The applets a busybox binary provides, sorted, as `--list` prints them.
fn applets(busybox: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| format!("run {} --list: {e}", busybox.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --list failed: {}",
            busybox.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(String::from)
        .collect();
    list.sort();
    list.dedup();
    Ok(list)
}

/// Build the fixture layout afresh into `dir` (which must be empty or
/// missing), bypassing the cache: for tests of determinism or of layout
/// handling that want their own copy.
pub fn build_into(dir: &Path) -> Result<(), String> {
    build_layout(dir, &Inputs::read()?)
}

fn build_cached() -> Result<Built, String> {
    let inputs = Inputs::read()?;
    let dir = cache_root().join(format!("berth-fixtures-{}", inputs.key()));
    if !dir.join("index.json").exists() {
        build_atomically(&dir, |tmp| build_layout(tmp, &inputs))?;
    }
    let infos = read_infos(&dir)?;
    Ok(Built { dir, infos })
}

/// Build into a private temporary dir, then rename it into place, so
/// concurrent test processes never see a half-written layout.
fn build_atomically(
    dir: &Path,
    build: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let parent = dir.parent().ok_or("cache dir has no parent")?;
    fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".berth-fixtures-tmp-")
        .tempdir_in(parent)
        .map_err(|e| format!("tempdir in {}: {e}", parent.display()))?;
    build(tmp.path())?;
    match fs::rename(tmp.path(), dir) {
        Ok(()) => Ok(()),
        // Another process won the race; its layout is identical.
        Err(_) if dir.join("index.json").exists() => Ok(()),
        Err(e) => Err(format!("rename layout into {}: {e}", dir.display())),
    }
    // `tmp` (if still there) is removed on drop.
}

// ---------------------------------------------------------------------------
// Layer contents

/// One tar entry, in a form that sorts and serializes deterministically.
#[derive(Clone, Debug)]
struct Entry {
    path: String,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Clone, Debug)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    Hardlink(String),
}

impl Entry {
    fn dir(path: &str, mode: u32) -> Entry {
        Entry::new(path, Kind::Dir, mode)
    }
    fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Entry {
        Entry::new(path, Kind::File(data.into()), mode)
    }
    fn symlink(path: &str, target: &str) -> Entry {
        Entry::new(path, Kind::Symlink(target.into()), 0o777)
    }
    fn hardlink(path: &str, target: &str) -> Entry {
        Entry::new(path, Kind::Hardlink(target.into()), 0o644)
    }
    fn new(path: &str, kind: Kind, mode: u32) -> Entry {
        Entry {
            path: path.trim_end_matches('/').to_string(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            xattrs: Vec::new(),
        }
    }
    fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }
    fn xattr(mut self, key: &str, value: &[u8]) -> Entry {
        self.xattrs.push((key.into(), value.into()));
        self
    }
}

/// An uncompressed layer tar of `entries`, sorted by path (a parent sorts
/// before its children; callers name hard-link targets to sort before links).
fn layer_tar(mut entries: Vec<Entry>) -> Result<Vec<u8>, String> {
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let mut b = tar::Builder::new(Vec::new());
    for e in &entries {
        append_entry(&mut b, e).map_err(|err| format!("tar entry {}: {err}", e.path))?;
    }
    b.into_inner().map_err(|e| format!("finish tar: {e}"))
}

fn append_entry(b: &mut tar::Builder<Vec<u8>>, e: &Entry) -> std::io::Result<()> {
    if !e.xattrs.is_empty() {
        // PAX records `SCHILY.xattr.<name>`, as GNU tar and Docker write them.
        let keys: Vec<String> = e
            .xattrs
            .iter()
            .map(|(k, _)| format!("SCHILY.xattr.{k}"))
            .collect();
        b.append_pax_extensions(
            keys.iter()
                .map(String::as_str)
                .zip(e.xattrs.iter().map(|(_, v)| v.as_slice())),
        )?;
    }
    let mut h = tar::Header::new_ustar();
    h.set_mode(e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_mtime(FIXED_MTIME);
    match &e.kind {
        Kind::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, format!("{}/", e.path), std::io::empty())
        }
        Kind::File(data) => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, &e.path, data.as_slice())
        }
        Kind::Symlink(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &e.path, target)
        }
        Kind::Hardlink(target) => {
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, &e.path, target)
        }
    }
}

/// Directories every busybox-based root has.
fn skeleton() -> Vec<Entry> {
    vec![
        Entry::dir("bin", 0o755),
        Entry::dir("dev", 0o755),
        Entry::dir("etc", 0o755),
        Entry::file("etc/passwd", 0o644, ETC_PASSWD),
        Entry::file("etc/group", 0o644, ETC_GROUP),
        Entry::dir("home", 0o755),
        Entry::dir("home/user1002", 0o750).owner(1002, 1002),
        Entry::dir("proc", 0o755),
        Entry::dir("root", 0o700),
        Entry::dir("sys", 0o755),
        Entry::dir("tmp", 0o1777),
        Entry::dir("usr", 0o755),
        Entry::dir("usr/bin", 0o755),
        Entry::dir("usr/local", 0o755),
        Entry::dir("usr/local/bin", 0o755),
        Entry::dir("var", 0o755),
        Entry::dir("var/www", 0o755).owner(33, 33),
    ]
}

/// /bin/busybox plus a relative symlink per applet, and /usr/bin/env for
/// `#!/usr/bin/env` scripts.
fn busybox_entries(binary: &[u8], applets: &[String]) -> Vec<Entry> {
    let mut v = vec![Entry::file("bin/busybox", 0o755, binary)];
    v.extend(
        applets
            .iter()
            .map(|a| Entry::symlink(&format!("bin/{a}"), "busybox")),
    );
    v.push(Entry::symlink("usr/bin/env", "/bin/busybox"));
    v
}

/// The shared bottom layer of the dynamic-busybox images.
fn busybox_base(inputs: &Inputs) -> Vec<Entry> {
    let mut v = skeleton();
    v.extend(busybox_entries(&inputs.busybox, &inputs.busybox_applets));
    v.push(Entry::dir("lib", 0o755));
    v.push(Entry::dir("lib/x86_64-linux-gnu", 0o755));
    v.push(Entry::dir("lib64", 0o755));
    for (path, data) in &inputs.libs {
        v.push(Entry::file(path, 0o755, data.as_slice()));
    }
    // Absolute, as on Debian: the loader resolves it inside the container root.
    v.push(Entry::symlink(
        "lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    ));
    v
}

/// VFS_CAP_REVISION_2 `security.capability` value for cap_net_raw+ep.
fn cap_net_raw_ep() -> [u8; 20] {
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x1;
    const CAP_NET_RAW: u32 = 13;
    let words = [
        VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE,
        1 << CAP_NET_RAW, // permitted, caps 0..31
        0,                // inheritable, caps 0..31
        0,                // permitted, caps 32..63
        0,                // inheritable, caps 32..63
    ];
    let mut out = [0u8; 20];
    for (i, w) in words.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    out
}

// ---------------------------------------------------------------------------
// Blobs and the layout

/// A layer ready for a manifest.
#[derive(Clone)]
struct LayerBlob {
    media_type: &'static str,
    digest: String,
    size: u64,
    diff_id: String,
}

/// A descriptor as it goes into a manifest or index.
#[derive(Clone)]
struct Desc {
    media_type: &'static str,
    digest: String,
    size: u64,
}

impl Desc {
    fn json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// Writes blobs and remembers tagged descriptors for index.json.
struct LayoutWriter {
    dir: PathBuf,
    tags: Vec<Value>,
    gzip_level: flate2::Compression,
}

impl LayoutWriter {
    fn new(dir: &Path, gzip_level: flate2::Compression) -> Result<LayoutWriter, String> {
        fs::create_dir_all(dir.join("blobs/sha256"))
            .map_err(|e| format!("mkdir blobs in {}: {e}", dir.display()))?;
        Ok(LayoutWriter {
            dir: dir.to_path_buf(),
            tags: Vec::new(),
            gzip_level,
        })
    }

    fn put_blob(&self, data: &[u8]) -> Result<(String, u64), String> {
        let hex = sha256_hex(data);
        let path = self.dir.join("blobs/sha256").join(&hex);
        if !path.exists() {
            fs::write(&path, data).map_err(|e| format!("write blob {}: {e}", path.display()))?;
        }
        Ok((format!("sha256:{hex}"), data.len() as u64))
    }

    fn layer(&self, entries: Vec<Entry>) -> Result<LayerBlob, String> {
        let tar = layer_tar(entries)?;
        self.layer_from_tar(&tar)
    }

    fn layer_from_tar(&self, tar: &[u8]) -> Result<LayerBlob, String> {
        let diff_id = format!("sha256:{}", sha256_hex(tar));
        // GzBuilder writes mtime 0 and no file name: the same bytes every time.
        let mut gz = flate2::GzBuilder::new().write(Vec::new(), self.gzip_level);
        gz.write_all(tar).map_err(|e| format!("gzip layer: {e}"))?;
        let blob = gz.finish().map_err(|e| format!("gzip layer: {e}"))?;
        let (digest, size) = self.put_blob(&blob)?;
        Ok(LayerBlob {
            media_type: MT_LAYER_GZIP,
            digest,
            size,
            diff_id,
        })
    }

    /// Like `layer`, compressed with zstd (level 3, no checksum: the same
    /// bytes for the same zstd version).
    fn zstd_layer(&self, entries: Vec<Entry>) -> Result<LayerBlob, String> {
        let tar = layer_tar(entries)?;
        let diff_id = format!("sha256:{}", sha256_hex(&tar));
        let blob = zstd::bulk::compress(&tar, 3).map_err(|e| format!("zstd layer: {e}"))?;
        let (digest, size) = self.put_blob(&blob)?;
        Ok(LayerBlob {
            media_type: MT_LAYER_ZSTD,
            digest,
            size,
            diff_id,
        })
    }

    /// Write config and manifest of an image; returns the manifest descriptor.
    fn image(&self, arch: &str, layers: &[&LayerBlob], config: Value) -> Result<Desc, String> {
        let history: Vec<Value> = layers
            .iter()
            .enumerate()
            .map(|(i, _)| json!({"created": CREATED, "created_by": format!("berth fixtures: layer {i}")}))
            .collect();
        let config_json = json!({
            "created": CREATED,
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
            "history": history,
        });
        let config_bytes = to_json(&config_json)?;
        let (config_digest, config_size) = self.put_blob(&config_bytes)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": Desc { media_type: MT_CONFIG, digest: config_digest, size: config_size }.json(),
            "layers": layers
                .iter()
                .map(|l| Desc { media_type: l.media_type, digest: l.digest.clone(), size: l.size }.json())
                .collect::<Vec<_>>(),
        });
        let (digest, size) = self.put_blob(&to_json(&manifest)?)?;
        Ok(Desc {
            media_type: MT_MANIFEST,
            digest,
            size,
        })
    }

    /// Write an index of (os, arch, manifest) entries.
    fn index(&self, images: &[(&str, &str, &Desc)]) -> Result<Desc, String> {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": images
                .iter()
                .map(|(os, arch, d)| {
                    let mut v = d.json();
                    v["platform"] = json!({"os": os, "architecture": arch});
                    v
                })
                .collect::<Vec<_>>(),
        });
        let (digest, size) = self.put_blob(&to_json(&index)?)?;
        Ok(Desc {
            media_type: MT_INDEX,
            digest,
            size,
        })
    }

    fn tag(&mut self, layout_ref: &str, d: &Desc) {
        let mut v = d.json();
        v["annotations"] = json!({ (REF_ANNOTATION): layout_ref });
        self.tags.push(v);
    }

    fn finish(self) -> Result<(), String> {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": self.tags,
        });
        fs::write(
            self.dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(|e| format!("write oci-layout: {e}"))?;
        fs::write(self.dir.join("index.json"), to_json(&index)?)
            .map_err(|e| format!("write index.json: {e}"))
    }
}

/// The config of a plain busybox image, with `User` set.
fn busybox_config(user: &str) -> Value {
    json!({"User": user, "Env": [PATH_ENV], "Cmd": ["sh"]})
}

fn build_layout(dir: &Path, inputs: &Inputs) -> Result<(), String> {
    let mut w = LayoutWriter::new(dir, flate2::Compression::default())?;
    let base = w.layer(busybox_base(inputs))?;

    for (f, version) in [
        (Fixture::BusyboxLatest, "latest"),
        (Fixture::Busybox10, "1.0"),
        (Fixture::Busybox11, "1.1"),
    ] {
        let release = w.layer(vec![
            Entry::dir("etc", 0o755),
            Entry::file("etc/berth-release", 0o644, format!("busybox {version}\n")),
        ])?;
        let d = w.image("amd64", &[&base, &release], busybox_config(""))?;
        w.tag(&f.layout_ref(), &d);
    }

    let mut st = skeleton();
    st.extend(busybox_entries(
        &inputs.busybox_static,
        &inputs.static_applets,
    ));
    let st = w.layer(st)?;
    let d = w.image("amd64", &[&st], busybox_config(""))?;
    w.tag(&Fixture::Static.layout_ref(), &d);

    let d = layers_image(&w, &base)?;
    w.tag(&Fixture::Layers.layout_ref(), &d);

    for (f, user) in [
        (Fixture::UserWwwData, "www-data"),
        (Fixture::User1002, "1002"),
        (Fixture::User1003, "1003:1003"),
    ] {
        let d = w.image("amd64", &[&base], busybox_config(user))?;
        w.tag(&f.layout_ref(), &d);
    }

    let d = config_image(&w, &base)?;
    w.tag(&Fixture::Config.layout_ref(), &d);

    let caps = w.layer(vec![
        Entry::dir("bin", 0o755),
        // A real binary, so a test can run `suid-busybox id` as a non-root
        // user and see euid 0 (or not, under no_new_privs).
        Entry::file("bin/suid-busybox", 0o4755, inputs.busybox.as_slice()),
        Entry::dir("usr", 0o755),
        Entry::dir("usr/local", 0o755),
        Entry::dir("usr/local/bin", 0o755),
        Entry::file("usr/local/bin/capfile", 0o755, "#!/bin/sh\necho capfile\n")
            .xattr("security.capability", &cap_net_raw_ep()),
    ])?;
    let d = w.image("amd64", &[&base, &caps], busybox_config(""))?;
    w.tag(&Fixture::Caps.layout_ref(), &d);

    let arch_marker = |arch: &str| {
        w.layer(vec![
            Entry::dir("etc", 0o755),
            Entry::file("etc/berth-arch", 0o644, format!("{arch}\n")),
        ])
    };
    let amd64_marker = arch_marker("amd64")?;
    let arm64_marker = arch_marker("arm64")?;
    let amd64 = w.image("amd64", &[&base, &amd64_marker], busybox_config(""))?;
    let arm64 = w.image("arm64", &[&arm64_marker], busybox_config(""))?;
    let d = w.index(&[("linux", "amd64", &amd64), ("linux", "arm64", &arm64)])?;
    w.tag(&Fixture::MultiArch.layout_ref(), &d);

    let zbase = w.zstd_layer(busybox_base(inputs))?;
    let zrelease = w.zstd_layer(vec![
        Entry::dir("etc", 0o755),
        Entry::file("etc/berth-release", 0o644, "busybox zstd\n"),
    ])?;
    let d = w.image("amd64", &[&zbase, &zrelease], busybox_config(""))?;
    w.tag(&Fixture::Zstd.layout_ref(), &d);

    w.finish()
}

/// Base + three layers exercising overlay semantics:
/// 1. /a/deleted.txt, /a/kept.txt ("layer1"), /opq/old.txt, /opq/sub/old2.txt,
///    /data/file.txt;
/// 2. whiteout a/.wh.deleted.txt, opaque marker opq/.wh..wh..opq, opq/new.txt;
/// 3. /a/kept.txt overwritten ("layer3"), /data/hard.txt hard link to
///    /data/file.txt (same layer), /c/three.txt.
///
/// Result: /a has only kept.txt ("layer3"); /opq has only new.txt.
fn layers_image(w: &LayoutWriter, base: &LayerBlob) -> Result<Desc, String> {
    let l1 = w.layer(vec![
        Entry::dir("a", 0o755),
        Entry::file("a/deleted.txt", 0o644, "deleted\n"),
        Entry::file("a/kept.txt", 0o644, "layer1\n"),
        Entry::dir("opq", 0o755),
        Entry::file("opq/old.txt", 0o644, "old\n"),
        Entry::dir("opq/sub", 0o755),
        Entry::file("opq/sub/old2.txt", 0o644, "old2\n"),
    ])?;
    let l2 = w.layer(vec![
        Entry::dir("a", 0o755),
        Entry::file("a/.wh.deleted.txt", 0o644, ""),
        Entry::dir("opq", 0o755),
        Entry::file("opq/.wh..wh..opq", 0o644, ""),
        Entry::file("opq/new.txt", 0o644, "new\n"),
    ])?;
    let l3 = w.layer(vec![
        Entry::dir("a", 0o755),
        Entry::file("a/kept.txt", 0o644, "layer3\n"),
        Entry::dir("c", 0o755),
        Entry::file("c/three.txt", 0o644, "three\n"),
        Entry::dir("data", 0o755),
        // "file.txt" sorts before "hard.txt": the link target comes first.
        Entry::file("data/file.txt", 0o644, "linked\n"),
        Entry::hardlink("data/hard.txt", "data/file.txt"),
    ])?;
    w.image("amd64", &[base, &l1, &l2, &l3], busybox_config(""))
}

/// Base + /srv/app and /data/seed.txt, with a config using every field the
/// CRI maps: Env, WorkingDir, Entrypoint, Cmd, ExposedPorts, Volumes,
/// StopSignal, Labels. Run as is, it prints "config-rich bar" and sleeps.
fn config_image(w: &LayoutWriter, base: &LayerBlob) -> Result<Desc, String> {
    let l = w.layer(vec![
        Entry::dir("data", 0o755),
        Entry::file("data/seed.txt", 0o644, "seed\n"),
        Entry::dir("srv", 0o755),
        Entry::dir("srv/app", 0o755),
        Entry::file("srv/app/README", 0o644, "config-rich fixture\n"),
    ])?;
    let config = json!({
        "User": "",
        "Env": [PATH_ENV, "FOO=bar", "EMPTY=", "WITH_EQUALS=a=b=c"],
        "WorkingDir": "/srv/app",
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo config-rich $FOO; exec sleep 3600"],
        "ExposedPorts": {"8080/tcp": {}, "5353/udp": {}},
        "Volumes": {"/data": {}},
        "StopSignal": "SIGUSR1",
        "Labels": {"org.example.berth.fixture": "config", "berth.test/owner": "fixtures"},
    });
    w.image("amd64", &[base, &l], config)
}

// ---------------------------------------------------------------------------
// Reading the layout back

fn read_json(dir: &Path, what: &str, path: &Path) -> Result<Value, String> {
    let data = fs::read(path).map_err(|e| format!("read {what} {}: {e}", path.display()))?;
    serde_json::from_slice(&data)
        .map_err(|e| format!("parse {what} {}: {e}", path.display()))
        .map_err(|e| format!("{e} (layout {})", dir.display()))
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {digest:?} is not sha256"))?;
    Ok(dir.join("blobs/sha256").join(hex))
}

fn str_field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a str, String> {
    v[key]
        .as_str()
        .ok_or_else(|| format!("{what}: no string field {key:?}"))
}

/// config digest, layer digests, diff_ids, config of one manifest.
fn read_image(
    dir: &Path,
    manifest_digest: &str,
) -> Result<(String, Vec<String>, Vec<String>, Value), String> {
    let m = read_json(dir, "manifest", &blob_path(dir, manifest_digest)?)?;
    let config_digest = str_field(&m["config"], "digest", "manifest config")?.to_string();
    let layers = m["layers"]
        .as_array()
        .ok_or("manifest without layers")?
        .iter()
        .map(|l| str_field(l, "digest", "layer").map(String::from))
        .collect::<Result<Vec<_>, _>>()?;
    let config = read_json(dir, "config", &blob_path(dir, &config_digest)?)?;
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or("config without rootfs.diff_ids")?
        .iter()
        .map(|d| d.as_str().map(String::from).ok_or("diff_id not a string"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((config_digest, layers, diff_ids, config))
}

fn read_infos(dir: &Path) -> Result<BTreeMap<Fixture, ImageInfo>, String> {
    let index = read_json(dir, "index", &dir.join("index.json"))?;
    let tags = index["manifests"]
        .as_array()
        .ok_or("index.json without manifests")?;
    let mut out = BTreeMap::new();
    for f in Fixture::ALL {
        let want = f.layout_ref();
        let desc = tags
            .iter()
            .find(|d| d["annotations"][REF_ANNOTATION].as_str() == Some(want.as_str()))
            .ok_or_else(|| format!("layout {} has no {want}", dir.display()))?;
        let media_type = str_field(desc, "mediaType", &want)?.to_string();
        let manifest_digest = str_field(desc, "digest", &want)?.to_string();
        let manifest_size = desc["size"].as_u64().ok_or("descriptor without size")?;
        let mut platforms = Vec::new();
        let image_digest = if media_type == MT_INDEX {
            let idx = read_json(dir, "index", &blob_path(dir, &manifest_digest)?)?;
            for m in idx["manifests"]
                .as_array()
                .ok_or("index without manifests")?
            {
                let digest = str_field(m, "digest", "index entry")?.to_string();
                let (config_digest, ..) = read_image(dir, &digest)?;
                platforms.push(PlatformImage {
                    os: str_field(&m["platform"], "os", "platform")?.to_string(),
                    architecture: str_field(&m["platform"], "architecture", "platform")?
                        .to_string(),
                    manifest_digest: digest,
                    config_digest,
                });
            }
            platforms
                .iter()
                .find(|p| p.architecture == "amd64")
                .map(|p| p.manifest_digest.clone())
                .ok_or("index without linux/amd64")?
        } else {
            manifest_digest.clone()
        };
        let (config_digest, layers, diff_ids, config) = read_image(dir, &image_digest)?;
        out.insert(
            f,
            ImageInfo {
                fixture: f,
                media_type,
                manifest_digest,
                manifest_size,
                config_digest,
                layers,
                diff_ids,
                config,
                platforms,
            },
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Big image for benchmarks

/// Ref name of the big image in [`big_layout`].
pub const BIG_LAYOUT_REF: &str = "big:latest";

/// An OCI layout with one ~100 MB image of 5 layers: the busybox base, then
/// four layers of one 25 MiB file each of pseudo-random bytes (xorshift, fixed
/// seeds: incompressible, yet the same digests on every build). Cached like
/// [`layout`]; the first build takes a few seconds. Not pushed by `push_all`:
/// push it with `registry.push(big_layout()?, BIG_LAYOUT_REF, "berth-test/big:latest")`.
pub fn big_layout() -> Result<&'static Path, String> {
    static BIG: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIG.get_or_init(|| {
        let inputs = Inputs::read()?;
        let dir = cache_root().join(format!("berth-fixtures-big-{}", inputs.key()));
        if !dir.join("index.json").exists() {
            build_atomically(&dir, |tmp| {
                // Fast gzip: the data does not compress anyway.
                let mut w = LayoutWriter::new(tmp, flate2::Compression::fast())?;
                let mut layers = vec![w.layer(busybox_base(&inputs))?];
                for i in 0..4u64 {
                    let data = prng_bytes(0x9e37_79b9_7f4a_7c15 ^ (i + 1), 25 << 20);
                    layers.push(w.layer(vec![
                        Entry::dir("big", 0o755),
                        Entry::file(&format!("big/blob{i}.bin"), 0o644, data),
                    ])?);
                }
                let refs: Vec<&LayerBlob> = layers.iter().collect();
                let d = w.image("amd64", &refs, busybox_config(""))?;
                w.tag(BIG_LAYOUT_REF, &d);
                w.finish()
            })?;
        }
        Ok(dir)
    })
    .as_deref()
    .map_err(Clone::clone)
}

/// `len` bytes from xorshift64* seeded with `seed`.
fn prng_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// Small helpers

fn to_json(v: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| format!("serialize JSON: {e}"))
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
