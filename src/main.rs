//! `berthd`: the berth daemon. With no arguments it serves CRI with working
//! defaults; `berthd config default` prints the complete default config.

use std::path::PathBuf;

use anyhow::Context;
use berth::config::{Config, DEFAULT_CONFIG_PATH};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "berthd",
    version,
    about = "berth container engine daemon (Kubernetes CRI)"
)]
struct Cli {
    /// YAML config file [default: /etc/berth/config.yaml if it exists]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Persistent data directory [default: /var/lib/berth]
    #[arg(long)]
    root: Option<PathBuf>,
    /// Per-boot state directory [default: /run/berth]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// CRI socket path [default: /run/berth/berth.sock]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Log filter, e.g. info or debug (RUST_LOG overrides it)
    #[arg(long)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Configuration helpers
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Per-container monitor, started by berthd
    #[command(hide = true)]
    Monitor {
        #[arg(long)]
        bundle: PathBuf,
    },
    /// PID 1 of a pod that shares its PID namespace (berthd starts it)
    #[command(hide = true)]
    PodInfra {
        /// Where berthd pins its PID namespace: names the pod, and proves
        /// whose process it is should berthd lose the record.
        #[arg(long)]
        pin: Option<PathBuf>,
        /// An empty directory to chroot into (pods with a user namespace)
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Makes a pod's user namespace and the namespaces it owns (berthd starts it)
    #[command(hide = true)]
    PodUserns {
        #[arg(long)]
        setup: String,
    },
    /// Runs a command inside a container (ExecSync), started by berthd
    #[command(hide = true)]
    ExecIn {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        init_pid: i32,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the complete default configuration as YAML
    Default,
    /// Print the effective configuration (file plus flags) as YAML
    Show,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG_PATH))?
        }
        None => Config::default(),
    };
    if let Some(root) = &cli.root {
        config.root = root.clone();
    }
    if let Some(state_dir) = &cli.state_dir {
        config.state_dir = state_dir.clone();
    }
    if let Some(socket) = &cli.socket {
        config.socket = socket.clone();
    }
    if let Some(level) = &cli.log_level {
        config.log_level = level.clone();
    }
    config.validate()?;
    Ok(config)
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env).context("RUST_LOG")?,
        _ => EnvFilter::try_new(level).with_context(|| format!("log level {level:?}"))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("berthd: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Some(Command::Config {
            action: ConfigAction::Default,
        }) => {
            print!("{}", Config::default().to_yaml());
            return Ok(());
        }
        Some(Command::Config {
            action: ConfigAction::Show,
        }) => {
            print!("{}", load_config(&cli)?.to_yaml());
            return Ok(());
        }
        // Both run before any thread exists: they fork and setns.
        Some(Command::Monitor { bundle }) => return Ok(berth::monitor::run(bundle)?),
        Some(Command::PodInfra { root, .. }) => {
            std::process::exit(berth::runtime::run_pod_infra(root.as_deref()))
        }
        Some(Command::PodUserns { setup }) => {
            std::process::exit(berth::runtime::namespace::run_userns_helper(setup))
        }
        Some(Command::ExecIn {
            bundle,
            init_pid,
            timeout_ms,
            args,
        }) => std::process::exit(berth::monitor::exec_in(
            bundle,
            *init_pid,
            *timeout_ms,
            args,
        )),
        None => {}
    }
    let config = load_config(&cli)?;
    init_logging(&config.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(berth::daemon::run(config))?;
    Ok(())
}
