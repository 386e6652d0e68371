//! `cargo bench --bench cri` (or `make bench`): berthd beside Debian's
//! containerd in one run, the same workload through the same CRI v1 client
//! code, the same images from one local registry, and one Markdown table
//! with both columns and the ratio berth/containerd. bench/README.md says
//! what it measures and how.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;
mod images;
mod procfs;
mod report;

use std::path::PathBuf;
use std::process::Command;

use common::fixtures::{self, BIG_LAYOUT_REF, Fixture};
use common::registry::Registry;
use daemon::{BERTHD, CONTAINERD, Setup};
use images::Image;
use report::{Pick, Row, Target};

/// The targets for a cold pull of the ~100 MB image.
const PULL_RATIO_TARGET: f64 = 0.7;
const PULL_PEAK_RSS_TARGET_MIB: f64 = 64.0;

const USAGE: &str = "usage: cargo bench --bench cri -- [--samples N] [--keep-logs DIR] [FILTER]
  --samples N      cold pulls per image and runtime (default 5)
  --keep-logs DIR  copy every daemon's log into DIR
  FILTER           run only the images whose name contains FILTER (busybox, big)
  env BERTH_BENCH_RUST_LOG  RUST_LOG for berthd, e.g. berth=debug";

struct Options {
    samples: usize,
    keep_logs: Option<PathBuf>,
    filter: Option<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options {
            samples: 5,
            keep_logs: None,
            filter: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => {}
                "--samples" => {
                    options.samples = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n > 0)
                        .ok_or("--samples needs a number above 0")?;
                }
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
    eprintln!("cri benchmark: building fixture images and starting the registry");
    let registry = Registry::start()?;
    let small = fixtures::push(&registry, Fixture::BusyboxLatest)?;
    let big_layout = fixtures::big_layout()?;
    let big_repo_tag = "berth-test/big:latest";
    registry.push(big_layout, BIG_LAYOUT_REF, big_repo_tag)?;
    let all = [
        Image::from_layout(
            "busybox",
            small.reference.clone(),
            fixtures::layout(),
            &Fixture::BusyboxLatest.layout_ref(),
        )?,
        Image::from_layout(
            "big",
            format!("{}/{big_repo_tag}", registry.addr()),
            big_layout,
            BIG_LAYOUT_REF,
        )?,
    ];
    let images: Vec<Image> = all
        .into_iter()
        .filter(|i| options.filter.as_ref().is_none_or(|f| i.name.contains(f)))
        .collect();
    if images.is_empty() {
        return Err(format!("no image matches the filter\n{USAGE}"));
    }
    let setup = Setup {
        registry: registry.addr(),
        berth_rust_log: std::env::var("BERTH_BENCH_RUST_LOG").unwrap_or_default(),
        keep_logs: options.keep_logs.clone(),
    };

    let load_before = procfs::loadavg();
    eprintln!(
        "cri benchmark: {} cold pulls per image and runtime (load average {load_before})",
        options.samples
    );
    let results = images::run(&setup, &images, options.samples).await?;
    let load_after = procfs::loadavg();
    drop(registry);

    let mut rows = Vec::new();
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
    }
    rows.push(Row::new(&results.idle_rss, Pick::P50));

    let machine = procfs::machine();
    println!();
    println!("## berth vs containerd, CRI, {}", versions.date);
    println!();
    println!(
        "- machine: {} cores ({}), {:.1} GiB memory, kernel {}, {}",
        machine.cores, machine.cpu, machine.mem_gib, machine.kernel, versions.os
    );
    println!(
        "- versions: berth {}, containerd {}, runc {}",
        versions.berth, versions.containerd, versions.runc
    );
    println!(
        "- {} samples per cell, runtimes alternating; cold store: a fresh daemon with an \
         empty root per pull (its start not timed); load average {load_before} before, \
         {load_after} after",
        options.samples
    );
    println!();
    print!("{}", report::table(&rows));
    println!();
    println!("Samples, in order:");
    println!();
    for r in &results.per_image {
        for metric in [&r.pull, &r.peak_rss, &r.cpu, &r.disk] {
            println!("- {}", metric.raw_line());
        }
    }
    println!("- {}", results.idle_rss.raw_line());
    if !results.leftovers.is_empty() {
        println!();
        println!("Left on the host by the daemons (cleaned up by the harness):");
        for l in &results.leftovers {
            println!("- {l}");
        }
    }
    Ok(())
}

/// Date and the versions of everything under test.
struct Versions {
    date: String,
    os: String,
    berth: String,
    containerd: String,
    runc: String,
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
        let berthd = out(BERTHD, &["--version"]).unwrap_or_else(|| "berthd ?".to_string());
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
            berth: format!(
                "{} ({}, release build)",
                berthd.trim_start_matches("berthd ").trim(),
                git.map_or_else(|| "no git".to_string(), |g| format!("git {g}"))
            ),
            containerd: package("containerd").unwrap_or(containerd),
            runc: package("runc")
                .or_else(|| {
                    out("runc", &["--version"]).and_then(|v| v.lines().next().map(String::from))
                })
                .unwrap_or_else(|| "not installed".to_string()),
        })
    }
}
