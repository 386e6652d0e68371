//! Pod benchmarks: the life of a pod with one busybox `sleep` container, as
//! kubelet drives it, through the same CRI client code in both runtimes.
//!
//! Both daemons run side by side for the whole workload (fresh roots, the
//! busybox image and containerd's pause image pulled first), and every sample
//! alternates which runtime goes first, so noise from other work on the
//! machine falls on both alike. In order:
//!
//! 1. warm-up: a few whole pod lives in each runtime, not recorded;
//! 2. sequential: per sample, in each runtime, RunPodSandbox, CreateContainer,
//!    StartContainer, one ExecSync of `true`, one streaming Exec of `true`
//!    (below), StopContainer (timeout 0: the `sleep` is PID 1 of its PID
//!    namespace and ignores SIGTERM, so a grace period would only measure the
//!    grace period), StopPodSandbox and RemovePodSandbox (which removes the
//!    container), each timed from the client; with `Plan::only_sequential`
//!    (the `exec` filter) the workload ends here;
//! 3. concurrent: per round, in each runtime, the same start of N pods at
//!    once, then their stop and removal at once; each call timed, and the
//!    wall time of the whole batch;
//! 4. memory and lists: with no pod, then with 10 and with 100 running pods,
//!    the daemon's RSS and PSS and those of its per-pod processes (below);
//!    with 100 pods, ListContainers and ListPodSandbox (no filter);
//! 5. everything removed, the daemon's RSS read once more, the daemons
//!    stopped and the host checked for leftovers.
//!
//! Per-pod processes are found by cgroup, not by name: each daemon runs in a
//! cgroup of its own (bench/daemon.rs), where what it forks stays unless
//! moved — containerd's shims; berth moves its monitors to
//! `<its cgroup parent>/monitors`. The processes in a cgroup named by one of
//! the daemon's pod ids but by none of its container ids are pod
//! infrastructure — containerd's pause, berth's pod-infra (only for pods
//! sharing a PID namespace; the kubelet-like pods here do not). Per-pod
//! memory at N pods is (daemon + helpers + infrastructure at N pods, minus
//! the same with no pod) / N; the containers' own `sleep` processes, the same
//! in both runtimes, are left out.
//!
//! A streaming exec is what `crictl exec` and kubelet do: the CRI Exec call
//! (stdout and stderr, no tty, no stdin) gives a URL on the runtime's stream
//! server; the client upgrades to SPDY/3.1 with `v4.channel.k8s.io`, opens
//! the error, stdout and stderr streams and reads until the error stream has
//! carried the exit status (a JSON Status) and every stream ended (FIN, a
//! reset, or the connection closing). The same client in both runtimes: the
//! tests' (tests/common/cri_stream.rs). Timed from the Exec call to the
//! arrival of the exit status, and the Exec call alone.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::cri_stream::{self, CommandInput};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use prost::Message as _;
use tonic::transport::Channel;

use crate::daemon::{Daemon, Runtime, Setup};
use crate::procfs::{self, Footprint};
use crate::report::{Metric, Unit};

/// How long a new daemon sits before its idle RSS is read (as in the image
/// benchmarks).
const IDLE_SETTLE: Duration = Duration::from_secs(1);
/// How long the daemons sit before memory is read with pods running.
const SETTLE: Duration = Duration::from_secs(2);
/// One CRI call that takes longer than this is a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The container's command: busybox `sleep`, longer than any run.
const SLEEP: [&str; 2] = ["sleep", "86400"];

/// How much of each phase to run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub warmup: usize,
    pub sequential: usize,
    pub concurrency: usize,
    pub rounds: usize,
    /// The smaller pod count memory is read at (the target is there).
    pub few: usize,
    /// The larger pod count memory is read at, and the list calls run with.
    pub many: usize,
    pub list_samples: usize,
    /// Only the warm-up and the sequential pod lives (the `exec` filter).
    pub only_sequential: bool,
}

/// Timings of one pod life's calls, per call.
pub struct Lifecycle {
    pub run: Metric,
    pub create: Metric,
    pub start: Metric,
    pub start_sum: Metric,
    pub stop_container: Metric,
    pub stop_pod: Metric,
    pub remove_pod: Metric,
    pub stop_sum: Metric,
}

impl Lifecycle {
    fn new(how: &str) -> Lifecycle {
        let m = |what: &str| Metric::new(format!("{what}, {how}"), Unit::Seconds);
        Lifecycle {
            run: m("RunPodSandbox"),
            create: m("CreateContainer"),
            start: m("StartContainer"),
            start_sum: m("pod start: RunPodSandbox + CreateContainer + StartContainer"),
            stop_container: m("StopContainer (timeout 0)"),
            stop_pod: m("StopPodSandbox"),
            remove_pod: m("RemovePodSandbox"),
            stop_sum: m("pod stop: StopContainer + StopPodSandbox + RemovePodSandbox"),
        }
    }

    fn push_start(&mut self, runtime: Runtime, t: &StartTimes) {
        self.run.push(runtime, t.run);
        self.create.push(runtime, t.create);
        self.start.push(runtime, t.start);
        self.start_sum.push(runtime, t.run + t.create + t.start);
    }

    fn push_stop(&mut self, runtime: Runtime, t: &StopTimes) {
        self.stop_container.push(runtime, t.stop_container);
        self.stop_pod.push(runtime, t.stop_pod);
        self.remove_pod.push(runtime, t.remove_pod);
        self.stop_sum
            .push(runtime, t.stop_container + t.stop_pod + t.remove_pod);
    }

    pub fn metrics(&self) -> [&Metric; 8] {
        [
            &self.run,
            &self.create,
            &self.start,
            &self.start_sum,
            &self.stop_container,
            &self.stop_pod,
            &self.remove_pod,
            &self.stop_sum,
        ]
    }
}

/// Memory per running pod at one pod count.
pub struct PerPod {
    pub pods: usize,
    pub rss: Metric,
    pub pss: Metric,
}

pub struct Results {
    pub sequential: Lifecycle,
    pub exec: Metric,
    /// Streaming exec: Exec call to the exit status on the error stream.
    pub exec_stream: Metric,
    /// The Exec call of it alone (until the URL came back).
    pub exec_url: Metric,
    pub concurrent: Lifecycle,
    /// Wall time of starting (and of stopping) a whole concurrent batch.
    pub batch_start: Metric,
    pub batch_stop: Metric,
    pub list_containers: Metric,
    pub list_pods: Metric,
    pub memory: Vec<PerPod>,
    /// The daemon's RSS after the run, every pod removed.
    pub rss_after: Metric,
    /// What makes up the memory figures, a line per runtime and pod count.
    pub breakdown: Vec<String>,
    pub leftovers: Vec<String>,
}

/// Runs the whole pod workload in both runtimes; pushes each daemon's idle
/// RSS ([`IDLE_SETTLE`] after it answered, before any pull) into `idle_rss`.
pub async fn run(
    setup: &Setup,
    plan: &Plan,
    image: &str,
    idle_rss: &mut Metric,
) -> Result<Results, String> {
    let many = plan.many.max(plan.few);
    let mut results = Results {
        sequential: Lifecycle::new("sequential"),
        exec: Metric::new("ExecSync `true`, sequential", Unit::Seconds),
        exec_stream: Metric::new(
            "Exec `true` streaming (SPDY, v4.channel.k8s.io): Exec call to exit status, sequential",
            Unit::Seconds,
        ),
        exec_url: Metric::new(
            "Exec `true` streaming: the Exec call alone (URL back), sequential",
            Unit::Seconds,
        ),
        concurrent: Lifecycle::new(&format!("{} pods at once", plan.concurrency)),
        batch_start: Metric::new(
            format!("start of {} pods at once, wall time", plan.concurrency),
            Unit::Seconds,
        ),
        batch_stop: Metric::new(
            format!("stop of {} pods at once, wall time", plan.concurrency),
            Unit::Seconds,
        ),
        list_containers: Metric::new(
            format!("ListContainers, {many} running pods"),
            Unit::Seconds,
        ),
        list_pods: Metric::new(
            format!("ListPodSandbox, {many} running pods"),
            Unit::Seconds,
        ),
        memory: [plan.few, many]
            .into_iter()
            .map(|pods| PerPod {
                pods,
                rss: Metric::new(
                    format!(
                        "RSS per running pod (daemon growth + monitors/shims + pause), {pods} pods"
                    ),
                    Unit::MiB,
                ),
                pss: Metric::new(
                    format!(
                        "PSS per running pod (daemon growth + monitors/shims + pause), {pods} pods"
                    ),
                    Unit::MiB,
                ),
            })
            .collect(),
        rss_after: Metric::new("daemon RSS after the pod run, no pod left", Unit::MiB),
        breakdown: Vec::new(),
        leftovers: Vec::new(),
    };

    let mut nodes = Vec::new();
    for runtime in [Runtime::Berth, Runtime::Containerd] {
        nodes.push(Node::start(runtime, setup, image, idle_rss).await?);
    }
    let outcome = phases(&mut nodes, plan, many, &mut results).await;
    // Whatever happened, every pod goes before the daemons stop.
    for node in &mut nodes {
        if let Err(e) = node.remove_all(plan.concurrency).await {
            results
                .leftovers
                .push(format!("{}: removing pods: {e}", node.runtime.name()));
        }
    }
    if outcome.is_ok() {
        tokio::time::sleep(SETTLE).await;
        for node in &nodes {
            let after = procfs::memory(node.daemon.pid())?;
            results
                .rss_after
                .push(node.runtime, after.rss_kib as f64 / 1024.0);
        }
    }
    for mut node in nodes {
        let name = node.runtime.name();
        let left = node.daemon.stop().await;
        results
            .leftovers
            .extend(left.into_iter().map(|l| format!("{name}: {l}")));
    }
    outcome.map(|()| results)
}

async fn phases(
    nodes: &mut [Node],
    plan: &Plan,
    many: usize,
    results: &mut Results,
) -> Result<(), String> {
    eprintln!(
        "  pods: warm-up, {} pod lives per runtime",
        plan.warmup.max(1)
    );
    for i in 0..plan.warmup.max(1) {
        for node in in_turn(nodes, i) {
            let pod = node.start_pod().await?.0;
            node.exec_true(&pod).await?;
            node.exec_streaming_true(&pod).await?;
            node.stop_pod(&pod).await?;
        }
    }

    eprintln!(
        "  pods: {} sequential pod lives per runtime",
        plan.sequential
    );
    for i in 0..plan.sequential {
        procfs::check_interrupted()?;
        for node in in_turn(nodes, i) {
            let (pod, started) = node.start_pod().await?;
            let exec = node.exec_true(&pod).await?;
            let (url, round_trip) = node.exec_streaming_true(&pod).await?;
            let stopped = node.stop_pod(&pod).await?;
            results.sequential.push_start(node.runtime, &started);
            results.exec.push(node.runtime, exec);
            results.exec_stream.push(node.runtime, round_trip);
            results.exec_url.push(node.runtime, url);
            results.sequential.push_stop(node.runtime, &stopped);
        }
        if (i + 1) % 10 == 0 {
            progress(
                &format!("sequential {}/{}", i + 1, plan.sequential),
                &results.sequential,
            );
        }
    }
    if plan.only_sequential {
        return Ok(());
    }

    eprintln!(
        "  pods: {} rounds of {} pods at once per runtime",
        plan.rounds, plan.concurrency
    );
    for round in 0..plan.rounds {
        procfs::check_interrupted()?;
        for node in in_turn(nodes, round) {
            let started = Instant::now();
            let pods = node.start_many(plan.concurrency).await?;
            results
                .batch_start
                .push(node.runtime, started.elapsed().as_secs_f64());
            for (_, t) in &pods {
                results.concurrent.push_start(node.runtime, t);
            }
            let pods: Vec<PodIds> = pods.into_iter().map(|(p, _)| p).collect();
            let started = Instant::now();
            let stopped = node.stop_many(&pods).await?;
            results
                .batch_stop
                .push(node.runtime, started.elapsed().as_secs_f64());
            for t in &stopped {
                results.concurrent.push_stop(node.runtime, t);
            }
        }
    }
    progress("concurrent", &results.concurrent);

    eprintln!(
        "  pods: memory with 0, {} and {many} running pods",
        plan.few
    );
    tokio::time::sleep(SETTLE).await;
    let mut base = Vec::new();
    for node in nodes.iter() {
        base.push(node.usage()?);
    }
    let mut running = 0;
    for per_pod in &mut results.memory {
        while running < per_pod.pods {
            procfs::check_interrupted()?;
            for node in in_turn(nodes, running) {
                let pod = node.start_pod().await?.0;
                node.running.push(pod);
            }
            running += 1;
        }
        tokio::time::sleep(SETTLE).await;
        for (node, base) in nodes.iter().zip(&base) {
            let now = node.usage()?;
            let (rss, pss) = now.per_pod(base, running);
            per_pod.rss.push(node.runtime, rss);
            per_pod.pss.push(node.runtime, pss);
            let line = now.describe(node.runtime, base, running);
            eprintln!("    {line}");
            results.breakdown.push(line);
        }
    }

    eprintln!(
        "  pods: {} list calls of each kind with {many} running pods",
        plan.list_samples
    );
    for i in 0..plan.list_samples {
        procfs::check_interrupted()?;
        for node in in_turn(nodes, i) {
            let (containers, pods) = node.list(many).await?;
            results.list_containers.push(node.runtime, containers);
            results.list_pods.push(node.runtime, pods);
        }
    }
    for node in nodes.iter() {
        results.breakdown.push(format!(
            "{} list answers with {many} pods: ListContainers {} bytes, ListPodSandbox {} bytes",
            node.runtime.name(),
            node.list_bytes.0,
            node.list_bytes.1
        ));
    }
    Ok(())
}

/// The nodes in the order [`Runtime::in_turn`] gives for `sample`.
fn in_turn(nodes: &mut [Node], sample: usize) -> Vec<&mut Node> {
    let order = Runtime::in_turn(sample);
    let mut refs: Vec<&mut Node> = nodes.iter_mut().collect();
    refs.sort_by_key(|n| order.iter().position(|r| *r == n.runtime));
    refs
}

fn progress(what: &str, l: &Lifecycle) {
    let p50 = |m: &Metric, r: Runtime| {
        m.samples(r)
            .pick(crate::report::Pick::P50)
            .map_or_else(|| "–".to_string(), |v| format!("{:.1} ms", v * 1000.0))
    };
    eprintln!(
        "    {what}: start p50 berth {} containerd {}; stop p50 berth {} containerd {}",
        p50(&l.start_sum, Runtime::Berth),
        p50(&l.start_sum, Runtime::Containerd),
        p50(&l.stop_sum, Runtime::Berth),
        p50(&l.stop_sum, Runtime::Containerd),
    );
}

pub struct StartTimes {
    run: f64,
    create: f64,
    start: f64,
}

pub struct StopTimes {
    stop_container: f64,
    stop_pod: f64,
    remove_pod: f64,
}

#[derive(Clone, Debug)]
struct PodIds {
    pod: String,
    container: String,
}

/// One runtime under test: its daemon, a CRI client, the pods it runs.
struct Node {
    runtime: Runtime,
    daemon: Daemon,
    client: RuntimeServiceClient<Channel>,
    image: String,
    /// Pod log directories, as kubelet makes them.
    logs: tempfile::TempDir,
    next: usize,
    /// Pods kept running (the memory and list phases).
    running: Vec<PodIds>,
    /// Encoded sizes of the last ListContainers and ListPodSandbox answers.
    list_bytes: (usize, usize),
}

impl Node {
    /// Starts the daemon, reads its idle RSS into `idle_rss`, and pulls the
    /// container image (and for containerd its pause image, as a node has it
    /// before its first pod).
    async fn start(
        runtime: Runtime,
        setup: &Setup,
        image: &str,
        idle_rss: &mut Metric,
    ) -> Result<Node, String> {
        let daemon = Daemon::start(runtime, setup).await?;
        tokio::time::sleep(IDLE_SETTLE).await;
        let idle = procfs::memory(daemon.pid())?;
        idle_rss.push(runtime, idle.rss_kib as f64 / 1024.0);
        let mut images = daemon.images().await?;
        let mut pull = vec![image.to_string()];
        if runtime == Runtime::Containerd {
            pull.extend(setup.sandbox_image.clone());
        }
        for reference in pull {
            call(
                &daemon,
                &format!("PullImage {reference}"),
                images.pull_image(PullImageRequest {
                    image: Some(ImageSpec {
                        image: reference.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            )
            .await?;
        }
        let client = daemon.runtime_client().await?;
        Ok(Node {
            runtime,
            client,
            image: image.to_string(),
            logs: tempfile::Builder::new()
                .prefix(&format!("berth-bench-logs-{}-", runtime.name()))
                .tempdir()
                .map_err(|e| format!("log dir: {e}"))?,
            next: 0,
            running: Vec::new(),
            list_bytes: (0, 0),
            daemon,
        })
    }

    fn next_name(&mut self) -> String {
        self.next += 1;
        format!("bench-{}", self.next)
    }

    async fn start_pod(&mut self) -> Result<(PodIds, StartTimes), String> {
        let name = self.next_name();
        start_pod(
            &self.daemon,
            self.client.clone(),
            &self.image,
            self.logs.path(),
            &name,
        )
        .await
    }

    async fn start_many(&mut self, n: usize) -> Result<Vec<(PodIds, StartTimes)>, String> {
        let names: Vec<String> = (0..n).map(|_| self.next_name()).collect();
        let starts = names.iter().map(|name| {
            start_pod(
                &self.daemon,
                self.client.clone(),
                &self.image,
                self.logs.path(),
                name,
            )
        });
        futures_util::future::join_all(starts)
            .await
            .into_iter()
            .collect()
    }

    async fn exec_true(&mut self, pod: &PodIds) -> Result<f64, String> {
        let started = Instant::now();
        let out = call(
            &self.daemon,
            "ExecSync true",
            self.client.exec_sync(ExecSyncRequest {
                container_id: pod.container.clone(),
                cmd: vec!["true".to_string()],
                timeout: 10,
            }),
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        if out.exit_code != 0 {
            return Err(format!(
                "{}: ExecSync true exited {}: {}",
                self.runtime.name(),
                out.exit_code,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(seconds)
    }

    /// A streaming exec of `true` (module comment); returns the time of the
    /// Exec call alone and the round trip from it to the exit status.
    async fn exec_streaming_true(&mut self, pod: &PodIds) -> Result<(f64, f64), String> {
        let started = Instant::now();
        let url = call(
            &self.daemon,
            "Exec true",
            self.client.exec(ExecRequest {
                container_id: pod.container.clone(),
                cmd: vec!["true".to_string()],
                tty: false,
                stdin: false,
                stdout: true,
                stderr: true,
            }),
        )
        .await?
        .url;
        let url_time = started.elapsed().as_secs_f64();
        let fail = |e: String| {
            format!(
                "{} streaming exec at {url}: {e}; its log ends:\n{}",
                self.runtime.name(),
                self.daemon.log_tail(20)
            )
        };
        let input = CommandInput {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        // The tests' client panics on what it does not expect; in a task of
        // its own a panic is an error here, and the daemons still get
        // cleaned up in order.
        let mut session = tokio::spawn({
            let url = url.clone();
            async move { cri_stream::spdy_command(&url, &input).await }
        });
        let joined = tokio::select! {
            r = tokio::time::timeout(CALL_TIMEOUT, &mut session) => r,
            () = procfs::interrupted() => {
                session.abort();
                return Err("interrupted".to_string());
            }
        };
        let result = match joined {
            Err(_) => {
                session.abort();
                return Err(fail(format!("no end within {CALL_TIMEOUT:?}")));
            }
            Ok(Err(e)) if e.is_panic() => {
                let panic = e.into_panic();
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic");
                return Err(fail(message.to_string()));
            }
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Ok(Ok(result)) => result,
        };
        let status: serde_json::Value = serde_json::from_slice(&result.error).map_err(|e| {
            fail(format!(
                "the error stream holds no JSON status ({e}): {:?}",
                String::from_utf8_lossy(&result.error)
            ))
        })?;
        if status["status"] != "Success" {
            return Err(fail(format!("`true` did not succeed: {status}")));
        }
        let at = result
            .error_at
            .ok_or_else(|| fail("no exit status".to_string()))?;
        Ok((url_time, at.duration_since(started).as_secs_f64()))
    }

    async fn stop_pod(&mut self, pod: &PodIds) -> Result<StopTimes, String> {
        stop_pod(&self.daemon, self.client.clone(), pod).await
    }

    async fn stop_many(&mut self, pods: &[PodIds]) -> Result<Vec<StopTimes>, String> {
        let stops = pods
            .iter()
            .map(|pod| stop_pod(&self.daemon, self.client.clone(), pod));
        futures_util::future::join_all(stops)
            .await
            .into_iter()
            .collect()
    }

    /// Times one ListContainers and one ListPodSandbox; checks they list at
    /// least `expected` running items.
    async fn list(&mut self, expected: usize) -> Result<(f64, f64), String> {
        let started = Instant::now();
        let containers = call(
            &self.daemon,
            "ListContainers",
            self.client
                .list_containers(ListContainersRequest { filter: None }),
        )
        .await?
        .containers;
        let containers_time = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let pods = call(
            &self.daemon,
            "ListPodSandbox",
            self.client
                .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        )
        .await?
        .items;
        let pods_time = started.elapsed().as_secs_f64();
        self.list_bytes = (
            ListContainersResponse {
                containers: containers.clone(),
            }
            .encoded_len(),
            ListPodSandboxResponse {
                items: pods.clone(),
            }
            .encoded_len(),
        );
        let running = containers
            .iter()
            .filter(|c| c.state == ContainerState::ContainerRunning as i32)
            .count();
        let ready = pods
            .iter()
            .filter(|p| p.state == PodSandboxState::SandboxReady as i32)
            .count();
        if running < expected || ready < expected {
            return Err(format!(
                "{}: listed {running} running containers and {ready} ready pods, \
                 expected {expected}",
                self.runtime.name()
            ));
        }
        Ok((containers_time, pods_time))
    }

    /// Stops and removes every pod the daemon lists, `batch` at a time;
    /// also after an interrupt.
    async fn remove_all(&mut self, batch: usize) -> Result<(), String> {
        let pods = call_to_the_end(
            &self.daemon,
            "ListPodSandbox",
            self.client
                .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        )
        .await?
        .items;
        self.running.clear();
        for chunk in pods.chunks(batch.max(1)) {
            let removals = chunk.iter().map(|p| {
                let mut client = self.client.clone();
                let daemon = &self.daemon;
                async move {
                    call_to_the_end(
                        daemon,
                        "StopPodSandbox",
                        client.stop_pod_sandbox(StopPodSandboxRequest {
                            pod_sandbox_id: p.id.clone(),
                        }),
                    )
                    .await?;
                    call_to_the_end(
                        daemon,
                        "RemovePodSandbox",
                        client.remove_pod_sandbox(RemovePodSandboxRequest {
                            pod_sandbox_id: p.id.clone(),
                        }),
                    )
                    .await
                    .map(|_| ())
                }
            });
            for r in futures_util::future::join_all(removals).await {
                r?;
            }
        }
        Ok(())
    }

    /// The memory of the daemon and of what runs for its pods.
    fn usage(&self) -> Result<Usage, String> {
        let pid = self.daemon.pid();
        let mut usage = Usage {
            daemon: procfs::footprint(pid)?,
            ..Default::default()
        };
        let pods: HashSet<&str> = self.running.iter().map(|p| p.pod.as_str()).collect();
        let containers: HashSet<&str> = self.running.iter().map(|p| p.container.as_str()).collect();
        for (other, cgroup) in self.daemon.hierarchy().processes() {
            if other == pid {
                continue;
            }
            let last = cgroup.rsplit('/').next().unwrap_or_default();
            let slot = if containers.contains(last) {
                &mut usage.containers
            } else if cgroup.split('/').any(|part| pods.contains(part)) {
                &mut usage.infra
            } else if self.daemon.is_daemon_cgroup(&cgroup) {
                &mut usage.helpers
            } else {
                continue;
            };
            // A process that exited meanwhile is simply not counted.
            if let Ok(f) = procfs::footprint(other) {
                slot.0 += 1;
                slot.1 += f;
            }
        }
        Ok(usage)
    }
}

/// RunPodSandbox, CreateContainer and StartContainer of one pod, each timed.
async fn start_pod(
    daemon: &Daemon,
    mut client: RuntimeServiceClient<Channel>,
    image: &str,
    logs: &Path,
    name: &str,
) -> Result<(PodIds, StartTimes), String> {
    let log_dir = logs.join(name);
    // kubelet makes the pod's and the container's log directories.
    std::fs::create_dir_all(log_dir.join("sleep"))
        .map_err(|e| format!("mkdir {}: {e}", log_dir.display()))?;
    let config = pod_config(name, &log_dir);
    let started = Instant::now();
    let pod = call(
        daemon,
        "RunPodSandbox",
        client.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        }),
    )
    .await?
    .pod_sandbox_id;
    let run = started.elapsed().as_secs_f64();
    daemon.track(&pod);
    let started = Instant::now();
    let container = call(
        daemon,
        "CreateContainer",
        client.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(image)),
            sandbox_config: Some(config),
        }),
    )
    .await?
    .container_id;
    let create = started.elapsed().as_secs_f64();
    daemon.track(&container);
    let started = Instant::now();
    call(
        daemon,
        "StartContainer",
        client.start_container(StartContainerRequest {
            container_id: container.clone(),
        }),
    )
    .await?;
    let start = started.elapsed().as_secs_f64();
    Ok((PodIds { pod, container }, StartTimes { run, create, start }))
}

/// StopContainer, StopPodSandbox and RemovePodSandbox of one pod, each timed.
async fn stop_pod(
    daemon: &Daemon,
    mut client: RuntimeServiceClient<Channel>,
    pod: &PodIds,
) -> Result<StopTimes, String> {
    let started = Instant::now();
    call(
        daemon,
        "StopContainer",
        client.stop_container(StopContainerRequest {
            container_id: pod.container.clone(),
            timeout: 0,
        }),
    )
    .await?;
    let stop_container = started.elapsed().as_secs_f64();
    let started = Instant::now();
    call(
        daemon,
        "StopPodSandbox",
        client.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.pod.clone(),
        }),
    )
    .await?;
    let stop_pod = started.elapsed().as_secs_f64();
    let started = Instant::now();
    call(
        daemon,
        "RemovePodSandbox",
        client.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.pod.clone(),
        }),
    )
    .await?;
    let remove_pod = started.elapsed().as_secs_f64();
    Ok(StopTimes {
        stop_container,
        stop_pod,
        remove_pod,
    })
}

/// One CRI call, bounded by [`CALL_TIMEOUT`] and the interrupt flag; a
/// failure names the runtime and the call and ends with the daemon's log.
async fn call<T>(
    daemon: &Daemon,
    what: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    tokio::select! {
        r = call_to_the_end(daemon, what, fut) => r,
        () = procfs::interrupted() => Err("interrupted".to_string()),
    }
}

/// [`call`] that an interrupt does not cut short: for the cleanup, which
/// must run after one.
async fn call_to_the_end<T>(
    daemon: &Daemon,
    what: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    let fail = |e: String| {
        format!(
            "{} {what}: {e}; its log ends:\n{}",
            daemon.runtime.name(),
            daemon.log_tail(20)
        )
    };
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Err(_) => Err(fail(format!("no answer within {CALL_TIMEOUT:?}"))),
        Ok(Err(status)) => Err(fail(status.to_string())),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

/// Namespaces as kubelet asks for them: the pod's network and IPC, a PID
/// namespace per container (no `shareProcessNamespace`).
fn namespaces() -> Option<NamespaceOption> {
    Some(NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    })
}

fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "bench".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_dir.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: namespaces(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(image: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "sleep".to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: SLEEP.iter().map(|s| s.to_string()).collect(),
        log_path: PathBuf::from("sleep/0.log").display().to_string(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: namespaces(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Memory of a daemon and its pods' processes: (process count, footprint).
#[derive(Clone, Debug, Default)]
struct Usage {
    daemon: Footprint,
    /// In the daemon's own cgroup: berth's monitors, containerd's shims.
    helpers: (usize, Footprint),
    /// In a pod's cgroup but no container's: pause, pod-infra.
    infra: (usize, Footprint),
    /// The containers' own processes (busybox sleep): not counted per pod.
    containers: (usize, Footprint),
}

impl Usage {
    fn total(&self) -> Footprint {
        let mut t = self.daemon;
        t += self.helpers.1;
        t += self.infra.1;
        t
    }

    /// (RSS, PSS) per pod in MiB, over `base` (no pod running).
    fn per_pod(&self, base: &Usage, pods: usize) -> (f64, f64) {
        let (now, then) = (self.total(), base.total());
        let per = |a: u64, b: u64| (a as f64 - b as f64) / 1024.0 / pods.max(1) as f64;
        (
            per(now.rss_kib, then.rss_kib),
            per(now.pss_kib, then.pss_kib),
        )
    }

    fn describe(&self, runtime: Runtime, base: &Usage, pods: usize) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let growth = |a: u64, b: u64| (a as f64 - b as f64) / 1024.0;
        let (helper, infra) = match runtime {
            Runtime::Berth => ("monitors", "pod-infra"),
            Runtime::Containerd => ("shims", "pause"),
        };
        format!(
            "{} with {pods} pods: daemon RSS {:.1} MiB ({:+.1} over no pod), PSS {:.1} MiB ({:+.1}); \
             {} {helper}: RSS {:.1} MiB, PSS {:.1} MiB; {} {infra}: RSS {:.1} MiB, PSS {:.1} MiB; \
             {} container processes (not counted): RSS {:.1} MiB, PSS {:.1} MiB",
            runtime.name(),
            mib(self.daemon.rss_kib),
            growth(self.daemon.rss_kib, base.daemon.rss_kib),
            mib(self.daemon.pss_kib),
            growth(self.daemon.pss_kib, base.daemon.pss_kib),
            self.helpers.0,
            mib(self.helpers.1.rss_kib),
            mib(self.helpers.1.pss_kib),
            self.infra.0,
            mib(self.infra.1.rss_kib),
            mib(self.infra.1.pss_kib),
            self.containers.0,
            mib(self.containers.1.rss_kib),
            mib(self.containers.1.pss_kib),
        )
    }
}
