//! Container Device Interface (CDI): devices named `vendor.com/class=name`,
//! defined by vendors' spec files (JSON or YAML, cdiVersion up to 0.8.0) in
//! the configured dirs, and resolved into the edits they make to a container:
//! env, device nodes, bind mounts and extra groups. OCI hooks and Intel RDT
//! edits are refused: berth runs no hooks, and a device set up without them
//! would look present but not work.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::container::{Mount, Propagation, merge_env};
use super::devices::{self, DeviceNode};

/// Annotations kubelet's device plugins use to ask for CDI devices: the value
/// is a comma-separated list of fully qualified names.
pub const ANNOTATION_PREFIX: &str = "cdi.k8s.io/";

/// The newest spec version this module understands.
const MAX_VERSION: (u32, u32, u32) = (0, 8, 0);

#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("CDI device name {name:?} is not of the form vendor.com/class=name: {reason}")]
    BadName { name: String, reason: String },
    #[error("unknown CDI device {name}: no spec file in {dirs} defines it{skipped}")]
    UnknownDevice {
        name: String,
        dirs: String,
        /// Spec files that could not be read, which may be the cause.
        skipped: String,
    },
    #[error("CDI device {name} is defined twice in one dir: {first} and {second}")]
    Conflict {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "CDI device {device} needs the OCI hook {hook} ({path}), which berth does not run, so the device cannot be set up"
    )]
    Hook {
        device: String,
        hook: String,
        path: String,
    },
    #[error("CDI device {device}: {message}")]
    BadEdit { device: String, message: String },
}

/// A spec file, as much of it as berth uses.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    cdi_version: String,
    kind: String,
    #[serde(default)]
    devices: Vec<SpecDevice>,
    #[serde(default)]
    container_edits: ContainerEdits,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecDevice {
    name: String,
    #[serde(default)]
    container_edits: ContainerEdits,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ContainerEdits {
    env: Vec<String>,
    device_nodes: Vec<DeviceNodeEdit>,
    hooks: Vec<HookEdit>,
    mounts: Vec<MountEdit>,
    additional_gids: Vec<u32>,
    intel_rdt: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct DeviceNodeEdit {
    path: String,
    host_path: String,
    #[serde(rename = "type")]
    kind: String,
    major: Option<u64>,
    minor: Option<u64>,
    file_mode: Option<u32>,
    permissions: String,
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct HookEdit {
    hook_name: String,
    path: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct MountEdit {
    host_path: String,
    container_path: String,
    options: Vec<String>,
    #[serde(rename = "type")]
    kind: String,
}

/// What the requested devices do to a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    pub env: Vec<(String, String)>,
    pub devices: Vec<DeviceNode>,
    pub mounts: Vec<Mount>,
    pub gids: Vec<u32>,
}

impl Edits {
    /// Adds the edits to a container's device nodes (replacing one at the
    /// same path), env (overriding its values) and supplemental groups
    /// (kept sorted, as they are reported).
    pub fn merge_into(
        &self,
        nodes: &mut Vec<DeviceNode>,
        env: &mut Vec<String>,
        groups: &mut Vec<u32>,
    ) {
        nodes.retain(|n| {
            !self
                .devices
                .iter()
                .any(|c| c.container_path == n.container_path)
        });
        nodes.extend(self.devices.iter().cloned());
        *env = merge_env(env, &self.env);
        groups.extend(&self.gids);
        groups.sort_unstable();
        groups.dedup();
    }
}

/// The devices a container asks for: its CDI device list, then the names in
/// its `cdi.k8s.io/` annotations, each once.
pub fn requested(
    cdi_devices: &[String],
    annotations: &BTreeMap<String, String>,
) -> Result<Vec<String>, CdiError> {
    let from_annotations = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .flat_map(|(_, v)| v.split(',').map(str::trim).filter(|n| !n.is_empty()));
    let mut out: Vec<String> = Vec::new();
    for name in cdi_devices
        .iter()
        .map(String::as_str)
        .chain(from_annotations)
    {
        parse_name(name)?;
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// Splits `vendor.com/class=name` into kind and device name, checking each
/// part as the CDI spec does.
fn parse_name(qualified: &str) -> Result<(&str, &str), CdiError> {
    let bad = |reason: String| CdiError::BadName {
        name: qualified.to_string(),
        reason,
    };
    let (kind, name) = qualified
        .split_once('=')
        .ok_or_else(|| bad("no '='".to_string()))?;
    check_kind(kind).map_err(bad)?;
    check_part("device name", name, |c| {
        c.is_ascii_alphanumeric() || "_-.:".contains(c)
    })
    .map_err(bad)?;
    Ok((kind, name))
}

/// `vendor.com/class`: a vendor of letters, digits, `_-.` and a class of
/// letters, digits, `_-`, each starting with a letter and ending with a letter
/// or digit.
fn check_kind(kind: &str) -> Result<(), String> {
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| format!("kind {kind:?} has no '/'"))?;
    check_part("vendor", vendor, |c| {
        c.is_ascii_alphanumeric() || "_-.".contains(c)
    })?;
    check_part("class", class, |c| {
        c.is_ascii_alphanumeric() || "_-".contains(c)
    })?;
    if !vendor.starts_with(|c: char| c.is_ascii_alphabetic())
        || !class.starts_with(|c: char| c.is_ascii_alphabetic())
    {
        return Err(format!(
            "vendor and class of {kind:?} must start with a letter"
        ));
    }
    Ok(())
}

fn check_part(what: &str, part: &str, allowed: impl Fn(char) -> bool) -> Result<(), String> {
    if part.is_empty() {
        return Err(format!("empty {what}"));
    }
    if let Some(c) = part.chars().find(|c| !allowed(*c)) {
        return Err(format!("{what} {part:?} contains {c:?}"));
    }
    if !part.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !part.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "{what} {part:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// `0.8.0` as a tuple; a missing patch level counts as 0.
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    parts.next().is_none().then_some((major, minor, patch))
}

/// One spec file, parsed by its extension and checked.
fn load_spec(path: &Path) -> Result<Spec, String> {
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    let spec: Spec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())?
    } else {
        serde_yaml::from_str(&text).map_err(|e| e.to_string())?
    };
    let version = parse_version(&spec.cdi_version)
        .ok_or_else(|| format!("cdiVersion {:?} is not a version", spec.cdi_version))?;
    if version > MAX_VERSION {
        return Err(format!(
            "cdiVersion {} is newer than 0.8.0, the newest berth knows",
            spec.cdi_version
        ));
    }
    check_kind(&spec.kind)?;
    Ok(spec)
}

/// A device found in a spec file: its file, and the spec's own edits with
/// the device's.
struct Found {
    file: PathBuf,
    spec_edits: ContainerEdits,
    device_edits: ContainerEdits,
}

/// Every device of the spec files in `dirs`: a later dir wins over an earlier
/// one; a name defined twice in one dir is a conflict, reported when that
/// device is asked for. Files that cannot be read are returned beside.
fn scan(dirs: &[PathBuf]) -> (HashMap<String, Result<Found, CdiError>>, Vec<String>) {
    // Each device with the index of the dir that defines it.
    let mut devices: HashMap<String, (usize, Result<Found, CdiError>)> = HashMap::new();
    let mut skipped = Vec::new();
    for (index, dir) in dirs.iter().enumerate() {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "json" || e == "yaml" || e == "yml")
            })
            .collect();
        files.sort();
        for file in files {
            let spec = match load_spec(&file) {
                Ok(spec) => spec,
                Err(message) => {
                    tracing::warn!(file = %file.display(), %message, "CDI spec file skipped");
                    skipped.push(format!("{}: {message}", file.display()));
                    continue;
                }
            };
            for device in spec.devices {
                let name = format!("{}={}", spec.kind, device.name);
                let found = Found {
                    file: file.clone(),
                    spec_edits: spec.container_edits.clone(),
                    device_edits: device.container_edits,
                };
                let entry = match devices.remove(&name) {
                    Some((dir, Ok(earlier))) if dir == index => Err(CdiError::Conflict {
                        name: name.clone(),
                        first: earlier.file,
                        second: file.clone(),
                    }),
                    Some((dir, Err(conflict))) if dir == index => Err(conflict),
                    _ => Ok(found),
                };
                devices.insert(name, (index, entry));
            }
        }
    }
    let devices = devices.into_iter().map(|(k, (_, v))| (k, v)).collect();
    (devices, skipped)
}

/// The edits of the devices `names` (fully qualified), read from the spec
/// files in `dirs`. A spec's own edits apply once, however many of its
/// devices are asked for.
pub fn resolve(dirs: &[PathBuf], names: &[String]) -> Result<Edits, CdiError> {
    let mut edits = Edits::default();
    if names.is_empty() {
        return Ok(edits);
    }
    let (mut devices, skipped) = scan(dirs);
    let mut specs_applied: Vec<PathBuf> = Vec::new();
    for name in names {
        let found = devices
            .remove(name)
            .ok_or_else(|| CdiError::UnknownDevice {
                name: name.clone(),
                dirs: dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                skipped: if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" (spec files skipped: {})", skipped.join("; "))
                },
            })??;
        if !specs_applied.contains(&found.file) {
            apply(&mut edits, name, &found.spec_edits)?;
            specs_applied.push(found.file.clone());
        }
        apply(&mut edits, name, &found.device_edits)?;
    }
    Ok(edits)
}

/// Adds one set of edits; a later device node or env entry of the same
/// name replaces an earlier one.
fn apply(out: &mut Edits, device: &str, e: &ContainerEdits) -> Result<(), CdiError> {
    let bad = |message: String| CdiError::BadEdit {
        device: device.to_string(),
        message,
    };
    if let Some(hook) = e.hooks.first() {
        return Err(CdiError::Hook {
            device: device.to_string(),
            hook: hook.hook_name.clone(),
            path: hook.path.clone(),
        });
    }
    if e.intel_rdt.is_some() {
        return Err(bad("Intel RDT edits are not supported".to_string()));
    }
    for kv in &e.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("env entry {kv:?} has no '='")))?;
        out.env.retain(|(key, _)| key != k);
        out.env.push((k.to_string(), v.to_string()));
    }
    for d in &e.device_nodes {
        let node = device_node(d).map_err(bad)?;
        out.devices
            .retain(|n| n.container_path != node.container_path);
        out.devices.push(node);
    }
    for m in &e.mounts {
        out.mounts.push(mount(m).map_err(bad)?);
    }
    for gid in &e.additional_gids {
        if !out.gids.contains(gid) {
            out.gids.push(*gid);
        }
    }
    Ok(())
}

/// A device node edit: the host node at `hostPath` (else `path`), with the
/// type and numbers the edit gives winning over the host's.
fn device_node(d: &DeviceNodeEdit) -> Result<DeviceNode, String> {
    if !d.path.starts_with('/') {
        return Err(format!("device node path {:?} is not absolute", d.path));
    }
    let host = if d.host_path.is_empty() {
        &d.path
    } else {
        &d.host_path
    };
    let access = if d.permissions.is_empty() {
        "rwm"
    } else {
        &d.permissions
    };
    let kind = match d.kind.as_str() {
        "" => None,
        "c" | "u" => Some('c'),
        "b" => Some('b'),
        other => return Err(format!("device node {} has type {other:?}", d.path)),
    };
    let mut node = match (
        devices::node(Path::new(host), &d.path, access),
        kind,
        d.major,
    ) {
        (Ok(node), _, _) => node,
        // The host lacks the node: the edit must say what it is.
        (Err(_), Some(kind), Some(major)) => DeviceNode {
            container_path: d.path.clone(),
            kind,
            major,
            minor: d.minor.unwrap_or(0),
            mode: 0o666,
            uid: 0,
            gid: 0,
            access: access.to_string(),
        },
        (Err(e), _, _) => return Err(e.to_string()),
    };
    if let Some(kind) = kind {
        node.kind = kind;
    }
    if let Some(major) = d.major {
        node.major = major;
    }
    if let Some(minor) = d.minor {
        node.minor = minor;
    }
    if let Some(mode) = d.file_mode {
        node.mode = mode;
    }
    if let Some(uid) = d.uid {
        node.uid = uid;
    }
    if let Some(gid) = d.gid {
        node.gid = gid;
    }
    Ok(node)
}

/// A mount edit as a bind mount of berth's; other mount types are refused.
fn mount(m: &MountEdit) -> Result<Mount, String> {
    if !matches!(m.kind.as_str(), "" | "bind" | "rbind") {
        return Err(format!(
            "mount at {} has type {:?}; only bind mounts are supported",
            m.container_path, m.kind
        ));
    }
    if !m.host_path.starts_with('/') || !m.container_path.starts_with('/') {
        return Err(format!(
            "mount {} -> {} needs absolute paths",
            m.host_path, m.container_path
        ));
    }
    if !Path::new(&m.host_path).exists() {
        return Err(format!("mount source {} does not exist", m.host_path));
    }
    let has = |o: &str| m.options.iter().any(|x| x == o);
    Ok(Mount {
        container_path: m.container_path.clone(),
        host_path: m.host_path.clone(),
        readonly: has("ro"),
        propagation: if has("rshared") || has("shared") {
            Propagation::Bidirectional
        } else if has("rslave") || has("slave") {
            Propagation::HostToContainer
        } else {
            Propagation::Private
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, text: &str) {
        fs::write(dir.join(file), text).expect("write spec");
    }

    #[test]
    fn names_are_checked_as_the_spec_says() {
        for good in ["vendor.com/gpu=0", "nvidia.com/gpu=all", "a-b.io/c_d=x:y.1"] {
            assert!(parse_name(good).is_ok(), "{good}");
        }
        for bad in [
            "vendor.com/gpu",
            "vendor.com=gpu",
            "vendor.com/gpu=",
            "/gpu=0",
            "vendor.com/gpu.x=0",
            "vendor.com/gpu=-0",
            "1vendor.com/gpu=0",
        ] {
            assert!(
                matches!(parse_name(bad), Err(CdiError::BadName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn annotations_add_devices_once() {
        let annotations = BTreeMap::from([
            (
                "cdi.k8s.io/plugin".to_string(),
                "v.com/c=a, v.com/c=b".to_string(),
            ),
            ("other/x".to_string(), "v.com/c=z".to_string()),
        ]);
        let names = requested(&["v.com/c=a".to_string()], &annotations).expect("names");
        assert_eq!(names, ["v.com/c=a", "v.com/c=b"]);
        let bad = BTreeMap::from([("cdi.k8s.io/p".to_string(), "nonsense".to_string())]);
        assert!(requested(&[], &bad).is_err());
    }

    #[test]
    fn yaml_and_json_specs_resolve_into_edits() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "a.yaml",
            r#"
cdiVersion: "0.6.0"
kind: berth.test/zero
containerEdits:
  env: [SPEC=1]
  mounts:
  - {hostPath: /etc, containerPath: /host-etc, options: [ro, bind]}
devices:
- name: one
  containerEdits:
    env: [DEV=one]
    deviceNodes:
    - {path: /dev/zero-one, hostPath: /dev/zero, permissions: rw}
- name: two
  containerEdits:
    env: [DEV=two]
    deviceNodes:
    - {path: /dev/fake, type: c, major: 240, minor: 7, fileMode: 384}
    additionalGids: [44]
"#,
        );
        write(
            dir.path(),
            "b.json",
            r#"{"cdiVersion":"0.8.0","kind":"berth.test/null","devices":[{"name":"n","containerEdits":{"deviceNodes":[{"path":"/dev/null"}]}}]}"#,
        );
        let names: Vec<String> = [
            "berth.test/zero=one",
            "berth.test/zero=two",
            "berth.test/null=n",
        ]
        .map(String::from)
        .to_vec();
        let edits = resolve(&[dir.path().to_path_buf()], &names).expect("resolve");
        assert_eq!(
            edits.env,
            [("SPEC".into(), "1".into()), ("DEV".into(), "two".into())]
        );
        let summary: Vec<_> = edits
            .devices
            .iter()
            .map(|d| {
                (
                    d.container_path.as_str(),
                    d.kind,
                    d.major,
                    d.minor,
                    d.access.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("/dev/zero-one", 'c', 1, 5, "rw"),
                ("/dev/fake", 'c', 240, 7, "rwm"),
                ("/dev/null", 'c', 1, 3, "rwm"),
            ]
        );
        assert_eq!(edits.devices[1].mode, 0o600);
        assert_eq!(edits.mounts.len(), 1, "the spec's mount once");
        assert!(edits.mounts[0].readonly);
        assert_eq!(edits.gids, [44]);
        let mut nodes = crate::runtime::devices::requested(&[crate::runtime::container::Device {
            container_path: "/dev/null".into(),
            host_path: "/dev/zero".into(),
            permissions: "r".into(),
        }])
        .expect("zero");
        let mut env = vec!["DEV=mine".to_string(), "KEEP=1".to_string()];
        let mut groups = vec![0, 100];
        edits.merge_into(&mut nodes, &mut env, &mut groups);
        assert_eq!(
            nodes.len(),
            3,
            "the CDI /dev/null replaced the requested one"
        );
        assert!(
            nodes
                .iter()
                .any(|n| n.container_path == "/dev/null" && n.minor == 3)
        );
        assert!(env.contains(&"DEV=two".to_string()) && env.contains(&"KEEP=1".to_string()));
        assert_eq!(groups, [0, 44, 100]);
    }

    #[test]
    fn unknown_hooked_newer_and_conflicting_devices_are_refused() {
        let low = tempfile::tempdir().expect("tempdir");
        let high = tempfile::tempdir().expect("tempdir");
        let dirs = [low.path().to_path_buf(), high.path().to_path_buf()];
        write(
            low.path(),
            "hook.yaml",
            "cdiVersion: 0.5.0\nkind: v.com/gpu\ndevices:\n- name: h\n  containerEdits:\n    hooks:\n    - {hookName: createContainer, path: /usr/bin/nvidia-ctk}\n",
        );
        write(
            low.path(),
            "new.yaml",
            "cdiVersion: 1.0.0\nkind: v.com/new\ndevices:\n- name: x\n",
        );
        write(
            low.path(),
            "dup1.yaml",
            "cdiVersion: 0.3.0\nkind: v.com/dup\ndevices:\n- name: d\n",
        );
        write(
            low.path(),
            "dup2.yaml",
            "cdiVersion: 0.3.0\nkind: v.com/dup\ndevices:\n- name: d\n",
        );
        let one = |n: &str| resolve(&dirs, &[n.to_string()]);
        let err = one("v.com/gpu=h").expect_err("hook");
        assert!(err.to_string().contains("createContainer"), "{err}");
        let err = one("v.com/gpu=missing").expect_err("unknown");
        assert!(
            matches!(&err, CdiError::UnknownDevice { name, .. } if name == "v.com/gpu=missing"),
            "{err}"
        );
        let err = one("v.com/new=x").expect_err("too new");
        assert!(err.to_string().contains("newer than 0.8.0"), "{err}");
        assert!(matches!(one("v.com/dup=d"), Err(CdiError::Conflict { .. })));
        // A higher-priority dir replaces the device, conflict and all.
        write(
            high.path(),
            "dup.yaml",
            "cdiVersion: 0.3.0\nkind: v.com/dup\ndevices:\n- name: d\n  containerEdits:\n    env: [HIGH=1]\n",
        );
        let edits = one("v.com/dup=d").expect("high wins");
        assert_eq!(edits.env, [("HIGH".into(), "1".into())]);
    }
}
