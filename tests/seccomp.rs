//! Seccomp filters on real processes: a small static C probe (built with gcc
//! at test time, threads with glibc's pthread_create, which tries clone3
//! first) runs under compiled profiles, loaded between fork and exec and
//! through the real container path (`berthd monitor`, the init, `berthd
//! exec-in`). Checks RuntimeDefault (EPERM for namespaces, keyctl, mount;
//! ENOSYS for clone3; threads work), a Localhost profile, inheritance across
//! exec, and when the init loads the filter; and through CRI on a real
//! berthd, which profile a container gets and how a bad Localhost profile
//! fails CreateContainer. Needs root and gcc.

mod common;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use berth::monitor::{self, MonitorStatus, exec_sync};
use berth::runtime::seccomp::{self, Program, SeccompCache};
use common::bundle::{BERTHD, Bundle, default_caps, spec};
use common::cri_pod::{CriNode, Rt, create, remove_pod, run_pod, run_to_exit};
use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::*;
use oci_spec::runtime::LinuxSeccomp;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// Runs each probe named on the command line in a child of its own and
/// prints `name=ok` or `name=<errno name>`.
const PROBE_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int err(long rc) { return rc < 0 ? errno : 0; }
static void *thread_main(void *arg) { return arg; }

static int run(const char *name) {
    if (!strcmp(name, "getpid")) return err(getpid());
    if (!strcmp(name, "thread")) {
        pthread_t t;
        int rc = pthread_create(&t, NULL, thread_main, NULL);
        return rc ? rc : pthread_join(t, NULL);
    }
    if (!strcmp(name, "fork")) {
        pid_t pid = fork();
        if (pid < 0) return errno;
        if (pid == 0) _exit(0);
        waitpid(pid, NULL, 0);
        return 0;
    }
    if (!strcmp(name, "clone3")) return err(syscall(SYS_clone3, NULL, 0));
    if (!strcmp(name, "nosys")) return err(syscall(1000, 0, 0, 0));
    if (!strcmp(name, "clone-newuts")) {
        long pid = syscall(SYS_clone, CLONE_NEWUTS | SIGCHLD, 0, 0, 0, 0);
        if (pid < 0) return errno;
        if (pid == 0) _exit(0);
        waitpid(pid, NULL, 0);
        return 0;
    }
    if (!strcmp(name, "unshare-user")) return err(unshare(CLONE_NEWUSER));
    if (!strcmp(name, "unshare-net")) return err(unshare(CLONE_NEWNET));
    if (!strcmp(name, "keyctl")) return err(syscall(SYS_keyctl, 0, -3, 0));
    if (!strcmp(name, "mount")) return err(mount("none", "/nonexistent-berth", "tmpfs", 0, NULL));
    if (!strcmp(name, "sethostname")) {
        /* Never the host's name: in a UTS namespace of its own or not at all. */
        if (unshare(CLONE_NEWUTS) < 0) return errno;
        return err(sethostname("probe", 5));
    }
    if (!strcmp(name, "socket-inet")) return err(socket(AF_INET, SOCK_DGRAM, 0));
    if (!strcmp(name, "socket-alg")) return err(socket(AF_ALG, SOCK_SEQPACKET, 0));
    if (!strcmp(name, "personality-query")) return err(personality(0xffffffff));
    if (!strcmp(name, "personality-bsd")) return err(personality(PER_BSD));
    return EINVAL;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        pid_t pid = fork();
        if (pid < 0) { printf("%s=fork:%s\n", argv[i], strerrorname_np(errno)); continue; }
        if (pid == 0) _exit(run(argv[i]));
        int status = 0;
        waitpid(pid, &status, 0);
        int e = WIFEXITED(status) ? WEXITSTATUS(status) : 1000 + WTERMSIG(status);
        printf("%s=%s\n", argv[i], e == 0 ? "ok" : e >= 1000 ? "signal" : strerrorname_np(e));
    }
    fflush(stdout);
    return 0;
}
"#;

/// The probe, built once per test run (static, so it also runs in a
/// busybox rootfs).
fn probe() -> &'static Path {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seccomp-probe");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let source = dir.join("probe.c");
        std::fs::write(&source, PROBE_C).expect("write probe.c");
        let exe = dir.join(format!("probe-{}", std::process::id()));
        let out = Command::new("gcc")
            .args(["-O1", "-static", "-pthread", "-o"])
            .arg(&exe)
            .arg(&source)
            .output()
            .expect("run gcc");
        assert!(
            out.status.success(),
            "gcc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

fn parse(output: &str) -> HashMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs `exe args` with `program` loaded between fork and exec.
fn run_under(program: Option<Arc<Program>>, exe: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if let Some(program) = program {
        // SAFETY: install() only makes the seccomp syscall (no allocation,
        // no lock) unless it fails.
        unsafe {
            cmd.pre_exec(move || program.install().map_err(std::io::Error::other));
        }
    }
    let out = cmd.output().expect("run the probe");
    assert!(
        out.status.success(),
        "{} {args:?}: {:?} {}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn probe_under(program: Option<Arc<Program>>, probes: &[&str]) -> HashMap<String, String> {
    parse(&run_under(program, probe(), probes))
}

fn compiled(profile: &LinuxSeccomp) -> Arc<Program> {
    Arc::new(Program::compile(profile).expect("compile"))
}

fn caps_with(extra: &[&str]) -> Vec<String> {
    let mut caps = default_caps();
    caps.extend(extra.iter().map(|c| c.to_string()));
    caps
}

fn assert_results(results: &HashMap<String, String>, expected: &[(&str, &str)]) {
    for (name, want) in expected {
        assert_eq!(
            results.get(*name).map(String::as_str),
            Some(*want),
            "{name} in {results:?}"
        );
    }
}

/// What RuntimeDefault without CAP_SYS_ADMIN must give.
const RUNTIME_DEFAULT: [(&str, &str); 14] = [
    ("getpid", "ok"),
    // Newer than any syscall the profile names: ENOSYS, not EPERM.
    ("nosys", "ENOSYS"),
    ("thread", "ok"),
    ("fork", "ok"),
    ("clone3", "ENOSYS"),
    ("clone-newuts", "EPERM"),
    ("unshare-user", "EPERM"),
    ("unshare-net", "EPERM"),
    ("keyctl", "EPERM"),
    ("mount", "EPERM"),
    ("socket-inet", "ok"),
    ("socket-alg", "EPERM"),
    ("personality-query", "ok"),
    ("personality-bsd", "EPERM"),
];

fn probe_names() -> Vec<&'static str> {
    RUNTIME_DEFAULT.iter().map(|(name, _)| *name).collect()
}

#[test]
fn unfiltered_the_probe_sees_the_real_syscalls() {
    let results = probe_under(
        None,
        &[
            "getpid",
            "thread",
            "clone3",
            "unshare-net",
            "mount",
            "nosys",
        ],
    );
    assert_results(
        &results,
        &[
            ("getpid", "ok"),
            ("thread", "ok"),
            // clone3 with a size of 0 is invalid, not missing.
            ("clone3", "EINVAL"),
            ("unshare-net", "ok"),
            ("mount", "ENOENT"),
            ("nosys", "ENOSYS"),
        ],
    );
}

#[test]
fn runtime_default_denies_with_eperm_but_clone3_with_enosys_and_threads_run() {
    let program = compiled(&seccomp::default_profile(&default_caps()));
    let results = probe_under(Some(program), &probe_names());
    assert_results(&results, &RUNTIME_DEFAULT);
}

#[test]
fn runtime_default_with_sys_admin_allows_namespaces_and_clone3() {
    let program = compiled(&seccomp::default_profile(&caps_with(&["CAP_SYS_ADMIN"])));
    let results = probe_under(
        Some(program),
        &[
            "thread",
            "clone3",
            "clone-newuts",
            "unshare-net",
            "mount",
            "keyctl",
        ],
    );
    assert_results(
        &results,
        &[
            ("thread", "ok"),
            ("clone3", "EINVAL"),
            ("clone-newuts", "ok"),
            ("unshare-net", "ok"),
            ("mount", "ENOENT"),
            // Not opened by any capability.
            ("keyctl", "EPERM"),
        ],
    );
}

/// Why clone3 must fail with ENOSYS: glibc ≥ 2.34 falls back to clone only
/// then, so EPERM breaks every thread.
#[test]
fn clone3_with_eperm_breaks_threads_and_with_enosys_does_not() {
    let profile = |errno: i32| -> LinuxSeccomp {
        serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno}],
        }))
        .expect("profile")
    };
    let eperm = probe_under(Some(compiled(&profile(libc::EPERM))), &["thread", "clone3"]);
    assert_results(&eperm, &[("thread", "EPERM"), ("clone3", "EPERM")]);
    let enosys = probe_under(
        Some(compiled(&profile(libc::ENOSYS))),
        &["thread", "clone3"],
    );
    assert_results(&enosys, &[("thread", "ok"), ("clone3", "ENOSYS")]);
}

#[test]
fn a_localhost_profile_blocking_sethostname_fails_it_with_eperm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no-hostname.json");
    std::fs::write(
        &path,
        r#"{
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["sethostname", "setdomainname"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["keyctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}
            ]
        }"#,
    )
    .expect("write profile");
    let profile = seccomp::load_localhost(&path).expect("load");
    let results = probe_under(
        Some(compiled(&profile)),
        &["sethostname", "keyctl", "unshare-net", "thread"],
    );
    assert_results(
        &results,
        &[
            ("sethostname", "EPERM"),
            ("keyctl", "EACCES"),
            ("unshare-net", "ok"),
            ("thread", "ok"),
        ],
    );
}

#[test]
fn the_filter_is_inherited_across_exec() {
    let program = compiled(&seccomp::default_profile(&default_caps()));
    let script = format!(
        "grep -E '^Seccomp(_filters)?:' /proc/self/status; exec {} keyctl clone3 thread",
        probe().display()
    );
    let out = run_under(
        Some(program),
        Path::new("/bin/busybox"),
        &["sh", "-c", &script],
    );
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("Seccomp_filters:\t1"), "{out}");
    assert_results(
        &parse(&out),
        &[("keyctl", "EPERM"), ("clone3", "ENOSYS"), ("thread", "ok")],
    );
}

// ---------------------------------------------------------------------------
// Through the container path.

/// A bundle running the probe as `uid`, with RuntimeDefault in the spec and,
/// if `precompiled`, berthd's program file beside config.json.
fn probe_bundle(args: &[&str], uid: u32, nnp: bool, precompiled: bool) -> Bundle {
    let bundle = Bundle::new("berth-seccomp-");
    bundle.add_program(probe(), "probe");
    let profile = seccomp::default_profile(&default_caps());
    let mut s = spec(args, uid, nnp);
    s["linux"]["seccomp"] = serde_json::to_value(&profile).expect("profile json");
    bundle.write(s);
    if precompiled {
        Program::compile(&profile)
            .expect("compile")
            .write(&bundle.path().join(seccomp::PROGRAM_FILE))
            .expect("write program");
    }
    bundle
}

/// "Seccomp:" of the process's status: 0 none, 2 filtered.
fn seccomp_mode(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

async fn start_and_wait(bundle: &Bundle) -> MonitorStatus {
    let watch = bundle.connect().await;
    bundle.connect().await.start().await.expect("start");
    tokio::time::timeout(WAIT, watch.wait_closed())
        .await
        .expect("the container did not exit in time");
    monitor::read_status(bundle.path()).expect("status")
}

/// Without no_new_privs the init loads the filter while it still holds
/// CAP_SYS_ADMIN, before the uid change: the created container is filtered
/// already, and a non-root user works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_without_no_new_privs_is_filtered_from_creation() {
    let mut args = vec!["/bin/probe"];
    args.extend(probe_names());
    let mut bundle = probe_bundle(&args, 1000, false, true);
    let created = bundle.launch().await.expect("create");
    assert_eq!(seccomp_mode(created.init_pid), "2");
    let status = start_and_wait(&bundle).await;
    assert_eq!(status.exit_code, 0, "{status:?} {}", bundle.log_text());
    assert_results(&parse(&bundle.log_text()), &RUNTIME_DEFAULT);
}

/// With no_new_privs the filter comes last, after start; with no program
/// file the init compiles the spec's profile itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_with_no_new_privs_is_filtered_right_before_exec() {
    let mut args = vec!["/bin/probe"];
    args.extend(probe_names());
    let mut bundle = probe_bundle(&args, 1000, true, false);
    let created = bundle.launch().await.expect("create");
    assert_eq!(seccomp_mode(created.init_pid), "0");
    let status = start_and_wait(&bundle).await;
    assert_eq!(status.exit_code, 0, "{status:?} {}", bundle.log_text());
    assert_results(&parse(&bundle.log_text()), &RUNTIME_DEFAULT);
}

/// A program file of another profile is not loaded: the spec decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_program_file_is_not_loaded() {
    let mut bundle = probe_bundle(&["/bin/probe", "unshare-net", "thread"], 0, false, false);
    Program::compile(&seccomp::default_profile(&caps_with(&["CAP_SYS_ADMIN"])))
        .expect("compile")
        .write(&bundle.path().join(seccomp::PROGRAM_FILE))
        .expect("write");
    bundle.launch().await.expect("create");
    start_and_wait(&bundle).await;
    assert_results(
        &parse(&bundle.log_text()),
        &[("unshare-net", "EPERM"), ("thread", "ok")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_in_gets_the_containers_filter() {
    for nnp in [false, true] {
        let mut bundle = probe_bundle(&["sleep", "30"], 1000, nnp, true);
        let created = bundle.launch().await.expect("create");
        let mut control = bundle.connect().await;
        control.start().await.expect("start");
        let mut args = vec!["/bin/probe".to_string()];
        args.extend(probe_names().iter().map(|s| s.to_string()));
        let out = exec_sync(
            Path::new(BERTHD),
            bundle.path(),
            created.init_pid,
            &args,
            Some(WAIT),
        )
        .await
        .expect("exec");
        assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert_results(
            &parse(&String::from_utf8_lossy(&out.stdout)),
            &RUNTIME_DEFAULT,
        );
        let watch = bundle.connect().await;
        control.kill(libc::SIGKILL, true).await.expect("kill");
        tokio::time::timeout(WAIT, watch.wait_closed())
            .await
            .expect("exit after kill");
    }
}

// ---------------------------------------------------------------------------
// Through CRI.

/// A node with one pod, `seccomp`, for the containers of a test.
struct Node {
    cri: CriNode,
    pod: String,
    pod_config: PodSandboxConfig,
}

async fn node() -> Node {
    let cri = CriNode::start().await;
    let pod_config = cri.pod_config("seccomp");
    let pod = run_pod(&mut cri.runtime().await, &pod_config).await;
    Node {
        cri,
        pod,
        pod_config,
    }
}

fn profile(typ: ProfileType, localhost_ref: &str) -> Option<SecurityProfile> {
    Some(SecurityProfile {
        profile_type: typ as i32,
        localhost_ref: localhost_ref.to_string(),
    })
}

impl Node {
    fn config(
        &self,
        name: &str,
        script: &str,
        seccomp: Option<SecurityProfile>,
    ) -> ContainerConfig {
        ContainerConfig {
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    seccomp,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..self.cri.container_config(name, script)
        }
    }

    async fn create(&self, rt: &mut Rt, config: ContainerConfig) -> Result<String, tonic::Status> {
        create(rt, &self.pod, &self.pod_config, &config).await
    }

    /// Stops and removes the pod and its containers: berthd's harness
    /// checks that nothing is left.
    async fn finish(self) {
        remove_pod(&mut self.cri.runtime().await, &self.pod).await;
    }

    /// Creates, starts and waits for the container; returns its log text.
    async fn run(&self, rt: &mut Rt, config: ContainerConfig) -> String {
        run_to_exit(rt, &self.pod, &self.pod_config, &config).await;
        self.cri.log(&self.pod_config, &config)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_cri_containers_get_the_profile_they_ask_for() {
    let node = node().await;
    let mut rt = node.cri.runtime().await;
    let script = "grep Seccomp: /proc/self/status; mkdir /tmp/d 2>&1 || true; echo end";
    let log = node
        .run(
            &mut rt,
            node.config("default", script, profile(ProfileType::RuntimeDefault, "")),
        )
        .await;
    assert!(log.contains("Seccomp:\t2"), "{log}");
    assert!(!log.contains("can't create"), "{log}");
    let log = node
        .run(
            &mut rt,
            node.config("unconfined", script, profile(ProfileType::Unconfined, "")),
        )
        .await;
    assert!(log.contains("Seccomp:\t0"), "{log}");
    // No profile named: unconfined, as in Kubernetes.
    let log = node.run(&mut rt, node.config("unset", script, None)).await;
    assert!(log.contains("Seccomp:\t0"), "{log}");

    let dir = tempfile::tempdir().expect("tempdir");
    let no_mkdir = dir.path().join("no-mkdir.json");
    std::fs::write(
        &no_mkdir,
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )
    .expect("write profile");
    let localhost = profile(ProfileType::Localhost, &no_mkdir.display().to_string());
    let log = node
        .run(&mut rt, node.config("localhost", script, localhost))
        .await;
    assert!(log.contains("Seccomp:\t2"), "{log}");
    assert!(log.contains("Operation not permitted"), "{log}");
    assert!(log.contains("end"), "{log}");
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_cri_a_missing_or_malformed_localhost_profile_fails_create() {
    let node = node().await;
    let mut rt = node.cri.runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.json");
    let malformed = dir.path().join("malformed.json");
    std::fs::write(
        &malformed,
        r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": ["#,
    )
    .expect("write");
    for (name, path, words) in [
        ("missing", &missing, "no such file"),
        ("malformed", &malformed, "not a valid OCI seccomp profile"),
    ] {
        let config = node.config(
            name,
            "true",
            profile(ProfileType::Localhost, &path.display().to_string()),
        );
        let err = node.create(&mut rt, config).await.expect_err(name);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(words), "{}", err.message());
        assert!(
            err.message().contains(&path.display().to_string()),
            "{}",
            err.message()
        );
    }
    let listed = rt
        .list_containers(ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert!(listed.is_empty(), "nothing half-made: {listed:?}");
    node.finish().await;
}

// ---------------------------------------------------------------------------
// Cost: `cargo test --test seccomp -- --ignored --nocapture creation_cost`.

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Makes a bundle's spec as heavy as berthd's: its mounts (with binds of
/// hostname, hosts and resolv.conf) and its masked and readonly paths.
fn berthd_like(bundle: &Bundle, spec: &mut serde_json::Value) {
    let mut binds = Vec::new();
    for name in ["hostname", "hosts", "resolv.conf"] {
        let file = bundle.path().join(name);
        std::fs::write(&file, "x\n").expect("write");
        binds.push(
            json!({"destination": format!("/etc/{name}"), "type": "bind",
            "source": file, "options": ["rbind", "rw"]}),
        );
    }
    let mounts = spec["mounts"].as_array_mut().expect("mounts");
    mounts.extend([
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
    ]);
    mounts.extend(binds);
    spec["linux"]["maskedPaths"] = json!(berth::runtime::spec::MASKED_PATHS);
    spec["linux"]["readonlyPaths"] = json!(berth::runtime::spec::READONLY_PATHS);
}

/// Creates (and removes) containers with and without RuntimeDefault,
/// interleaved, and prints the medians of create: berthd's part (profile,
/// cache lookup, program file, config.json) plus `monitor::launch`
/// (monitor, init setup up to "created", which loads the filter when
/// no_new_privs is off). The spec is as heavy as berthd's, but there are no
/// cgroups, overlay mount or records, which berthd's create adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn creation_cost() {
    const ROUNDS: usize = 40;
    let cache = SeccompCache::new();
    let profile = seccomp::default_profile(&default_caps());
    let started = Instant::now();
    let first = cache.get_or_compile(&profile).expect("compile");
    println!(
        "compile RuntimeDefault once: {} ({} instructions)",
        ms(started.elapsed()),
        first.instructions()
    );
    // Without seccomp; RuntimeDefault loaded at create (no_new_privs off,
    // Kubernetes' default); RuntimeDefault loaded at start (no_new_privs on).
    let variants = [("without seccomp", None), ("RuntimeDefault", Some(false))];
    let variants = [
        variants[0],
        variants[1],
        ("RuntimeDefault, no_new_privs", Some(true)),
    ];
    let mut times = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for ((_, seccomp), times) in variants.iter().zip(&mut times) {
            let mut bundle = Bundle::new("berth-seccomp-cost-");
            let started = Instant::now();
            let mut s = spec(&["true"], 0, seccomp.unwrap_or(false));
            berthd_like(&bundle, &mut s);
            if seccomp.is_some() {
                let profile = seccomp::default_profile(&default_caps());
                s["linux"]["seccomp"] = serde_json::to_value(&profile).expect("profile json");
                let program = cache.get_or_compile(&profile).expect("compile");
                program
                    .write(&bundle.path().join(seccomp::PROGRAM_FILE))
                    .expect("write program");
            }
            bundle.write(s);
            let created = bundle.launch().await.expect("create");
            times.push(started.elapsed());
            let loaded = if *seccomp == Some(false) { "2" } else { "0" };
            assert_eq!(seccomp_mode(created.init_pid), loaded);
            let mut control = bundle.connect().await;
            let watch = bundle.connect().await;
            control.kill(libc::SIGKILL, true).await.expect("kill");
            tokio::time::timeout(WAIT, watch.wait_closed())
                .await
                .expect("exit");
        }
    }
    let base = median(times[0].clone());
    for ((name, _), times) in variants.iter().zip(times) {
        let m = median(times);
        println!(
            "create, median of {ROUNDS}, {name}: {} ({:+.1}%)",
            ms(m),
            (m.as_secs_f64() / base.as_secs_f64() - 1.0) * 100.0
        );
    }
}

/// Time to load a filter and what it adds to a cheap syscall, for the
/// default profile as compiled and for a native-only variant:
/// `cargo test --release --test seccomp -- --ignored --nocapture load_cost`.
#[test]
#[ignore = "a measurement; run by hand"]
fn load_cost() {
    const ROUNDS: usize = 20;
    const CALLS: u32 = 20_000;
    let getpid_cost = || {
        let started = Instant::now();
        for _ in 0..CALLS {
            // SAFETY: getpid has no arguments and no side effects.
            unsafe { libc::syscall(libc::SYS_getpid) };
        }
        let getpid = started.elapsed() / CALLS;
        let started = Instant::now();
        for _ in 0..CALLS {
            // SAFETY: personality(0xffffffff) only reads the persona; its
            // argument makes the filter evaluate it (no cached verdict).
            unsafe { libc::personality(0xffff_ffff) };
        }
        (getpid, started.elapsed() / CALLS)
    };
    let time = |what: &str, f: &mut dyn FnMut()| {
        let mut times = Vec::new();
        for _ in 0..50 {
            let started = Instant::now();
            f();
            times.push(started.elapsed());
        }
        println!("{what}: {:.1} us", median(times).as_secs_f64() * 1e6);
    };
    time("default_profile", &mut || {
        seccomp::default_profile(&default_caps());
    });
    let profile = seccomp::default_profile(&default_caps());
    let plain = spec(&["true"], 0, false);
    let mut with = plain.clone();
    with["linux"]["seccomp"] = serde_json::to_value(&profile).expect("value");
    time("profile to_value", &mut || {
        serde_json::to_value(&profile).expect("value");
    });
    let plain_bytes = serde_json::to_vec_pretty(&plain).expect("json");
    let with_bytes = serde_json::to_vec_pretty(&with).expect("json");
    println!(
        "config.json: {} vs {} bytes",
        plain_bytes.len(),
        with_bytes.len()
    );
    time("write config.json without", &mut || {
        serde_json::to_vec_pretty(&plain).expect("json");
    });
    time("write config.json with", &mut || {
        serde_json::to_vec_pretty(&with).expect("json");
    });
    time("parse Spec without", &mut || {
        serde_json::from_slice::<oci_spec::runtime::Spec>(&plain_bytes).expect("spec");
    });
    time("parse Spec with", &mut || {
        serde_json::from_slice::<oci_spec::runtime::Spec>(&with_bytes).expect("spec");
    });
    let cache = SeccompCache::new();
    cache.get_or_compile(&profile).expect("compile");
    time("cache hit", &mut || {
        cache.get_or_compile(&profile).expect("hit");
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(seccomp::PROGRAM_FILE);
    let program = cache.get_or_compile(&profile).expect("hit");
    time("write program file over the last", &mut || {
        program.write(&file).expect("write")
    });
    let mut n = 0;
    time("write a new program file", &mut || {
        n += 1;
        program
            .write(&dir.path().join(format!("{n}.bpf")))
            .expect("write")
    });
    time("program_for (read, verify)", &mut || {
        seccomp::program_for(&profile, Some(&file)).expect("read");
    });
    let full = seccomp::default_profile(&default_caps());
    let mut native = full.clone();
    native.set_architectures(None);
    println!("unfiltered: getpid, personality {:?}", getpid_cost());
    let tiny: LinuxSeccomp = serde_json::from_value(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["keyctl"], "action": "SCMP_ACT_ERRNO"}],
    }))
    .expect("tiny");
    // Interleaved, so that the load of the machine hits every variant alike.
    let variants: Vec<(&str, Option<Arc<Program>>)> = vec![
        ("no filter", None),
        ("tiny filter", Some(compiled(&tiny))),
        ("native-only default", Some(compiled(&native))),
        ("default", Some(compiled(&full))),
    ];
    let mut times = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS * 3 {
        for ((_, program), times) in variants.iter().zip(&mut times) {
            let started = Instant::now();
            run_under(program.clone(), Path::new("/bin/true"), &[]);
            times.push(started.elapsed());
        }
    }
    for ((name, _), times) in variants.iter().zip(times) {
        println!("spawn /bin/true with {name}: {}", ms(median(times)));
    }
    let mut no_x32 = full.clone();
    no_x32.set_architectures(Some(vec![
        oci_spec::runtime::Arch::ScmpArchX86_64,
        oci_spec::runtime::Arch::ScmpArchX86,
    ]));
    for (name, profile) in [
        ("x86_64+x86+x32", full),
        ("x86_64+x86", no_x32),
        ("native only", native),
    ] {
        let started = Instant::now();
        let program = Arc::new(Program::compile(&profile).expect("compile"));
        let compile = started.elapsed();
        let mut loads = Vec::new();
        let mut getpids = Vec::new();
        let mut personalities = Vec::new();
        for _ in 0..ROUNDS {
            let program = Arc::clone(&program);
            // A thread of its own: the filter stays with it and ends with it.
            let (load, (getpid, personality)) = std::thread::spawn(move || {
                let started = Instant::now();
                program.install().expect("install");
                (started.elapsed(), getpid_cost())
            })
            .join()
            .expect("join");
            loads.push(load);
            getpids.push(getpid);
            personalities.push(personality);
        }
        println!(
            "{name}: {} instructions, compile {}, load {}, getpid {:?}, personality {:?} (medians)",
            program.instructions(),
            ms(compile),
            ms(median(loads)),
            median(getpids),
            median(personalities)
        );
    }
}

/// CreateContainer through CRI on a real berthd, with and without
/// RuntimeDefault, interleaved:
/// `cargo test --release --test seccomp -- --ignored --nocapture cri_creation_cost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn cri_creation_cost() {
    const ROUNDS: usize = 150;
    let node = node().await;
    let mut rt = node.cri.runtime().await;
    // RuntimeDefault is loaded at create without no_new_privs (Kubernetes'
    // default), at start with it.
    let variants = [
        ("without seccomp", None, false),
        (
            "RuntimeDefault",
            profile(ProfileType::RuntimeDefault, ""),
            false,
        ),
        ("without seccomp, no_new_privs", None, true),
        (
            "RuntimeDefault, no_new_privs",
            profile(ProfileType::RuntimeDefault, ""),
            true,
        ),
    ];
    let mut times = vec![Vec::new(); variants.len()];
    for round in 0..ROUNDS + 2 {
        for (i, (_, seccomp, nnp)) in variants.iter().enumerate() {
            let mut config = node.config(&format!("c{round}-{i}"), "true", seccomp.clone());
            if let Some(linux) = config.linux.as_mut()
                && let Some(security) = linux.security_context.as_mut()
            {
                security.no_new_privs = *nnp;
            }
            let started = Instant::now();
            let id = node.create(&mut rt, config).await.expect("CreateContainer");
            // The first rounds warm up (and compile the profile once).
            if round >= 2 {
                times[i].push(started.elapsed());
            }
            rt.remove_container(RemoveContainerRequest { container_id: id })
                .await
                .expect("RemoveContainer");
        }
    }
    let base = median(times[0].clone());
    for ((name, _, _), times) in variants.iter().zip(times) {
        let m = median(times);
        println!(
            "CreateContainer, median of {ROUNDS}, {name}: {} ({:+.1}%)",
            ms(m),
            (m.as_secs_f64() / base.as_secs_f64() - 1.0) * 100.0
        );
    }
    drop(rt);
    node.finish().await;
}
