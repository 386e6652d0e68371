//! Running CNI plugins as the spec (0.3.x to 1.1) says: the executable is
//! found by `type` in the plugin dirs and run with the `CNI_*` environment and
//! the derived request config on stdin; results are read in any of those
//! versions and converted to the network's; errors come from the plugin's
//! JSON error object. The operations on a whole network (ADD, DEL, CHECK,
//! STATUS, GC) run its plugins in the order and with the `prevResult` the
//! spec prescribes.
//!
//! Request config of one plugin: its config as written, with `cniVersion`
//! and `name` of the list, `runtimeConfig` holding the capability arguments
//! the plugin declares in `capabilities` (from 1.0.0 on `capabilities`
//! itself is left out, as the spec asks), `prevResult` where the operation
//! has one, and no key starting with `cni.dev/` other than the ones berth
//! sets (`cni.dev/valid-attachments` for GC).

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::conf::{CniVersion, NetworkConfList, plugin_type};

/// The interface plugins make inside the pod.
pub const POD_INTERFACE: &str = "eth0";

/// The PATH plugins get when berthd has none (they run iptables, ip, ...).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Most of a plugin's unstructured output kept in an error.
const OUTPUT_IN_ERRORS: usize = 2000;

/// A plugin operation, the value of `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// Whether the operation is about one attachment (container, netns, ifname).
    fn has_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI plugin {plugin:?} is not in any of the plugin dirs ({dirs})")]
    PluginNotFound { plugin: String, dirs: String },
    #[error("CNI plugin {plugin} {command}: cannot run {}: {source}", .path.display())]
    Exec {
        plugin: String,
        command: Command,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} {command} failed: {msg}{} (CNI error code {code})", details_suffix(.details))]
    Plugin {
        plugin: String,
        command: Command,
        code: u64,
        msg: String,
        details: String,
    },
    #[error("CNI plugin {plugin} {command} {status}{}", details_suffix(.output))]
    Failed {
        plugin: String,
        command: Command,
        status: String,
        output: String,
    },
    #[error("CNI plugin {plugin} {command}: unusable result: {reason}")]
    BadResult {
        plugin: String,
        command: Command,
        reason: String,
    },
    #[error("CNI attachment of {container_id}: {reason}")]
    InvalidAttachment {
        container_id: String,
        reason: String,
    },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Several(Vec<CniError>),
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(": {details}")
    }
}

/// The error object of the spec, as plugins print it on stdout.
#[derive(Debug, Deserialize)]
struct ErrorObject {
    code: u64,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// One port a pod publishes, as the `portMappings` capability carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMappingArg {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// The parameters of one attachment: the same for its ADD, CHECK and DEL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// `CNI_CONTAINERID`: berth passes the pod id.
    pub container_id: String,
    /// `CNI_NETNS`; None where the namespace is gone (DEL only).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, in order.
    pub args: Vec<(String, String)>,
    /// Capability arguments offered to plugins that declare them.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    /// A pod's attachment with the Kubernetes `CNI_ARGS` and port mappings.
    pub fn for_pod(
        pod_id: &str,
        netns: &Path,
        namespace: &str,
        name: &str,
        uid: &str,
        port_mappings: Vec<PortMappingArg>,
    ) -> Result<Attachment, CniError> {
        let invalid = |reason: String| CniError::InvalidAttachment {
            container_id: pod_id.to_string(),
            reason,
        };
        check_container_id(pod_id)?;
        let args = vec![
            ("IgnoreUnknown".to_string(), "1".to_string()),
            ("K8S_POD_NAMESPACE".to_string(), namespace.to_string()),
            ("K8S_POD_NAME".to_string(), name.to_string()),
            ("K8S_POD_INFRA_CONTAINER_ID".to_string(), pod_id.to_string()),
            ("K8S_POD_UID".to_string(), uid.to_string()),
        ];
        for (key, value) in &args {
            if value.contains([';', '=']) || value.chars().any(char::is_control) {
                return Err(invalid(format!(
                    "{key} {value:?} cannot be passed in CNI_ARGS (it holds ';', '=' or a control character)"
                )));
            }
        }
        let mut capability_args = Map::new();
        capability_args.insert(
            "portMappings".to_string(),
            serde_json::to_value(port_mappings).unwrap_or_else(|_| json!([])),
        );
        Ok(Attachment {
            container_id: pod_id.to_string(),
            netns: Some(netns.to_path_buf()),
            ifname: POD_INTERFACE.to_string(),
            args,
            capability_args,
        })
    }

    /// The value of `CNI_ARGS`: `K=V` pairs joined by `;`.
    pub fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// The spec's rule for `CNI_CONTAINERID`: a letter or digit, then letters,
/// digits, `_`, `.` and `-`. (Such an id can also name a file.)
pub fn check_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(CniError::InvalidAttachment {
            container_id: id.to_string(),
            reason: "a container id must start with a letter or digit and hold only letters, digits, '_', '.' and '-'".to_string(),
        })
    }
}

/// Derives the request config of one plugin of `list` (see the module doc).
pub fn request_config(
    list: &NetworkConfList,
    plugin: &Map<String, Value>,
    capability_args: Option<&Map<String, Value>>,
    prev_result: Option<&Value>,
) -> Value {
    let mut conf: Map<String, Value> = plugin
        .iter()
        .filter(|(k, _)| !k.starts_with("cni.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    conf.insert("cniVersion".into(), list.cni_version.to_string().into());
    conf.insert("name".into(), list.name.clone().into());
    let capabilities = if list.cni_version >= CniVersion::new(1, 0, 0) {
        conf.remove("capabilities")
    } else {
        conf.get("capabilities").cloned()
    };
    // Only the runtime sets it, and only for ADD, CHECK and DEL.
    conf.remove("runtimeConfig");
    if let Some(args) = capability_args {
        let declared = capabilities.as_ref().and_then(Value::as_object);
        let runtime_config: Map<String, Value> = args
            .iter()
            .filter(|(k, _)| {
                declared.is_some_and(|d| d.get(k.as_str()) == Some(&Value::Bool(true)))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !runtime_config.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
    }
    match prev_result {
        Some(prev) => conf.insert("prevResult".into(), prev.clone()),
        None => conf.remove("prevResult"),
    };
    Value::Object(conf)
}

/// Converts a plugin result of any supported version (and the 0.1/0.2 form)
/// to version `to`: `ips[].version` is there before 1.0.0 and not after,
/// fields 1.1 added are dropped for older versions, unknown fields are kept.
pub fn convert_result(result: &Value, to: CniVersion) -> Result<Value, String> {
    let Value::Object(object) = result else {
        return Err("the result is not a JSON object".to_string());
    };
    let from = match object.get("cniVersion") {
        Some(Value::String(v)) => {
            CniVersion::parse(v).ok_or_else(|| format!("cniVersion {v:?} is not a version"))?
        }
        Some(_) => return Err("cniVersion is not a string".to_string()),
        None => to,
    };
    let mut out = if from < CniVersion::new(0, 3, 0) {
        from_legacy(object)?
    } else {
        object.clone()
    };
    if let Some(ips) = out.get_mut("ips") {
        let Value::Array(ips) = ips else {
            return Err("\"ips\" is not a list".to_string());
        };
        for (i, ip) in ips.iter_mut().enumerate() {
            let Value::Object(ip) = ip else {
                return Err(format!("ips[{i}] is not an object"));
            };
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("ips[{i}] has no address"))?;
            let net: IpNet = address
                .parse()
                .map_err(|_| format!("ips[{i}].address {address:?} is not an address/prefix"))?;
            if to.has_ip_version_field() {
                let family = if net.addr().is_ipv4() { "4" } else { "6" };
                ip.insert("version".into(), family.into());
            } else {
                ip.remove("version");
            }
        }
    }
    if to < CniVersion::new(1, 1, 0) {
        strip_fields(&mut out, "interfaces", &["mtu", "socketPath", "pciID"]);
        strip_fields(
            &mut out,
            "routes",
            &["mtu", "advmss", "priority", "table", "scope"],
        );
    }
    out.insert("cniVersion".into(), to.to_string().into());
    Ok(Value::Object(out))
}

/// The 0.1.0/0.2.0 result (`ip4`, `ip6`) in the 0.3.0 form.
fn from_legacy(object: &Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for (key, family) in [("ip4", "4"), ("ip6", "6")] {
        let Some(Value::Object(config)) = object.get(key) else {
            continue;
        };
        let address = config
            .get("ip")
            .cloned()
            .ok_or_else(|| format!("{key} has no ip"))?;
        let mut ip = Map::new();
        ip.insert("version".into(), family.into());
        ip.insert("address".into(), address);
        if let Some(gateway) = config.get("gateway") {
            ip.insert("gateway".into(), gateway.clone());
        }
        ips.push(Value::Object(ip));
        if let Some(Value::Array(r)) = config.get("routes") {
            routes.extend(r.iter().cloned());
        }
    }
    let mut out = Map::new();
    out.insert("ips".into(), Value::Array(ips));
    if !routes.is_empty() {
        out.insert("routes".into(), Value::Array(routes));
    }
    if let Some(dns) = object.get("dns") {
        out.insert("dns".into(), dns.clone());
    }
    Ok(out)
}

fn strip_fields(result: &mut Map<String, Value>, list: &str, fields: &[&str]) {
    if let Some(Value::Array(items)) = result.get_mut(list) {
        for item in items.iter_mut().filter_map(Value::as_object_mut) {
            for field in fields {
                item.remove(*field);
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct ResultInterface {
    #[serde(default)]
    name: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Debug, Deserialize)]
struct ResultIp {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct ResultIps {
    #[serde(default)]
    interfaces: Vec<ResultInterface>,
    #[serde(default)]
    ips: Vec<ResultIp>,
}

/// The pod's addresses in a result: those on `ifname` inside the sandbox
/// (else those on any sandbox interface, else all), loopback left out,
/// IPv4 first as kubelet expects the primary address to be.
pub fn pod_ips(result: &Value, ifname: &str) -> Result<Vec<IpAddr>, String> {
    let parsed: ResultIps = serde_json::from_value(result.clone())
        .map_err(|e| format!("cannot read the result's addresses: {e}"))?;
    let mut ips: Vec<(IpAddr, Option<&ResultInterface>)> = Vec::new();
    for ip in &parsed.ips {
        let net: IpNet = ip
            .address
            .parse()
            .map_err(|_| format!("{:?} is not an address/prefix", ip.address))?;
        if net.addr().is_loopback() {
            continue;
        }
        let interface = ip.interface.and_then(|i| parsed.interfaces.get(i));
        ips.push((net.addr(), interface));
    }
    let in_sandbox = |i: &Option<&ResultInterface>| i.is_some_and(|i| !i.sandbox.is_empty());
    let on_ifname: Vec<IpAddr> = ips
        .iter()
        .filter(|(_, i)| in_sandbox(i) && i.is_some_and(|i| i.name == ifname))
        .map(|(ip, _)| *ip)
        .collect();
    let chosen = if !on_ifname.is_empty() {
        on_ifname
    } else if ips.iter().any(|(_, i)| in_sandbox(i)) {
        ips.iter()
            .filter(|(_, i)| in_sandbox(i))
            .map(|(ip, _)| *ip)
            .collect()
    } else {
        ips.iter().map(|(ip, _)| *ip).collect()
    };
    let (mut v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = chosen.into_iter().partition(IpAddr::is_ipv4);
    v4.extend(v6);
    Ok(v4)
}

/// The plugin executables: where they are looked for, and running them.
#[derive(Debug, Clone)]
pub struct CniPlugins {
    dirs: Vec<PathBuf>,
}

impl CniPlugins {
    pub fn new(dirs: Vec<PathBuf>) -> CniPlugins {
        CniPlugins { dirs }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn dirs_text(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The executable of plugin `plugin_type`: the first found in the dirs.
    pub fn find(&self, plugin_type: &str) -> Result<PathBuf, CniError> {
        use std::os::unix::fs::PermissionsExt;
        self.dirs
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: plugin_type.to_string(),
                dirs: self.dirs_text(),
            })
    }

    /// The plugin types of `list` that are in none of the dirs.
    pub fn missing(&self, list: &NetworkConfList) -> Vec<String> {
        let mut missing: Vec<String> = list
            .plugin_types()
            .into_iter()
            .filter(|t| self.find(t).is_err())
            .map(str::to_string)
            .collect();
        missing.dedup();
        missing
    }

    /// Runs one plugin; returns its stdout on success.
    pub fn run(
        &self,
        plugin_type: &str,
        command: Command,
        attachment: Option<&Attachment>,
        conf: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let path = self.find(plugin_type)?;
        let exec_err = |source| CniError::Exec {
            plugin: plugin_type.to_string(),
            command,
            path: path.clone(),
            source,
        };
        let mut process = Process::new(&path);
        process
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| !k.to_string_lossy().starts_with("CNI_")))
            .env("CNI_COMMAND", command.as_str())
            .env(
                "CNI_PATH",
                std::env::join_paths(&self.dirs).unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("PATH").is_none() {
            process.env("PATH", DEFAULT_PATH);
        }
        if let Some(a) = attachment.filter(|_| command.has_attachment()) {
            process
                .env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", a.cni_args());
            match &a.netns {
                Some(netns) => process.env("CNI_NETNS", netns),
                None => process.env("CNI_NETNS", ""),
            };
        }
        let stdin = serde_json::to_vec(conf).unwrap_or_default();
        let started = Instant::now();
        let mut child = process.spawn().map_err(exec_err)?;
        if let Some(mut pipe) = child.stdin.take() {
            // A plugin that exits without reading its config closes the pipe:
            // its exit status tells what happened.
            let _ = pipe.write_all(&stdin);
        }
        let output = child.wait_with_output().map_err(exec_err)?;
        tracing::debug!(
            plugin = plugin_type,
            command = command.as_str(),
            container = attachment.map(|a| a.container_id.as_str()).unwrap_or(""),
            status = %output.status,
            ms = started.elapsed().as_millis() as u64,
            "ran CNI plugin"
        );
        if !output.stderr.is_empty() {
            tracing::debug!(plugin = plugin_type, stderr = %String::from_utf8_lossy(&output.stderr).trim(), "CNI plugin stderr");
        }
        if output.status.success() {
            return Ok(output.stdout);
        }
        if let Ok(e) = serde_json::from_slice::<ErrorObject>(&output.stdout) {
            return Err(CniError::Plugin {
                plugin: plugin_type.to_string(),
                command,
                code: e.code,
                msg: e.msg,
                details: e.details,
            });
        }
        let text = [&output.stdout, &output.stderr]
            .iter()
            .map(|b| String::from_utf8_lossy(b).trim().to_string())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" / ");
        let text = match text.char_indices().nth(OUTPUT_IN_ERRORS) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text,
        };
        Err(CniError::Failed {
            plugin: plugin_type.to_string(),
            command,
            status: output.status.to_string(),
            output: text,
        })
    }

    /// ADD: every plugin in order, each given the result of the one before;
    /// returns the last result, in the network's version.
    pub fn add(&self, list: &NetworkConfList, attachment: &Attachment) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let t = plugin_type(plugin);
            let conf = request_config(
                list,
                plugin,
                Some(&attachment.capability_args),
                prev.as_ref(),
            );
            let out = self.run(t, Command::Add, Some(attachment), &conf)?;
            let bad = |reason: String| CniError::BadResult {
                plugin: t.to_string(),
                command: Command::Add,
                reason,
            };
            let value: Value = serde_json::from_slice(&out)
                .map_err(|e| bad(format!("stdout is not a JSON result: {e}")))?;
            prev = Some(convert_result(&value, list.cni_version).map_err(bad)?);
        }
        prev.ok_or_else(|| CniError::BadResult {
            plugin: list.name.clone(),
            command: Command::Add,
            reason: "the network has no plugins".to_string(),
        })
    }

    /// DEL: every plugin in reverse order, each given the cached result of
    /// the ADD (from 0.4.0 on); stops at the first error, as the spec says.
    pub fn del(
        &self,
        list: &NetworkConfList,
        attachment: &Attachment,
        cached: Option<&Value>,
    ) -> Result<(), CniError> {
        let prev = match cached {
            Some(result) if list.cni_version.has_check() => {
                Some(convert_result(result, list.cni_version).map_err(|reason| {
                    CniError::BadResult {
                        plugin: list.name.clone(),
                        command: Command::Del,
                        reason: format!("cached result: {reason}"),
                    }
                })?)
            }
            _ => None,
        };
        for plugin in list.plugins.iter().rev() {
            let conf = request_config(
                list,
                plugin,
                Some(&attachment.capability_args),
                prev.as_ref(),
            );
            self.run(plugin_type(plugin), Command::Del, Some(attachment), &conf)?;
        }
        Ok(())
    }

    /// CHECK (0.4.0 on, unless `disableCheck`): every plugin in order with
    /// the cached result of the ADD; stops at the first error. Returns
    /// whether the check ran.
    pub fn check(
        &self,
        list: &NetworkConfList,
        attachment: &Attachment,
        cached: &Value,
    ) -> Result<bool, CniError> {
        if !list.cni_version.has_check() || list.disable_check {
            return Ok(false);
        }
        let prev =
            convert_result(cached, list.cni_version).map_err(|reason| CniError::BadResult {
                plugin: list.name.clone(),
                command: Command::Check,
                reason: format!("cached result: {reason}"),
            })?;
        for plugin in &list.plugins {
            let conf = request_config(list, plugin, Some(&attachment.capability_args), Some(&prev));
            self.run(plugin_type(plugin), Command::Check, Some(attachment), &conf)?;
        }
        Ok(true)
    }

    /// STATUS (1.1.0 on): every plugin in order; the first error says why
    /// the network cannot take pods. Older networks have no STATUS: Ok.
    pub fn status(&self, list: &NetworkConfList) -> Result<(), CniError> {
        if !list.cni_version.has_status_and_gc() {
            return Ok(());
        }
        for plugin in &list.plugins {
            let conf = request_config(list, plugin, None, None);
            self.run(plugin_type(plugin), Command::Status, None, &conf)?;
        }
        Ok(())
    }

    /// GC (1.1.0 on, unless `disableGC`): every plugin, told which
    /// attachments (container id, ifname) are still valid; carries on past
    /// errors and returns them all. Returns whether GC ran.
    pub fn gc(&self, list: &NetworkConfList, valid: &[(String, String)]) -> Result<bool, CniError> {
        if !list.cni_version.has_status_and_gc() || list.disable_gc {
            return Ok(false);
        }
        let attachments: Vec<Value> = valid
            .iter()
            .map(|(id, ifname)| json!({"containerID": id, "ifname": ifname}))
            .collect();
        let mut errors = Vec::new();
        for plugin in &list.plugins {
            let mut conf = request_config(list, plugin, None, None);
            if let Value::Object(conf) = &mut conf {
                conf.insert(
                    "cni.dev/valid-attachments".into(),
                    Value::Array(attachments.clone()),
                );
            }
            if let Err(e) = self.run(plugin_type(plugin), Command::Gc, None, &conf) {
                errors.push(e);
            }
        }
        match errors.len() {
            0 => Ok(true),
            1 => Err(errors.remove(0)),
            _ => Err(CniError::Several(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn list(version: &str, plugins: Value) -> NetworkConfList {
        let text = json!({"cniVersion": version, "name": "testnet", "plugins": plugins});
        NetworkConfList::from_bytes(Path::new("/d/t.conflist"), text.to_string().as_bytes())
            .expect("valid list")
    }

    fn attachment(netns: &Path) -> Attachment {
        Attachment::for_pod(
            "0123abcd",
            netns,
            "default",
            "web",
            "uid-1",
            vec![PortMappingArg {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
        )
        .expect("attachment")
    }

    const RESULT_040: &str = r#"{"cniVersion":"0.4.0",
        "interfaces":[{"name":"cni0","mac":"aa:bb:cc:dd:ee:01"},{"name":"veth1"},
                      {"name":"eth0","mac":"aa:bb:cc:dd:ee:02","sandbox":"/run/netns/x"}],
        "ips":[{"version":"6","address":"fd00::5/64","interface":2},
               {"version":"4","address":"10.22.0.5/24","gateway":"10.22.0.1","interface":2},
               {"version":"4","address":"10.99.0.1/24","interface":0}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    #[test]
    fn cni_args_carry_the_kubernetes_keys() {
        let a = attachment(Path::new("/run/berth/ns/p/net"));
        assert_eq!(
            a.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
             K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=uid-1"
        );
        assert_eq!(a.ifname, "eth0");
        let err = Attachment::for_pod("p1", Path::new("/n"), "a;b", "n", "u", vec![])
            .expect_err("semicolon");
        assert!(err.to_string().contains("K8S_POD_NAMESPACE"), "{err}");
        let err = Attachment::for_pod("../x", Path::new("/n"), "a", "n", "u", vec![])
            .expect_err("bad id");
        assert!(err.to_string().contains("a container id must"), "{err}");
    }

    #[test]
    fn request_config_follows_the_spec() {
        let l = list(
            "1.0.0",
            json!([
                {"type": "bridge", "name": "ignored", "cniVersion": "0.1.0", "cni.dev/x": 1, "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": true}, "snat": true},
                {"type": "tuning", "capabilities": {"portMappings": false}}
            ]),
        );
        let a = attachment(Path::new("/n"));
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let first = request_config(&l, &l.plugins[0], Some(&a.capability_args), None);
        assert_eq!(
            first,
            json!({"type": "bridge", "name": "testnet", "cniVersion": "1.0.0", "ipam": {"type": "host-local"}})
        );
        let second = request_config(&l, &l.plugins[1], Some(&a.capability_args), Some(&prev));
        assert_eq!(
            second,
            json!({"type": "portmap", "name": "testnet", "cniVersion": "1.0.0", "snat": true,
                   "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
                   "prevResult": prev})
        );
        let third = request_config(&l, &l.plugins[2], Some(&a.capability_args), None);
        assert!(third.get("runtimeConfig").is_none(), "{third}");
        // Before 1.0.0 `capabilities` stays, as libcni passed it.
        let old = list(
            "0.3.1",
            json!([{"type": "portmap", "capabilities": {"portMappings": true}}]),
        );
        let conf = request_config(&old, &old.plugins[0], Some(&a.capability_args), None);
        assert_eq!(conf["capabilities"]["portMappings"], json!(true));
        assert_eq!(
            conf["runtimeConfig"]["portMappings"][0]["hostPort"],
            json!(8080)
        );
        assert_eq!(conf["cniVersion"], json!("0.3.1"));
    }

    #[test]
    fn results_convert_between_versions() {
        let r: Value = serde_json::from_str(RESULT_040).expect("json");
        let v1 = convert_result(&r, CniVersion::new(1, 0, 0)).expect("to 1.0.0");
        assert_eq!(v1["cniVersion"], json!("1.0.0"));
        assert!(
            v1["ips"]
                .as_array()
                .expect("ips")
                .iter()
                .all(|ip| ip.get("version").is_none())
        );
        assert_eq!(v1["ips"][1]["gateway"], json!("10.22.0.1"));
        let back = convert_result(&v1, CniVersion::new(0, 3, 1)).expect("to 0.3.1");
        assert_eq!(back["ips"][0]["version"], json!("6"));
        assert_eq!(back["ips"][1]["version"], json!("4"));
        assert_eq!(back["interfaces"], r["interfaces"]);

        let v11 = json!({"cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "sandbox": "/n", "mtu": 1400, "pciID": "0000:00:01.0"}],
            "ips": [{"address": "10.1.0.2/16", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "table": 100, "priority": 5}]});
        let v04 = convert_result(&v11, CniVersion::new(0, 4, 0)).expect("to 0.4.0");
        assert_eq!(
            v04["interfaces"][0],
            json!({"name": "eth0", "sandbox": "/n"})
        );
        assert_eq!(v04["routes"][0], json!({"dst": "0.0.0.0/0"}));
        assert_eq!(v04["ips"][0]["version"], json!("4"));
        let same = convert_result(&v11, CniVersion::new(1, 1, 0)).expect("to 1.1.0");
        assert_eq!(same, v11);

        let legacy = json!({"cniVersion": "0.2.0",
            "ip4": {"ip": "10.3.0.4/24", "gateway": "10.3.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
            "dns": {"nameservers": ["10.3.0.10"]}});
        let now = convert_result(&legacy, CniVersion::new(1, 0, 0)).expect("from 0.2.0");
        assert_eq!(
            now,
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.3.0.4/24", "gateway": "10.3.0.1"}],
                   "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.3.0.10"]}})
        );

        for bad in [
            json!([]),
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": {}}),
        ] {
            assert!(
                convert_result(&bad, CniVersion::new(1, 0, 0)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn pod_ips_are_those_of_eth0_in_the_sandbox_v4_first() {
        let r: Value = serde_json::from_str(RESULT_040).expect("json");
        let ips = pod_ips(&r, "eth0").expect("ips");
        assert_eq!(
            ips,
            vec![
                "10.22.0.5".parse::<IpAddr>().expect("ip"),
                "fd00::5".parse::<IpAddr>().expect("ip")
            ]
        );
        // No interface indexes: every address but loopback.
        let bare = json!({"ips": [{"address": "127.0.0.1/8"}, {"address": "10.5.0.9/16"}]});
        assert_eq!(
            pod_ips(&bare, "eth0").expect("ips"),
            vec!["10.5.0.9".parse::<IpAddr>().expect("ip")]
        );
        // A plugin that names the sandbox interface differently still counts.
        let other = json!({"interfaces": [{"name": "net1", "sandbox": "/n"}],
                           "ips": [{"address": "10.6.0.2/24", "interface": 0}]});
        assert_eq!(
            pod_ips(&other, "eth0").expect("ips"),
            vec!["10.6.0.2".parse::<IpAddr>().expect("ip")]
        );
    }

    /// A fake plugin: records its environment and stdin under `log`, then
    /// prints `stdout` and exits with `code`.
    fn fake_plugin(dir: &Path, name: &str, log: &Path, stdout: &str, code: i32) {
        let script = format!(
            "#!/bin/sh\nn=$(ls {log} | wc -l)\nf={log}/$(printf %03d $n)-{name}-$CNI_COMMAND\n\
             env | grep -E '^(CNI_|PATH=)' | sort > $f.env\ncat > $f.json\n\
             cat <<'EOF'\n{stdout}\nEOF\nexit {code}\n",
            log = log.display()
        );
        let path = dir.join(name);
        std::fs::write(&path, script).expect("write plugin");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn calls(log: &Path) -> Vec<(String, Value, String)> {
        let mut names: Vec<_> = std::fs::read_dir(log)
            .expect("log dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                let stem = p.file_stem().expect("stem").to_string_lossy().into_owned();
                let conf =
                    serde_json::from_slice(&std::fs::read(p).expect("read")).expect("stdin json");
                let env = std::fs::read_to_string(p.with_extension("env")).expect("env");
                (stem[4..].to_string(), conf, env)
            })
            .collect()
    }

    #[test]
    fn a_network_runs_its_plugins_in_the_spec_order() {
        let bin = tempfile::tempdir().expect("bin");
        let log = tempfile::tempdir().expect("log");
        let first = r#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/n"}],
                        "ips":[{"version":"4","address":"10.7.0.3/24","interface":0}]}"#;
        fake_plugin(bin.path(), "main", log.path(), first, 0);
        // The chained plugin answers in 1.0.0 (no `version`): converted to 0.4.0.
        let second = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/n"}],
                         "ips":[{"address":"10.7.0.3/24","interface":0}]}"#;
        fake_plugin(bin.path(), "chained", log.path(), second, 0);
        let plugins = CniPlugins::new(vec![
            PathBuf::from("/nonexistent"),
            bin.path().to_path_buf(),
        ]);
        let l = list(
            "0.4.0",
            json!([{"type": "main"}, {"type": "chained", "capabilities": {"portMappings": true}}]),
        );
        let a = attachment(Path::new("/run/test/netns"));

        let result = plugins.add(&l, &a).expect("add");
        assert_eq!(result["ips"][0]["version"], json!("4"));
        assert_eq!(result["cniVersion"], json!("0.4.0"));
        assert!(plugins.check(&l, &a, &result).expect("check"));
        plugins.del(&l, &a, Some(&result)).expect("del");
        // 0.4.0 has neither STATUS nor GC: nothing runs.
        plugins.status(&l).expect("status");
        assert!(!plugins.gc(&l, &[]).expect("gc"));

        let seen = calls(log.path());
        let order: Vec<&str> = seen.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            order,
            vec![
                "main-ADD",
                "chained-ADD",
                "main-CHECK",
                "chained-CHECK",
                "chained-DEL",
                "main-DEL"
            ]
        );
        let (_, conf, env) = &seen[0];
        assert!(conf.get("prevResult").is_none(), "{conf}");
        assert!(conf.get("runtimeConfig").is_none(), "{conf}");
        for want in [
            "CNI_COMMAND=ADD",
            "CNI_CONTAINERID=0123abcd",
            "CNI_NETNS=/run/test/netns",
            "CNI_IFNAME=eth0",
            "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=uid-1",
            &format!("CNI_PATH=/nonexistent:{}", bin.path().display()),
            "PATH=",
        ] {
            assert!(env.contains(want), "{want} in\n{env}");
        }
        let (_, conf, _) = &seen[1];
        assert_eq!(
            conf["prevResult"]["ips"][0]["address"],
            json!("10.7.0.3/24")
        );
        assert_eq!(
            conf["runtimeConfig"]["portMappings"][0]["containerPort"],
            json!(80)
        );
        for (_, conf, _) in &seen[2..] {
            assert_eq!(
                conf["prevResult"], result,
                "CHECK and DEL get the ADD's result"
            );
        }

        // DEL of a network without a namespace, and of a 0.3.1 network: no prevResult.
        let old = list("0.3.1", json!([{"type": "main"}]));
        let gone = Attachment {
            netns: None,
            ..a.clone()
        };
        plugins.del(&old, &gone, Some(&result)).expect("del 0.3.1");
        assert!(
            !plugins
                .check(&old, &a, &result)
                .expect("no CHECK before 0.4.0")
        );
        let all = calls(log.path());
        let (name, conf, env) = all.last().expect("a call");
        assert_eq!(name, "main-DEL");
        assert!(conf.get("prevResult").is_none());
        assert!(env.contains("CNI_NETNS=\n"), "{env}");
    }

    #[test]
    fn status_and_gc_of_a_1_1_network() {
        let bin = tempfile::tempdir().expect("bin");
        let log = tempfile::tempdir().expect("log");
        fake_plugin(bin.path(), "a", log.path(), "", 0);
        fake_plugin(
            bin.path(),
            "b",
            log.path(),
            r#"{"cniVersion":"1.1.0","code":50,"msg":"daemon down","details":"no socket at /run/b.sock"}"#,
            1,
        );
        let plugins = CniPlugins::new(vec![bin.path().to_path_buf()]);
        let l = list(
            "1.1.0",
            json!([{"type": "a"}, {"type": "b"}, {"type": "a"}]),
        );
        let err = plugins.status(&l).expect_err("b is down");
        match &err {
            CniError::Plugin {
                plugin,
                code,
                msg,
                details,
                command,
            } => {
                assert_eq!(
                    (plugin.as_str(), *code, *command),
                    ("b", 50, Command::Status)
                );
                assert_eq!(
                    (msg.as_str(), details.as_str()),
                    ("daemon down", "no socket at /run/b.sock")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "CNI plugin b STATUS failed: daemon down: no socket at /run/b.sock (CNI error code 50)"
        );
        // GC carries on past b's error to the third plugin.
        let err = plugins
            .gc(&l, &[("pod1".to_string(), "eth0".to_string())])
            .expect_err("b fails GC");
        assert!(err.to_string().contains("daemon down"), "{err}");
        let seen = calls(log.path());
        let order: Vec<&str> = seen.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(order, vec!["a-STATUS", "b-STATUS", "a-GC", "b-GC", "a-GC"]);
        let (_, conf, env) = &seen[2];
        assert_eq!(
            conf["cni.dev/valid-attachments"],
            json!([{"containerID": "pod1", "ifname": "eth0"}])
        );
        assert!(!env.contains("CNI_CONTAINERID"), "{env}");
        assert!(!env.contains("CNI_NETNS"), "{env}");
        let disabled = NetworkConfList {
            disable_gc: true,
            ..l.clone()
        };
        assert!(!plugins.gc(&disabled, &[]).expect("disabled"));
    }

    #[test]
    fn failures_without_an_error_object_keep_the_output() {
        let bin = tempfile::tempdir().expect("bin");
        let log = tempfile::tempdir().expect("log");
        fake_plugin(bin.path(), "crash", log.path(), "panic: oops", 2);
        fake_plugin(bin.path(), "garbage", log.path(), "not json", 0);
        let plugins = CniPlugins::new(vec![bin.path().to_path_buf()]);
        let a = attachment(Path::new("/n"));
        let err = plugins
            .add(&list("1.0.0", json!([{"type": "crash"}])), &a)
            .expect_err("crash");
        let text = err.to_string();
        assert!(
            text.contains("crash ADD exit status: 2") && text.contains("panic: oops"),
            "{text}"
        );
        let err = plugins
            .add(&list("1.0.0", json!([{"type": "garbage"}])), &a)
            .expect_err("garbage");
        assert!(err.to_string().contains("not a JSON result"), "{err}");
        let err = plugins
            .add(&list("1.0.0", json!([{"type": "absent"}])), &a)
            .expect_err("absent");
        assert!(err.to_string().contains("\"absent\" is not in"), "{err}");
        assert_eq!(
            plugins.missing(&list(
                "1.0.0",
                json!([{"type": "crash"}, {"type": "absent"}])
            )),
            vec!["absent".to_string()]
        );
    }
}
