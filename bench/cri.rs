//! `cargo bench --bench cri` (or `make bench`): berthd beside Debian's
//! containerd in one run, the same workload through the same CRI v1 client
//! code, the same images from one local registry, and one Markdown table
//! with both columns and the ratio berth/containerd. bench/README.md says
//! what it measures and how.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;
mod images;
mod network;
mod pause;
mod pods;
mod procfs;
mod report;

use std::path::PathBuf;
use std::process::Command;

use common::fixtures::{self, BIG_LAYOUT_REF, Fixture};
use common::registry::Registry;
use daemon::{CONTAINERD, Setup};
use images::Image;
use report::{Metric, Pick, Row, Target, Unit};

/// The issues' targets: a cold pull of the ~100 MB image ...
const PULL_RATIO_TARGET: f64 = 0.7;
const PULL_PEAK_RSS_TARGET_MIB: f64 = 64.0;
/// ... pod start and stop (p50, sequential), per-pod memory at 10 pods, the
/// daemon idle, the list calls with 100 pods, and the pod network.
const POD_START_RATIO_TARGET: f64 = 0.2;
const POD_STOP_RATIO_TARGET: f64 = 0.2;
const POD_RSS_RATIO_TARGET: f64 = 0.2;
const POD_PSS_RATIO_TARGET: f64 = 0.15;
const IDLE_RSS_TARGET_MIB: f64 = 15.0;
const LIST_RATIO_TARGET: f64 = 1.0;
const NETWORK_RATIO_TARGET: f64 = 0.5;
/// ... and the streaming exec round trip (p50, sequential).
const EXEC_STREAM_RATIO_TARGET: f64 = 0.5;

const USAGE: &str = "usage: cargo bench --bench cri -- [OPTIONS] [FILTER]
  --samples N      cold pulls per image and runtime (default 5)
  --pods N         sequential pod lives per runtime (default 50, after 5 warm-up)
  --rounds N       rounds of 10 pods started at once per runtime (default 5)
  --many N         running pods for the list calls and the second memory reading (default 100)
  --net-samples N  network set-ups and teardowns per side and configuration (default 50)
  --keep-logs DIR  copy every daemon's log into DIR
  FILTER           run only the workloads whose name contains FILTER:
                   busybox, big (image pulls), pods, network; exec: only the
                   sequential pod lives of the pod workload (ExecSync, streaming Exec)
  env BERTH_BENCH_RUST_LOG  RUST_LOG for berthd, e.g. berth=debug
  env BERTH_BENCH_BERTHD    another berthd executable to measure instead of this build's";

struct Options {
    samples: usize,
    plan: pods::Plan,
    net_samples: usize,
    keep_logs: Option<PathBuf>,
    filter: Option<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options {
            samples: 5,
            plan: pods::Plan {
                warmup: 5,
                sequential: 50,
                concurrency: 10,
                rounds: 5,
                few: 10,
                many: 100,
                list_samples: 50,
                only_sequential: false,
            },
            net_samples: 50,
            keep_logs: None,
            filter: None,
        };
        let mut args = args.iter();
        let number = |name: &str, value: Option<&String>| -> Result<usize, String> {
            value
                .and_then(|n| n.parse().ok())
                .filter(|n| *n > 0)
                .ok_or(format!("{name} needs a number above 0"))
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => {}
                "--samples" => options.samples = number(arg, args.next())?,
                "--pods" => options.plan.sequential = number(arg, args.next())?,
                "--rounds" => options.plan.rounds = number(arg, args.next())?,
                "--many" => options.plan.many = number(arg, args.next())?,
                "--net-samples" => options.net_samples = number(arg, args.next())?,
                "--keep-logs" => {
                    let dir = PathBuf::from(args.next().ok_or("--keep-logs needs a directory")?);
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
                    options.keep_logs = Some(dir);
                }
                "-h" | "--help" => return Err(USAGE.to_string()),
                a if a.starts_with('-') => return Err(format!("unknown option {a}\n{USAGE}")),
                a => options.filter = Some(a.to_string()),
            }
        }
        Ok(options)
    }

    fn wants(&self, workload: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| workload.contains(f))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` builds and runs benches too, without --bench:
    // the benchmark needs containerd and minutes, so it runs only when asked.
    if !args.iter().any(|a| a == "--bench") {
        println!("cri benchmark: skipped; run it with `make bench` or `cargo bench --bench cri`");
        return;
    }
    let result = Options::parse(&args).and_then(|options| {
        procfs::catch_interrupts()?;
        // One thread: the daemons are spawned from it (their parent-death
        // signal follows the spawning thread), and the client takes as little
        // of the two cores as it can.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?
            .block_on(run(options))
    });
    if let Err(e) = result {
        eprintln!("cri benchmark: {e}");
        let interrupted = procfs::check_interrupted().is_err();
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}

async fn run(options: Options) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root: both daemons mount overlays and own cgroups".to_string());
    }
    let versions = Versions::read()?;
    let host_nat = common::host_nat::HostNat::snapshot();
    let mut leftovers = Vec::new();
    let outcome = run_workloads(&options, &versions, &mut leftovers).await;
    leftovers.extend(host_nat.restore());
    match outcome {
        Ok(report) => {
            print!("{report}");
            if !leftovers.is_empty() {
                println!();
                println!(
                    "Left on the host by the daemons and plugins (cleaned up by the harness):"
                );
                println!();
                for l in &leftovers {
                    println!("- {l}");
                }
            }
            Ok(())
        }
        Err(e) => {
            for l in &leftovers {
                eprintln!("left on the host (cleaned up): {l}");
            }
            Err(e)
        }
    }
}

/// Runs what the filter selects and returns the report (Markdown).
async fn run_workloads(
    options: &Options,
    versions: &Versions,
    leftovers: &mut Vec<String>,
) -> Result<String, String> {
    let image_names = ["busybox", "big"];
    let want_images: Vec<&str> = image_names
        .into_iter()
        .filter(|n| options.wants(n))
        .collect();
    let want_pods = options.wants("pods");
    // `exec` is a part of the pod workload: its sequential pod lives alone.
    let only_sequential = !want_pods && options.wants("exec");
    let want_pods = want_pods || only_sequential;
    let plan = pods::Plan {
        only_sequential,
        ..options.plan.clone()
    };
    let want_network = options.wants("network");
    if want_images.is_empty() && !want_pods && !want_network {
        return Err(format!("no workload matches the filter\n{USAGE}"));
    }

    eprintln!("cri benchmark: building fixture images and starting the registry");
    let registry = Registry::start()?;
    let small = fixtures::push(&registry, Fixture::BusyboxLatest)?;
    let mut images = vec![Image::from_layout(
        "busybox",
        small.reference.clone(),
        fixtures::layout(),
        &Fixture::BusyboxLatest.layout_ref(),
    )?];
    if want_images.contains(&"big") {
        let big_layout = fixtures::big_layout()?;
        let big_repo_tag = "berth-test/big:latest";
        registry.push(big_layout, BIG_LAYOUT_REF, big_repo_tag)?;
        images.push(Image::from_layout(
            "big",
            format!("{}/{big_repo_tag}", registry.addr()),
            big_layout,
            BIG_LAYOUT_REF,
        )?);
    }
    images.retain(|i| want_images.contains(&i.name));
    let sandbox_image = if want_pods {
        Some(pause::push(&registry)?)
    } else {
        None
    };
    let setup = Setup {
        registry: registry.addr(),
        berth_rust_log: std::env::var("BERTH_BENCH_RUST_LOG").unwrap_or_default(),
        keep_logs: options.keep_logs.clone(),
        sandbox_image,
        hierarchy: procfs::Hierarchy::find()?,
    };

    let load_before = procfs::loadavg();
    let started = std::time::Instant::now();
    let mut idle_rss = Metric::new("daemon idle RSS (VmRSS 1 s after start)", Unit::MiB);
    let mut image_results = None;
    if !images.is_empty() {
        eprintln!(
            "cri benchmark: {} cold pulls per image and runtime (load average {load_before})",
            options.samples
        );
        let r = images::run(&setup, &images, options.samples, &mut idle_rss).await?;
        leftovers.extend(r.leftovers.iter().cloned());
        image_results = Some(r);
    }
    let mut pod_results = None;
    if want_pods {
        eprintln!("cri benchmark: pods (load average {})", procfs::loadavg());
        let r = pods::run(&setup, &plan, &small.reference, &mut idle_rss).await;
        let r = r?;
        leftovers.extend(r.leftovers.iter().cloned());
        pod_results = Some(r);
    }
    let mut net_results = None;
    if want_network {
        eprintln!(
            "cri benchmark: pod network, {} set-ups and teardowns per side and configuration \
             (load average {})",
            options.net_samples,
            procfs::loadavg()
        );
        let r = network::run(options.net_samples, 5)?;
        leftovers.extend(r.leftovers.iter().cloned());
        net_results = Some(r);
    }
    let load_after = procfs::loadavg();
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    drop(registry);

    let mut rows = Vec::new();
    let mut raw: Vec<&Metric> = Vec::new();
    if let Some(results) = &image_results {
        for r in &results.per_image {
            let is_big = r.image.name == "big";
            let pull_p50 = Row::new(&r.pull, Pick::P50);
            rows.push(if is_big {
                pull_p50.target(Target::RatioAtMost(PULL_RATIO_TARGET))
            } else {
                pull_p50
            });
            rows.push(Row::new(&r.pull, Pick::Min));
            let peak = Row::new(&r.peak_rss, Pick::Max);
            rows.push(if is_big {
                peak.target(Target::BerthBelowMiB(PULL_PEAK_RSS_TARGET_MIB))
            } else {
                peak
            });
            rows.push(Row::new(&r.cpu, Pick::P50));
            rows.push(Row::new(&r.disk, Pick::P50));
            raw.extend([&r.pull, &r.peak_rss, &r.cpu, &r.disk]);
        }
    }
    if let Some(p) = &pod_results {
        for (lifecycle, targets) in [(&p.sequential, true), (&p.concurrent, false)] {
            for m in lifecycle.metrics() {
                let target = if !targets {
                    None
                } else if std::ptr::eq(m, &lifecycle.start_sum) {
                    Some(Target::RatioAtMost(POD_START_RATIO_TARGET))
                } else if std::ptr::eq(m, &lifecycle.stop_sum) {
                    Some(Target::RatioAtMost(POD_STOP_RATIO_TARGET))
                } else {
                    None
                };
                let p50 = Row::new(m, Pick::P50);
                rows.push(match target {
                    Some(t) => p50.target(t),
                    None => p50,
                });
                rows.push(Row::new(m, Pick::P95));
            }
            if targets {
                rows.push(Row::new(&p.exec, Pick::P50));
                rows.push(Row::new(&p.exec, Pick::P95));
                rows.push(
                    Row::new(&p.exec_stream, Pick::P50)
                        .target(Target::RatioAtMost(EXEC_STREAM_RATIO_TARGET)),
                );
                rows.push(Row::new(&p.exec_stream, Pick::P95));
                rows.push(Row::new(&p.exec_url, Pick::P50));
                rows.push(Row::new(&p.exec_url, Pick::P95));
            }
            if plan.only_sequential {
                break;
            }
        }
    }
    if let Some(p) = pod_results.as_ref().filter(|_| !plan.only_sequential) {
        rows.push(Row::new(&p.batch_start, Pick::P50));
        rows.push(Row::new(&p.batch_stop, Pick::P50));
        for m in [&p.list_containers, &p.list_pods] {
            rows.push(Row::new(m, Pick::P50).target(Target::RatioAtMost(LIST_RATIO_TARGET)));
            rows.push(Row::new(m, Pick::P95));
        }
        for (i, per_pod) in p.memory.iter().enumerate() {
            let (rss, pss) = (
                Row::new(&per_pod.rss, Pick::P50),
                Row::new(&per_pod.pss, Pick::P50),
            );
            if i == 0 {
                rows.push(rss.target(Target::RatioAtMost(POD_RSS_RATIO_TARGET)));
                rows.push(pss.target(Target::RatioAtMost(POD_PSS_RATIO_TARGET)));
            } else {
                rows.push(rss);
                rows.push(pss);
            }
        }
        rows.push(Row::new(&p.rss_after, Pick::P50));
    }
    if let Some(p) = &pod_results {
        raw.extend(p.sequential.metrics());
        raw.extend([&p.exec, &p.exec_stream, &p.exec_url]);
    }
    if let Some(p) = pod_results.as_ref().filter(|_| !plan.only_sequential) {
        raw.extend(p.concurrent.metrics());
        raw.extend([
            &p.batch_start,
            &p.batch_stop,
            &p.list_containers,
            &p.list_pods,
        ]);
        for per_pod in &p.memory {
            raw.extend([&per_pod.rss, &per_pod.pss]);
        }
        raw.push(&p.rss_after);
    }
    if !idle_rss.samples(daemon::Runtime::Berth).values().is_empty() {
        rows.push(
            Row::new(&idle_rss, Pick::P50).target(Target::BerthBelowMiB(IDLE_RSS_TARGET_MIB)),
        );
        raw.push(&idle_rss);
    }
    if let Some(n) = &net_results {
        for (ports, t) in n.by_ports.iter().enumerate() {
            let both = Row::new(&t.both, Pick::P50);
            rows.push(if ports == 0 {
                both.target(Target::RatioAtMost(NETWORK_RATIO_TARGET))
            } else {
                both
            });
            rows.push(Row::new(&t.both, Pick::P95));
            rows.push(Row::new(&t.set_up, Pick::P50));
            rows.push(Row::new(&t.tear_down, Pick::P50));
            raw.extend([&t.set_up, &t.tear_down, &t.both]);
        }
    }

    use std::fmt::Write as _;
    let mut out = String::new();
    let machine = procfs::machine();
    let _ = writeln!(out);
    let _ = writeln!(out, "## berth vs containerd, CRI, {}", versions.date);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- machine: {} cores ({}), {:.1} GiB memory, kernel {}, {}",
        machine.cores, machine.cpu, machine.mem_gib, machine.kernel, versions.os
    );
    let _ = writeln!(
        out,
        "- versions: berth {}, containerd {}, runc {}, CNI plugins {}",
        versions.berth, versions.containerd, versions.runc, versions.cni
    );
    if image_results.is_some() {
        let _ = writeln!(
            out,
            "- pulls: {} samples per cell, runtimes alternating; cold store: a fresh daemon with an \
             empty root per pull (its start not timed)",
            options.samples
        );
    }
    if pod_results.is_some() {
        let phases = if plan.only_sequential {
            format!(
                "{} warm-up pod lives, {} sequential (the `exec` filter: nothing else)",
                plan.warmup, plan.sequential
            )
        } else {
            format!(
                "{} warm-up pod lives, {} sequential, {} rounds of {} at once, memory at {} and \
                 {} running pods, {} list calls of each kind",
                plan.warmup,
                plan.sequential,
                plan.rounds,
                plan.concurrency,
                plan.few,
                plan.many.max(plan.few),
                plan.list_samples
            )
        };
        let _ = writeln!(
            out,
            "- pods: one busybox `sleep` container each, kubelet's namespaces (pod network and IPC, \
             own PID namespace); both daemons side by side, the one that goes first alternating; \
             {phases}; one ExecSync and one streaming Exec (SPDY/3.1, v4.channel.k8s.io, the \
             tests' client) of `true` in each sequential pod"
        );
    }
    if net_results.is_some() {
        let _ = writeln!(
            out,
            "- pod network: {} set-ups and teardowns per side and configuration after 5 warm-up, \
             sides alternating; berth's built-in network in process against Debian's CNI \
             plugins run as libcni runs them (bench/network.rs)",
            options.net_samples
        );
    }
    let _ = writeln!(
        out,
        "- load average {load_before} before, {load_after} after; {minutes:.1} minutes"
    );
    let _ = writeln!(out);
    out.push_str(&report::table(&rows));
    if let Some(p) = pod_results.as_ref().filter(|p| !p.breakdown.is_empty()) {
        let _ = writeln!(out);
        let _ = writeln!(out, "What the memory and list figures are made of:");
        let _ = writeln!(out);
        for line in &p.breakdown {
            let _ = writeln!(out, "- {line}");
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Samples, in order:");
    let _ = writeln!(out);
    for metric in raw {
        let _ = writeln!(out, "- {}", metric.raw_line());
    }
    Ok(out)
}

/// Date and the versions of everything under test.
struct Versions {
    date: String,
    os: String,
    berth: String,
    containerd: String,
    runc: String,
    cni: String,
}

impl Versions {
    fn read() -> Result<Versions, String> {
        let out = |program: &str, args: &[&str]| -> Option<String> {
            let o = Command::new(program).args(args).output().ok()?;
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let package = |name: &str| out("dpkg-query", &["-W", "-f=${Version}", name]);
        let containerd = out(CONTAINERD, &["--version"]).ok_or(
            "containerd is not installed: run scripts/bench.sh (or apt-get install containerd runc)",
        )?;
        let berthd_path = daemon::berthd();
        let berthd_exe = berthd_path.to_string_lossy();
        let berthd = out(&berthd_exe, &["--version"]).unwrap_or_else(|| "berthd ?".to_string());
        let git = out(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "describe",
                "--always",
                "--dirty",
            ],
        );
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_default();
        Ok(Versions {
            date: out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
            os,
            berth: if std::env::var_os("BERTH_BENCH_BERTHD").is_some() {
                format!(
                    "{} ({berthd_exe}, from BERTH_BENCH_BERTHD)",
                    berthd.trim_start_matches("berthd ").trim()
                )
            } else {
                format!(
                    "{} ({}, release build)",
                    berthd.trim_start_matches("berthd ").trim(),
                    git.map_or_else(|| "no git".to_string(), |g| format!("git {g}"))
                )
            },
            containerd: package("containerd").unwrap_or(containerd),
            runc: package("runc")
                .or_else(|| {
                    out("runc", &["--version"]).and_then(|v| v.lines().next().map(String::from))
                })
                .unwrap_or_else(|| "not installed".to_string()),
            cni: package("containernetworking-plugins")
                .unwrap_or_else(|| "not installed".to_string()),
        })
    }
}
