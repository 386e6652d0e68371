//! The systemd cgroup driver: slice names and the cgroupfs paths they expand
//! to, and pod slices and container scopes made as transient units through
//! systemd's D-Bus API, as kubelet expects with `cgroupDriver: systemd`.
//!
//! systemd owns the units; berth still writes limits into the unit's cgroup
//! files (as runc does besides setting unit properties), so stats, devices
//! and resource updates read and write the same files under both drivers.

use std::sync::mpsc;
use std::time::Duration;

use super::cgroup::CgroupVersion;
use super::resources::{Resources, shares_to_weight};

/// Where systemd says it is the running init (sd_booted(3)).
pub const BOOTED_MARKER: &str = "/run/systemd/system";

/// How long a unit's start or stop job may take before berth gives up.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

const DESTINATION: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("slice name {name:?}: {reason}")]
    BadSliceName { name: String, reason: &'static str },
    #[error("connect to the system bus for systemd: {0}")]
    Connect(#[source] Box<zbus::Error>),
    #[error("systemd {call} of {unit}: {source}")]
    Call {
        call: &'static str,
        unit: String,
        source: Box<zbus::Error>,
    },
    #[error("systemd job for {unit} ended with {result:?}")]
    JobFailed { unit: String, result: String },
    #[error("systemd job for {unit} did not finish in {JOB_TIMEOUT:?}")]
    JobTimeout { unit: String },
}

/// The cgroup path (relative to each hierarchy's root, the same on v1 and
/// v2) of a slice: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`, as
/// systemd nests slices by the dashes of their names. `-.slice` is the root.
pub fn expand_slice(slice: &str) -> Result<String, SystemdError> {
    let bad = |reason| SystemdError::BadSliceName {
        name: slice.to_string(),
        reason,
    };
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(bad("must end in .slice"));
    };
    if slice.contains('/') {
        return Err(bad("must not contain '/'"));
    }
    if stem == "-" {
        return Ok(String::new());
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err(bad("dashes separate non-empty parent names"));
    }
    if !stem
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '\\'))
    {
        return Err(bad(
            "systemd unit names are ASCII letters, digits and -_.:\\",
        ));
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
            path.push('/');
        }
        prefix.push_str(part);
        path.push_str(&prefix);
        path.push_str(".slice");
    }
    Ok(path)
}

/// The slice berth makes for a pod whose CRI `cgroup_parent` is empty: a
/// child of the configured parent slice, named as kubelet names its pod
/// slices (`kubepods-pod<uid>.slice`).
pub fn pod_slice(parent: &str, pod_id: &str) -> Result<String, SystemdError> {
    expand_slice(parent)?;
    let name = match parent.strip_suffix(".slice") {
        Some("-") | None => format!("pod{pod_id}.slice"),
        Some(stem) => format!("{stem}-pod{pod_id}.slice"),
    };
    expand_slice(&name)?;
    Ok(name)
}

/// The scope of a container (or of a pod's infra process), as containerd
/// names its `cri-containerd-<id>.scope`.
pub fn scope_name(id: &str) -> String {
    format!("berth-{id}.scope")
}

/// The cgroup path of a scope in the slice whose path is `slice_path`.
pub fn scope_path(slice_path: &str, id: &str) -> String {
    if slice_path.is_empty() {
        scope_name(id)
    } else {
        format!("{slice_path}/{}", scope_name(id))
    }
}

/// The pod id in the name of a pod slice berth made under `parent` (the
/// inverse of `pod_slice`); none for any other unit in that slice.
pub fn pod_of_slice<'a>(parent: &str, name: &'a str) -> Option<&'a str> {
    let prefix = match parent.strip_suffix(".slice")? {
        "-" => "pod".to_string(),
        stem => format!("{stem}-pod"),
    };
    let id = name.strip_prefix(prefix.as_str())?.strip_suffix(".slice")?;
    (!id.is_empty() && !id.contains('-')).then_some(id)
}

/// The id in the name of a scope berth made (the inverse of `scope_name`);
/// none for any other unit.
pub fn id_of_scope(name: &str) -> Option<&str> {
    let id = name.strip_prefix("berth-")?.strip_suffix(".scope")?;
    (!id.is_empty()).then_some(id)
}

/// The last component of a cgroup path that systemd expanded from a unit
/// name: the unit's name (`a.slice/a-b.slice` is `a-b.slice`).
pub fn unit_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A unit property's value, kept apart from D-Bus types so the calls are
/// tested without a bus.
#[derive(Debug, Clone, PartialEq)]
pub enum Property {
    Bool(bool),
    Str(String),
    U64(u64),
    Pids(Vec<u32>),
}

impl Property {
    fn value(&self) -> zbus::zvariant::Value<'_> {
        use zbus::zvariant::Value;
        match self {
            Property::Bool(b) => Value::from(*b),
            Property::Str(s) => Value::from(s.as_str()),
            Property::U64(n) => Value::from(*n),
            Property::Pids(p) => Value::from(p.clone()),
        }
    }
}

pub type Properties = Vec<(&'static str, Property)>;

/// The properties of a pod slice, as runc starts a slice: its parent is
/// implied by its name and pulled in with Wants=, accounting on so systemd
/// enables the controllers berth writes to.
pub fn slice_properties(name: &str, pod_id: &str) -> Properties {
    let mut props = vec![("Description", Property::Str(format!("berth pod {pod_id}")))];
    if let Some(parent) = parent_slice(name) {
        props.push(("Wants", Property::Str(parent)));
    }
    props.extend(accounting());
    props
}

/// The properties of a container scope: its slice, delegated (berth writes
/// its cgroup files), its first process, and the limits berth also writes
/// itself, so that systemd re-applying the unit (on daemon-reload) writes
/// the same values instead of resetting them.
pub fn scope_properties(
    slice: &str,
    id: &str,
    pid: u32,
    version: CgroupVersion,
    r: &Resources,
) -> Properties {
    let mut props = vec![
        (
            "Description",
            Property::Str(format!("berth container {id}")),
        ),
        ("Slice", Property::Str(slice.to_string())),
        ("Delegate", Property::Bool(true)),
        ("PIDs", Property::Pids(vec![pid])),
    ];
    props.extend(accounting());
    props.extend(limit_properties(version, r));
    props
}

fn accounting() -> Properties {
    vec![
        ("MemoryAccounting", Property::Bool(true)),
        ("CPUAccounting", Property::Bool(true)),
        ("TasksAccounting", Property::Bool(true)),
        ("DefaultDependencies", Property::Bool(false)),
    ]
}

/// CPU and memory limits as unit properties, converted as runc converts
/// them. Other limits (cpuset, hugetlb, unified) are only written to files.
fn limit_properties(version: CgroupVersion, r: &Resources) -> Properties {
    let mut props = Vec::new();
    if r.memory_limit_in_bytes > 0 {
        let key = match version {
            CgroupVersion::V1 => "MemoryLimit",
            CgroupVersion::V2 => "MemoryMax",
        };
        props.push((key, Property::U64(r.memory_limit_in_bytes as u64)));
    }
    if r.cpu_shares > 0 {
        props.push(match version {
            CgroupVersion::V1 => ("CPUShares", Property::U64(r.cpu_shares as u64)),
            CgroupVersion::V2 => (
                "CPUWeight",
                Property::U64(shares_to_weight(r.cpu_shares) as u64),
            ),
        });
    }
    if r.cpu_quota > 0 {
        let period = if r.cpu_period > 0 {
            r.cpu_period as u64
        } else {
            100_000
        };
        // systemd takes quota per second with 10ms granularity; round up
        // so the container never gets less than asked for.
        let per_sec = (r.cpu_quota as u64 * 1_000_000 / period).div_ceil(10_000) * 10_000;
        props.push(("CPUQuotaPerSecUSec", Property::U64(per_sec)));
        props.push(("CPUQuotaPeriodUSec", Property::U64(period)));
    }
    props
}

/// The parent slice of a slice by its name; none for top-level slices,
/// whose parent is the root slice systemd always has.
fn parent_slice(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".slice")?;
    let (parent, _) = stem.rsplit_once('-')?;
    Some(format!("{parent}.slice"))
}

/// A connection to systemd's manager on the system bus. Blocking: call it
/// off the async workers.
pub struct Systemd {
    conn: zbus::blocking::Connection,
}

impl Systemd {
    pub fn connect() -> Result<Systemd, SystemdError> {
        let conn =
            zbus::blocking::Connection::system().map_err(|e| SystemdError::Connect(Box::new(e)))?;
        // systemd sends JobRemoved on the system bus only while some client
        // is subscribed; berth waits for it, so it subscribes itself.
        conn.call_method(Some(DESTINATION), PATH, Some(MANAGER), "Subscribe", &())
            .map_err(|source| SystemdError::Call {
                call: "Subscribe",
                unit: String::new(),
                source: Box::new(source),
            })?;
        Ok(Systemd { conn })
    }

    /// Starts a transient unit and waits for its job. A unit that already
    /// exists (a restart re-making what is there) counts as started.
    pub fn start(&self, unit: &str, props: &Properties) -> Result<(), SystemdError> {
        let call = |unit: &str| {
            self.conn.call_method(
                Some(DESTINATION),
                PATH,
                Some(MANAGER),
                "StartTransientUnit",
                &start_transient_unit_args(unit, props),
            )
        };
        match self.run_job(unit, "StartTransientUnit", call) {
            Err(SystemdError::Call { source, .. }) if is_error(&source, "UnitExists") => {
                tracing::debug!(unit, "unit exists already");
                Ok(())
            }
            other => other,
        }
    }

    /// Stops a unit and waits for its job. A unit systemd no longer knows
    /// (a scope whose processes all exited is collected) is stopped already.
    pub fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        let call = |unit: &str| {
            self.conn.call_method(
                Some(DESTINATION),
                PATH,
                Some(MANAGER),
                "StopUnit",
                &(unit, "replace"),
            )
        };
        match self.run_job(unit, "StopUnit", call) {
            Err(SystemdError::Call { source, .. }) if is_error(&source, "NoSuchUnit") => Ok(()),
            other => other,
        }
    }

    /// Makes a call that returns a job and waits for that job's JobRemoved.
    fn run_job(
        &self,
        unit: &str,
        name: &'static str,
        call: impl FnOnce(&str) -> zbus::Result<zbus::message::Message>,
    ) -> Result<(), SystemdError> {
        let failed = |source| SystemdError::Call {
            call: name,
            unit: unit.to_string(),
            source: Box::new(source),
        };
        let proxy =
            zbus::blocking::Proxy::new(&self.conn, DESTINATION, PATH, MANAGER).map_err(failed)?;
        // Listen before the call, or a quick job's signal is missed.
        let signals = proxy.receive_signal("JobRemoved").map_err(failed)?;
        let reply = call(unit).map_err(failed)?;
        let job: zbus::zvariant::OwnedObjectPath = reply.body().deserialize().map_err(failed)?;
        // The blocking signal iterator has no timeout: a thread reads it and
        // ends at the next signal after the waiter gave up.
        let (tx, rx) = mpsc::channel();
        let wanted = job.clone();
        std::thread::spawn(move || {
            for message in signals {
                let Ok((_, path, _, result)) =
                    message
                        .body()
                        .deserialize::<(u32, zbus::zvariant::OwnedObjectPath, String, String)>()
                else {
                    continue;
                };
                if path == wanted {
                    let _ = tx.send(result);
                    return;
                }
            }
        });
        match rx.recv_timeout(JOB_TIMEOUT) {
            Ok(result) if result == "done" => {
                tracing::debug!(unit, job = %job.as_str(), "systemd job done");
                Ok(())
            }
            Ok(result) => Err(SystemdError::JobFailed {
                unit: unit.to_string(),
                result,
            }),
            Err(_) => Err(SystemdError::JobTimeout {
                unit: unit.to_string(),
            }),
        }
    }
}

type UnitProperties<'a> = Vec<(&'a str, zbus::zvariant::Value<'a>)>;

/// The arguments of `StartTransientUnit(s name, s mode, a(sv) properties,
/// a(sa(sv)) aux)`; mode `replace`, as runc starts units, and no auxiliary
/// units.
fn start_transient_unit_args<'a>(
    unit: &'a str,
    props: &'a Properties,
) -> (
    &'a str,
    &'static str,
    UnitProperties<'a>,
    Vec<(&'a str, UnitProperties<'a>)>,
) {
    let properties = props.iter().map(|(k, v)| (*k, v.value())).collect();
    (unit, "replace", properties, Vec::new())
}

fn is_error(e: &zbus::Error, name: &str) -> bool {
    matches!(e, zbus::Error::MethodError(n, _, _)
        if n.as_str() == format!("org.freedesktop.systemd1.{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_expand_by_their_dashes() {
        assert_eq!(expand_slice("berth.slice").unwrap(), "berth.slice");
        assert_eq!(
            expand_slice("a-b-c.slice").unwrap(),
            "a.slice/a-b.slice/a-b-c.slice"
        );
        assert_eq!(
            expand_slice("kubepods-burstable-pod1234.slice").unwrap(),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice"
        );
        assert_eq!(expand_slice("-.slice").unwrap(), "");
    }

    #[test]
    fn bad_slice_names_are_refused() {
        for bad in [
            "a--b.slice",
            "-a.slice",
            "a-.slice",
            ".slice",
            "a.scope",
            "a",
            "a/b.slice",
            "a b.slice",
        ] {
            assert!(
                matches!(expand_slice(bad), Err(SystemdError::BadSliceName { .. })),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn pods_get_a_child_of_the_configured_slice() {
        assert_eq!(
            pod_slice("berth.slice", "ab12").unwrap(),
            "berth-podab12.slice"
        );
        assert_eq!(
            expand_slice(&pod_slice("system-berth.slice", "ab12").unwrap()).unwrap(),
            "system.slice/system-berth.slice/system-berth-podab12.slice"
        );
        assert_eq!(pod_slice("-.slice", "ab12").unwrap(), "podab12.slice");
        assert!(pod_slice("berth", "ab12").is_err());
        assert!(pod_slice("berth.slice", "a-").is_err(), "an id with a dash");
    }

    #[test]
    fn containers_are_scopes_in_the_pod_slice() {
        let slice = expand_slice("kubepods-besteffort-pod1.slice").unwrap();
        assert_eq!(
            scope_path(&slice, "c0ffee"),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/berth-c0ffee.scope"
        );
        assert_eq!(scope_path("", "c0ffee"), "berth-c0ffee.scope");
        assert_eq!(unit_of(&slice), "kubepods-besteffort-pod1.slice");
        assert_eq!(unit_of(&scope_path(&slice, "c0")), "berth-c0.scope");
    }

    #[test]
    fn berths_own_units_are_told_from_others_by_name() {
        let slice = pod_slice("system-berth.slice", "ab12").unwrap();
        assert_eq!(pod_of_slice("system-berth.slice", &slice), Some("ab12"));
        assert_eq!(pod_of_slice("-.slice", "podab12.slice"), Some("ab12"));
        for other in [
            "system-berth-x.slice",
            "system-berth-pod.slice",
            "cron.service",
        ] {
            assert_eq!(pod_of_slice("system-berth.slice", other), None, "{other}");
        }
        assert_eq!(id_of_scope(&scope_name("c0ffee")), Some("c0ffee"));
        assert_eq!(id_of_scope("session-1.scope"), None);
        assert_eq!(id_of_scope("berth-.scope"), None);
    }

    #[test]
    fn scope_and_slice_paths_are_the_same_in_every_hierarchy() {
        // systemd mirrors one unit tree into each v1 hierarchy and the v2 one.
        let cgroups =
            super::super::cgroup::Cgroups::discover(std::path::Path::new("/sys/fs/cgroup"))
                .expect("cgroups");
        let rel = scope_path(&expand_slice("a-b.slice").unwrap(), "c1");
        for dir in cgroups.dirs(&rel).expect("dirs") {
            assert!(
                dir.ends_with("a.slice/a-b.slice/berth-c1.scope"),
                "{}",
                dir.display()
            );
        }
    }

    #[test]
    fn a_pod_slice_wants_its_parent() {
        let props = slice_properties("berth-podab.slice", "ab");
        assert!(props.contains(&("Wants", Property::Str("berth.slice".into()))));
        assert!(props.contains(&("Description", Property::Str("berth pod ab".into()))));
        assert!(props.contains(&("MemoryAccounting", Property::Bool(true))));
        let top = slice_properties("podab.slice", "ab");
        assert!(!top.iter().any(|(k, _)| *k == "Wants"));
    }

    #[test]
    fn a_scope_is_delegated_with_its_pid_and_limits() {
        let r = Resources {
            cpu_shares: 512,
            cpu_quota: 25_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        };
        let props = scope_properties("pod.slice", "c1", 42, CgroupVersion::V2, &r);
        for want in [
            ("Slice", Property::Str("pod.slice".into())),
            ("Delegate", Property::Bool(true)),
            ("PIDs", Property::Pids(vec![42])),
            ("MemoryMax", Property::U64(64 << 20)),
            ("CPUWeight", Property::U64(shares_to_weight(512) as u64)),
            ("CPUQuotaPerSecUSec", Property::U64(250_000)),
            ("CPUQuotaPeriodUSec", Property::U64(100_000)),
        ] {
            assert!(props.contains(&want), "{want:?} missing from {props:?}");
        }
        let v1 = scope_properties("pod.slice", "c1", 42, CgroupVersion::V1, &r);
        assert!(v1.contains(&("MemoryLimit", Property::U64(64 << 20))));
        assert!(v1.contains(&("CPUShares", Property::U64(512))));
        // 1.5ms of a 100ms period is 15ms a second; rounded up to 20ms.
        let odd = Resources {
            cpu_quota: 1_500,
            ..Default::default()
        };
        let p = scope_properties("s.slice", "c", 1, CgroupVersion::V2, &odd);
        assert!(p.contains(&("CPUQuotaPerSecUSec", Property::U64(20_000))));
        let none = scope_properties("s.slice", "c", 1, CgroupVersion::V2, &Resources::default());
        assert!(
            !none
                .iter()
                .any(|(k, _)| k.starts_with("CPUQuota") || *k == "MemoryMax")
        );
    }

    #[test]
    fn the_start_call_has_systemds_signature() {
        let props = scope_properties(
            "p.slice",
            "c1",
            42,
            CgroupVersion::V1,
            &Resources::default(),
        );
        let msg = zbus::message::Message::method_call(PATH, "StartTransientUnit")
            .and_then(|b| b.destination(DESTINATION))
            .and_then(|b| b.interface(MANAGER))
            .and_then(|b| b.build(&start_transient_unit_args("berth-c1.scope", &props)))
            .expect("message");
        let body = msg.body();
        // The wire form: the body's fields without the struct's parentheses.
        assert_eq!(body.signature().to_string_no_parens(), "ssa(sv)a(sa(sv))");
        type Sent = Vec<(String, zbus::zvariant::OwnedValue)>;
        let (unit, mode, sent, aux): (String, String, Sent, Vec<(String, Sent)>) =
            body.deserialize().expect("decode");
        assert_eq!(
            (unit.as_str(), mode.as_str()),
            ("berth-c1.scope", "replace")
        );
        assert!(aux.is_empty());
        let pids = sent.iter().find(|(k, _)| k == "PIDs").expect("PIDs");
        assert_eq!(pids.1.value_signature().to_string(), "au");
        let delegate = sent
            .iter()
            .find(|(k, _)| k == "Delegate")
            .expect("Delegate");
        assert_eq!(bool::try_from(&delegate.1), Ok(true));
    }

    #[test]
    fn properties_become_dbus_variants() {
        use zbus::zvariant::Value;
        assert_eq!(Property::Pids(vec![7]).value(), Value::from(vec![7u32]));
        assert_eq!(Property::U64(1).value(), Value::from(1u64));
        assert_eq!(Property::Str("x".into()).value(), Value::from("x"));
    }
}
