//! berthd's one typed configuration: YAML on disk, every field with a working
//! default, unknown keys refused with their line so a typo never goes unnoticed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where berthd looks for a config file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/config.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Persistent data: image content, snapshots, writable layers, volumes.
    pub root: PathBuf,
    /// Per-boot data: sockets, namespace pins, monitor sockets, records.
    pub state_dir: PathBuf,
    /// The CRI gRPC socket.
    pub socket: PathBuf,
    /// Default log filter; `RUST_LOG` overrides it.
    pub log_level: String,
    /// How long a clean shutdown waits for requests in flight.
    pub shutdown_timeout_secs: u64,
    /// Containers keep running while berthd is stopped or restarted. When
    /// false, a clean shutdown first stops every container (stop signal,
    /// then SIGKILL after `shutdown_timeout_secs`), as Docker does by default.
    pub live_restore: bool,
    /// Seconds between garbage-collection passes over leftovers no record
    /// owns (one always runs at start); 0 turns the periodic pass off.
    pub gc_interval_secs: u64,
    pub cgroup: CgroupConfig,
    pub network: NetworkConfig,
    pub runtime_handlers: Vec<RuntimeHandlerConfig>,
    pub images: ImageConfig,
    pub registries: RegistriesConfig,
    pub stream: StreamConfig,
    pub cdi: CdiConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    pub driver: CgroupDriver,
    /// Parent of every pod cgroup, relative to each hierarchy's root. A pod
    /// whose CRI `cgroup_parent` is empty goes directly under it.
    pub parent: String,
}

/// Container Device Interface: where device vendors leave their spec files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdiConfig {
    /// Spec dirs in rising priority: a device defined in a later dir
    /// replaces one of the same name in an earlier dir.
    pub spec_dirs: Vec<PathBuf>,
}

impl Default for CdiConfig {
    fn default() -> Self {
        CdiConfig {
            // The CDI spec's defaults, static before dynamic.
            spec_dirs: vec![PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A CNI config in `cni_conf_dir` if there is one, else the built-in bridge.
    Auto,
    /// Always the built-in bridge network.
    Builtin,
    /// Only CNI plugins; not ready until a config appears (clusters).
    Cni,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub mode: NetworkMode,
    pub bridge: String,
    /// The IPv4 pod subnet of the built-in network.
    pub subnet: String,
    /// The IPv6 pod subnet of the built-in network; empty: IPv4 only.
    pub subnet_v6: String,
    pub mtu: u32,
    /// berth's nftables table (family inet); berth touches no other table.
    pub nft_table: String,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeHandlerConfig {
    /// The CRI handler name; the default handler's is empty.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// A pull that receives no byte for this long fails.
    pub pull_progress_timeout_secs: u64,
    /// Layers of one image downloaded at once.
    pub max_concurrent_downloads: usize,
}

/// Registry mirrors and per-host settings, shaped like k3s `registries.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistriesConfig {
    pub mirrors: BTreeMap<String, MirrorConfig>,
    pub configs: BTreeMap<String, RegistryHostConfig>,
    /// Never go past the mirror endpoints to the upstream host.
    pub disable_default_endpoint: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    pub endpoint: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryHostConfig {
    pub auth: Option<RegistryAuth>,
    pub tls: Option<RegistryTls>,
    /// Plain HTTP for this host.
    pub insecure: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
    /// A bearer token given directly, as in `auth.identitytoken`.
    pub identity_token: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// The streaming server of exec, attach and port-forward (the URLs that
/// Exec, Attach and PortForward return).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// The IP address it listens on.
    pub address: String,
    /// Its TCP port; 0 picks a free one at start.
    pub port: u16,
    /// Serve HTTPS with this certificate chain and key (PEM); both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// A streaming connection with no traffic for this long is closed.
    pub idle_timeout_secs: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            address: "127.0.0.1".to_string(),
            port: 0,
            tls_cert_file: None,
            tls_key_file: None,
            // containerd's stream_idle_timeout.
            idle_timeout_secs: 4 * 60 * 60,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/berth"),
            state_dir: PathBuf::from("/run/berth"),
            socket: PathBuf::from("/run/berth/berth.sock"),
            log_level: "info".to_string(),
            shutdown_timeout_secs: 10,
            live_restore: true,
            gc_interval_secs: 600,
            cgroup: CgroupConfig::default(),
            network: NetworkConfig::default(),
            runtime_handlers: vec![RuntimeHandlerConfig::default()],
            images: ImageConfig::default(),
            registries: RegistriesConfig::default(),
            stream: StreamConfig::default(),
            cdi: CdiConfig::default(),
        }
    }
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            driver: CgroupDriver::Cgroupfs,
            parent: "berth".to_string(),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: NetworkMode::Auto,
            bridge: "berth0".to_string(),
            subnet: "10.66.0.0/16".to_string(),
            subnet_v6: String::new(),
            mtu: 1500,
            nft_table: "berth".to_string(),
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            pull_progress_timeout_secs: 60,
            max_concurrent_downloads: 3,
        }
    }
}

impl Config {
    /// Parses YAML text; `origin` names the source in errors.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml(&text, path)
    }

    pub fn to_yaml(&self) -> String {
        // Serializing plain structs of strings, numbers and maps cannot fail.
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// Checks what serde cannot: values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for (key, path) in [
            ("root", &self.root),
            ("state_dir", &self.state_dir),
            ("socket", &self.socket),
        ] {
            if !path.is_absolute() {
                return invalid(format!("{key}: {} is not an absolute path", path.display()));
            }
        }
        if self.network.bridge.is_empty() || self.network.bridge.len() > 15 {
            return invalid(format!(
                "network.bridge: {:?} must be 1 to 15 characters (a Linux interface name)",
                self.network.bridge
            ));
        }
        if self.network.nft_table.is_empty() {
            return invalid("network.nft_table: must not be empty".to_string());
        }
        match parse_cidr(&self.network.subnet) {
            Ok((std::net::IpAddr::V4(_), _)) => {}
            Ok(_) => return invalid("network.subnet: must be IPv4 (see subnet_v6)".to_string()),
            Err(m) => return invalid(format!("network.subnet: {m}")),
        }
        if !self.network.subnet_v6.is_empty() {
            match parse_cidr(&self.network.subnet_v6) {
                Ok((std::net::IpAddr::V6(_), _)) => {}
                Ok(_) => return invalid("network.subnet_v6: must be IPv6".to_string()),
                Err(m) => return invalid(format!("network.subnet_v6: {m}")),
            }
        }
        if !(576..=65535).contains(&self.network.mtu) {
            return invalid(format!(
                "network.mtu: {} is outside 576..65535",
                self.network.mtu
            ));
        }
        if self.cgroup.parent.is_empty() || self.cgroup.parent.split('/').any(|c| c == "..") {
            return invalid(format!(
                "cgroup.parent: {:?} must be a non-empty relative path without '..'",
                self.cgroup.parent
            ));
        }
        if self.cgroup.driver == CgroupDriver::Systemd
            && let Err(e) = crate::runtime::systemd::expand_slice(&self.cgroup.parent)
        {
            return invalid(format!(
                "cgroup.parent: with cgroup.driver systemd it is a slice: {e}"
            ));
        }
        if self.runtime_handlers.is_empty() {
            return invalid("runtime_handlers: at least one handler is needed".to_string());
        }
        let mut names: Vec<&str> = self
            .runtime_handlers
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return invalid(format!("runtime_handlers: {:?} is listed twice", w[0]));
        }
        if self.images.max_concurrent_downloads == 0 {
            return invalid("images.max_concurrent_downloads: must be at least 1".to_string());
        }
        if self.images.pull_progress_timeout_secs == 0 {
            return invalid("images.pull_progress_timeout_secs: must be at least 1".to_string());
        }
        if self.stream.address.parse::<std::net::IpAddr>().is_err() {
            return invalid(format!(
                "stream.address: {:?} is not an IP address",
                self.stream.address
            ));
        }
        if self.stream.tls_cert_file.is_some() != self.stream.tls_key_file.is_some() {
            return invalid(
                "stream.tls_cert_file and stream.tls_key_file: give both or neither".to_string(),
            );
        }
        if self.stream.idle_timeout_secs == 0 {
            return invalid("stream.idle_timeout_secs: must be at least 1".to_string());
        }
        for (host, mirror) in &self.registries.mirrors {
            for endpoint in &mirror.endpoint {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return invalid(format!(
                        "registries.mirrors.{host}.endpoint: {endpoint:?} must start with http:// or https://"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parses `a.b.c.d/len` or an IPv6 prefix; returns the address and length.
pub fn parse_cidr(text: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not in address/length form"))?;
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{len:?} is not a prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} is over {max}"));
    }
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, Path::new("test.yaml"))
    }

    #[test]
    fn default_round_trips_through_yaml() {
        let yaml = Config::default().to_yaml();
        assert_eq!(parse(&yaml).expect("default parses"), Config::default());
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(parse("").expect("empty parses"), Config::default());
        assert_eq!(parse("{}").expect("{} parses"), Config::default());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse("root: /x\nnetwork:\n  bridge: b1\n  brigde: b2\n")
            .expect_err("typo must be refused")
            .to_string();
        assert!(err.contains("brigde"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn bad_value_is_named_with_its_line() {
        let err = parse("network:\n  mtu: lots\n")
            .expect_err("bad mtu")
            .to_string();
        assert!(err.contains("mtu"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = parse("cgroup:\n  driver: upstart\n")
            .expect_err("bad driver")
            .to_string();
        assert!(err.contains("upstart") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        for (yaml, key) in [
            ("root: relative/dir", "root"),
            ("network: {subnet: 10.66.0.0}", "network.subnet"),
            ("network: {subnet: 10.66.0.0/40}", "network.subnet"),
            ("network: {subnet: \"fd66::/64\"}", "network.subnet"),
            ("network: {subnet_v6: 10.66.0.0/16}", "network.subnet_v6"),
            ("network: {subnet_v6: \"fd66::/129\"}", "network.subnet_v6"),
            (
                "network: {bridge: a-very-long-bridge-name}",
                "network.bridge",
            ),
            ("cgroup: {parent: ../escape}", "cgroup.parent"),
            ("cgroup: {driver: systemd}", "cgroup.parent"),
            (
                "cgroup: {driver: systemd, parent: a--b.slice}",
                "cgroup.parent",
            ),
            (
                "runtime_handlers: [{name: a}, {name: a}]",
                "runtime_handlers",
            ),
            (
                "registries: {mirrors: {docker.io: {endpoint: [127.0.0.1:5000]}}}",
                "registries.mirrors.docker.io",
            ),
            ("stream: {address: localhost}", "stream.address"),
            ("stream: {tls_cert_file: /c.pem}", "stream.tls_key_file"),
            ("stream: {idle_timeout_secs: 0}", "stream.idle_timeout_secs"),
        ] {
            let err = parse(yaml).expect_err(yaml).to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn the_systemd_driver_takes_a_slice_as_parent() {
        let c = parse("cgroup: {driver: systemd, parent: system-berth.slice}\n")
            .expect("a slice parent");
        assert_eq!(c.cgroup.driver, CgroupDriver::Systemd);
    }

    #[test]
    fn registries_in_k3s_shape() {
        let c = parse(
            "registries:\n  mirrors:\n    registry.k8s.io:\n      endpoint: [\"http://127.0.0.1:5000\"]\n  configs:\n    \"registry.example.com\":\n      auth: {username: u, password: p}\n      tls: {ca_file: /etc/ssl/x.pem, insecure_skip_verify: false}\n  disable_default_endpoint: true\n",
        )
        .expect("k3s-shaped registries parse");
        assert_eq!(
            c.registries.mirrors["registry.k8s.io"].endpoint,
            vec!["http://127.0.0.1:5000"]
        );
        let host = &c.registries.configs["registry.example.com"];
        assert_eq!(host.auth.as_ref().map(|a| a.username.as_str()), Some("u"));
        assert!(c.registries.disable_default_endpoint);
    }
}
