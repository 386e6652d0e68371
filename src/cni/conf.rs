//! CNI network configurations: the files of the config dir (`.conf`,
//! `.conflist`, `.json`), the lexically first valid one chosen as libcni and
//! containerd do, checked and turned into one list of plugin configs.
//!
//! A `.conf` (or `.json`) file holding one plugin config (`type` at the top)
//! becomes a list of that one plugin; one holding `plugins` is read as a
//! list whatever its extension. A file that cannot be read or fails the
//! checks is skipped with its reason, so a half-written file or a stray one
//! never hides a good config after it, and readiness can say what was wrong.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// File name extensions of config files, as libcni reads them.
pub const CONF_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The spec versions berth speaks, oldest first.
pub const SUPPORTED_VERSIONS: [CniVersion; 5] = [
    CniVersion::new(0, 3, 0),
    CniVersion::new(0, 3, 1),
    CniVersion::new(0, 4, 0),
    CniVersion::new(1, 0, 0),
    CniVersion::new(1, 1, 0),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI config {path}: {reason}")]
pub struct ConfError {
    pub path: PathBuf,
    pub reason: String,
}

/// A CNI spec version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CniVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl CniVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> CniVersion {
        CniVersion {
            major,
            minor,
            patch,
        }
    }

    /// Parses `1.0.0`; `1.0` is taken as `1.0.0`.
    pub fn parse(text: &str) -> Option<CniVersion> {
        let mut parts = text.trim().split('.');
        let mut next = |required: bool| match parts.next() {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok(),
            None if !required => Some(0),
            _ => None,
        };
        let version = CniVersion::new(next(true)?, next(true)?, next(false)?);
        parts.next().is_none().then_some(version)
    }

    pub fn is_supported(self) -> bool {
        SUPPORTED_VERSIONS.contains(&self)
    }

    /// CHECK, and `prevResult` on DEL, came with 0.4.0.
    pub fn has_check(self) -> bool {
        self >= CniVersion::new(0, 4, 0)
    }

    /// STATUS and GC came with 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::new(1, 1, 0)
    }

    /// Results carry `ips[].version` before 1.0.0.
    pub fn has_ip_version_field(self) -> bool {
        self < CniVersion::new(1, 0, 0)
    }
}

impl PartialOrd for CniVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for CniVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch).cmp(&(other.major, other.minor, other.patch))
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl TryFrom<String> for CniVersion {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        CniVersion::parse(&text).ok_or_else(|| format!("{text:?} is not a CNI version"))
    }
}

impl From<CniVersion> for String {
    fn from(v: CniVersion) -> String {
        v.to_string()
    }
}

/// One network: a list of plugin configs run in order, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfList {
    pub name: String,
    /// The version berth speaks to this network's plugins: the highest
    /// supported one of `cniVersion` and `cniVersions`.
    pub cni_version: CniVersion,
    pub disable_check: bool,
    pub disable_gc: bool,
    /// The plugin configs as written, each with a valid `type`.
    pub plugins: Vec<Map<String, Value>>,
    /// The file it came from.
    pub source: PathBuf,
}

impl NetworkConfList {
    /// The `type` of each plugin, in order.
    pub fn plugin_types(&self) -> Vec<&str> {
        self.plugins.iter().map(plugin_type).collect()
    }

    /// Reads a config from JSON text; `path` names it and its extension
    /// says whether a plugin config (`.conf`, `.json`) is allowed.
    pub fn from_bytes(path: &Path, data: &[u8]) -> Result<NetworkConfList, ConfError> {
        let err = |reason: String| ConfError {
            path: path.to_path_buf(),
            reason,
        };
        let value: Value =
            serde_json::from_slice(data).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(top) = value else {
            return Err(err("is not a JSON object".to_string()));
        };
        let is_list_file = path.extension().is_some_and(|e| e == "conflist");
        let plugins = match (top.get("plugins"), top.get("type")) {
            (Some(Value::Array(plugins)), _) => plugins
                .iter()
                .enumerate()
                .map(|(i, p)| match p {
                    Value::Object(p) => Ok(p.clone()),
                    _ => Err(err(format!("plugins[{i}] is not a JSON object"))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            (Some(_), _) => return Err(err("\"plugins\" is not a list".to_string())),
            (None, Some(_)) if !is_list_file => vec![top.clone()],
            (None, _) => {
                return Err(err(if is_list_file {
                    "a .conflist needs a \"plugins\" list".to_string()
                } else {
                    "has neither \"type\" (a plugin config) nor \"plugins\" (a list)".to_string()
                }));
            }
        };
        let name = match top.get("name") {
            Some(Value::String(name)) => name.clone(),
            Some(_) => return Err(err("\"name\" is not a string".to_string())),
            None => return Err(err("has no \"name\"".to_string())),
        };
        if !valid_name(&name) {
            return Err(err(format!(
                "network name {name:?} must start with a letter or digit and hold only \
                 letters, digits, '_', '.' and '-'"
            )));
        }
        let cni_version = select_version(&top).map_err(err)?;
        if plugins.is_empty() {
            return Err(err(format!("network {name:?} has no plugins")));
        }
        for (i, plugin) in plugins.iter().enumerate() {
            match plugin.get("type") {
                Some(Value::String(t)) if valid_plugin_type(t) => {}
                Some(Value::String(t)) => {
                    return Err(err(format!(
                        "plugins[{i}]: type {t:?} is not a plain file name"
                    )));
                }
                Some(_) => return Err(err(format!("plugins[{i}]: \"type\" is not a string"))),
                None => return Err(err(format!("plugins[{i}] has no \"type\""))),
            }
            if let Some(capabilities) = plugin.get("capabilities")
                && !capabilities.is_object()
            {
                return Err(err(format!(
                    "plugins[{i}]: \"capabilities\" is not an object"
                )));
            }
        }
        Ok(NetworkConfList {
            name,
            cni_version,
            disable_check: flag(&top, "disableCheck").map_err(err)?,
            disable_gc: flag(&top, "disableGC").map_err(err)?,
            plugins,
            source: path.to_path_buf(),
        })
    }

    /// Reads and checks one config file.
    pub fn load(path: &Path) -> Result<NetworkConfList, ConfError> {
        let data = std::fs::read(path).map_err(|e| ConfError {
            path: path.to_path_buf(),
            reason: format!("cannot read: {e}"),
        })?;
        NetworkConfList::from_bytes(path, &data)
    }
}

/// A plugin config's `type` (checked when the list was read).
pub fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin.get("type").and_then(Value::as_str).unwrap_or("")
}

/// What a look at the config dir found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfDirScan {
    /// The lexically first valid config, if any.
    pub chosen: Option<NetworkConfList>,
    /// Config files before the chosen one (or all, when none is valid) that
    /// were skipped, with the reason.
    pub skipped: Vec<ConfError>,
    /// Set when the dir itself cannot be read (other than missing).
    pub dir_error: Option<String>,
}

/// The config files of `dir` in the order they are tried: lexical order of
/// their names, directories left out. A missing dir has none.
pub fn conf_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| CONF_EXTENSIONS.contains(&e))
        })
        // Follows symlinks: ConfigMaps mount files as links into `..data`.
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
        .collect();
    files.sort();
    Ok(files)
}

/// Whether `dir` holds any config file, valid or not.
pub fn has_conf_files(dir: &Path) -> bool {
    conf_files(dir).is_ok_and(|f| !f.is_empty())
}

/// Finds the config to use in `dir`: the first of [`conf_files`] that reads
/// and checks well.
pub fn scan_dir(dir: &Path) -> ConfDirScan {
    let mut scan = ConfDirScan::default();
    let files = match conf_files(dir) {
        Ok(files) => files,
        Err(e) => {
            scan.dir_error = Some(format!("cannot read {}: {e}", dir.display()));
            return scan;
        }
    };
    for path in files {
        match NetworkConfList::load(&path) {
            Ok(list) => {
                scan.chosen = Some(list);
                break;
            }
            Err(e) => scan.skipped.push(e),
        }
    }
    scan
}

/// The spec's rule for network names; they also name cache files in libcni.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// A plugin `type` names an executable in one of the plugin dirs.
fn valid_plugin_type(t: &str) -> bool {
    !t.is_empty() && t != "." && t != ".." && !t.contains(['/', '\\', '\0'])
}

/// The highest supported version of `cniVersion` and `cniVersions` (1.1).
fn select_version(top: &Map<String, Value>) -> Result<CniVersion, String> {
    let mut given: Vec<String> = Vec::new();
    match top.get("cniVersion") {
        Some(Value::String(v)) => given.push(v.clone()),
        Some(_) => return Err("\"cniVersion\" is not a string".to_string()),
        None => {}
    }
    match top.get("cniVersions") {
        Some(Value::Array(list)) => {
            for v in list {
                match v {
                    Value::String(v) => given.push(v.clone()),
                    _ => return Err("\"cniVersions\" holds a non-string".to_string()),
                }
            }
        }
        Some(_) => return Err("\"cniVersions\" is not a list".to_string()),
        None => {}
    }
    if given.is_empty() {
        return Err("has no \"cniVersion\"".to_string());
    }
    given
        .iter()
        .filter_map(|v| CniVersion::parse(v))
        .filter(|v| v.is_supported())
        .max()
        .ok_or_else(|| {
            format!(
                "CNI version {} is not supported; berth speaks {}",
                given.join(", "),
                SUPPORTED_VERSIONS
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// A boolean of the list: `true`/`false`, or those as strings (libcni takes both).
fn flag(top: &Map<String, Value>, key: &str) -> Result<bool, String> {
    match top.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(format!("{key:?} is {other}, not true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write conf");
        path
    }

    const LIST: &str = r#"{"cniVersion":"0.4.0","name":"k8s-pod-network","plugins":[
        {"type":"calico","ipam":{"type":"calico-ipam"}},
        {"type":"portmap","capabilities":{"portMappings":true},"snat":true}]}"#;

    #[test]
    fn versions_parse_compare_and_say_what_they_have() {
        assert_eq!(CniVersion::parse("0.3.1"), Some(CniVersion::new(0, 3, 1)));
        assert_eq!(CniVersion::parse("1.0"), Some(CniVersion::new(1, 0, 0)));
        for bad in ["", "1", "1.x.0", "1.0.0.0", "v1.0.0", "1..0"] {
            assert_eq!(CniVersion::parse(bad), None, "{bad}");
        }
        assert!(CniVersion::new(0, 4, 0) > CniVersion::new(0, 3, 1));
        assert!(CniVersion::new(1, 0, 0) > CniVersion::new(0, 4, 0));
        assert!(!CniVersion::new(0, 3, 1).has_check());
        assert!(CniVersion::new(0, 4, 0).has_check());
        assert!(!CniVersion::new(1, 0, 0).has_status_and_gc());
        assert!(CniVersion::new(1, 1, 0).has_status_and_gc());
        assert!(CniVersion::new(0, 4, 0).has_ip_version_field());
        assert!(!CniVersion::new(1, 0, 0).has_ip_version_field());
        assert!(!CniVersion::new(0, 2, 0).is_supported());
        let json = serde_json::to_string(&CniVersion::new(1, 1, 0)).expect("json");
        assert_eq!(json, "\"1.1.0\"");
    }

    #[test]
    fn a_conflist_is_read_with_its_plugins_unchanged() {
        let list = NetworkConfList::from_bytes(Path::new("/d/10-calico.conflist"), LIST.as_bytes())
            .expect("valid list");
        assert_eq!(list.name, "k8s-pod-network");
        assert_eq!(list.cni_version, CniVersion::new(0, 4, 0));
        assert_eq!(list.plugin_types(), vec!["calico", "portmap"]);
        assert_eq!(list.plugins[1]["snat"], Value::Bool(true));
        assert!(!list.disable_check && !list.disable_gc);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_of_one() {
        let text = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}"#;
        let list = NetworkConfList::from_bytes(Path::new("/d/10-flannel.conf"), text.as_bytes())
            .expect("valid conf");
        assert_eq!(list.cni_version, CniVersion::new(0, 3, 1));
        assert_eq!(list.plugin_types(), vec!["flannel"]);
        assert_eq!(
            list.plugins[0]["delegate"]["isDefaultGateway"],
            Value::Bool(true)
        );
        // A .conf holding a list is read as a list too.
        let list = NetworkConfList::from_bytes(Path::new("/d/x.conf"), LIST.as_bytes())
            .expect("list in a .conf");
        assert_eq!(list.plugins.len(), 2);
    }

    #[test]
    fn the_highest_supported_of_cni_versions_is_chosen() {
        let text = r#"{"cniVersion":"1.0.0","cniVersions":["0.4.0","1.1.0","9.0.0"],"name":"n",
            "disableCheck":"true","disableGC":true,"plugins":[{"type":"bridge"}]}"#;
        let list =
            NetworkConfList::from_bytes(Path::new("/d/n.conflist"), text.as_bytes()).expect("ok");
        assert_eq!(list.cni_version, CniVersion::new(1, 1, 0));
        assert!(list.disable_check && list.disable_gc);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        for (name, text, want) in [
            ("a.conflist", "{", "not valid JSON"),
            ("a.conflist", "[]", "not a JSON object"),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
                "needs a \"plugins\" list",
            ),
            ("a.conf", r#"{"cniVersion":"1.0.0","name":"n"}"#, "neither"),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"b"}]}"#,
                "no \"name\"",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"-n","plugins":[{"type":"b"}]}"#,
                "network name",
            ),
            (
                "a.conflist",
                r#"{"name":"n","plugins":[{"type":"b"}]}"#,
                "no \"cniVersion\"",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"b"}]}"#,
                "0.2.0 is not supported",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "no plugins",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"ipam":{}}]}"#,
                "plugins[0] has no \"type\"",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../bin/sh"}]}"#,
                "plain file name",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"b","capabilities":[]}]}"#,
                "capabilities",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","disableCheck":3,"plugins":[{"type":"b"}]}"#,
                "disableCheck",
            ),
        ] {
            let err = NetworkConfList::from_bytes(&Path::new("/d").join(name), text.as_bytes())
                .expect_err(text)
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
            assert!(err.contains(name), "names the file: {err}");
        }
    }

    #[test]
    fn the_lexically_first_valid_file_wins_and_skipped_ones_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            scan_dir(&dir.path().join("missing")),
            ConfDirScan::default()
        );
        assert!(!has_conf_files(dir.path()));
        write(dir.path(), "README", "not a config");
        write(dir.path(), "05-broken.conflist", "{");
        std::fs::create_dir(dir.path().join("01-dir.conf")).expect("dir");
        write(
            dir.path(),
            "20-b.conflist",
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"}]}"#,
        );
        let a = write(
            dir.path(),
            "10-a.json",
            r#"{"cniVersion":"0.3.1","name":"a","type":"ptp"}"#,
        );
        assert!(has_conf_files(dir.path()));
        let scan = scan_dir(dir.path());
        let chosen = scan.chosen.expect("a config");
        assert_eq!((chosen.name.as_str(), chosen.source), ("a", a));
        assert_eq!(scan.skipped.len(), 1);
        assert!(scan.skipped[0].path.ends_with("05-broken.conflist"));
        let names: Vec<_> = conf_files(dir.path())
            .expect("list")
            .iter()
            .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            names,
            vec![
                Some("05-broken.conflist".to_string()),
                Some("10-a.json".to_string()),
                Some("20-b.conflist".to_string())
            ]
        );
    }

    #[test]
    fn symlinked_files_count_as_configs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("..data");
        std::fs::create_dir(&data).expect("data dir");
        write(&data, "10-net.conflist", LIST);
        std::os::unix::fs::symlink(
            data.join("10-net.conflist"),
            dir.path().join("10-net.conflist"),
        )
        .expect("symlink");
        let scan = scan_dir(dir.path());
        assert_eq!(
            scan.chosen.map(|c| c.name),
            Some("k8s-pod-network".to_string())
        );
    }
}
