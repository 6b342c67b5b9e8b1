//! `p2pd`: the P2P service daemon — a host daemon (host mode), or the service
//! side of `p2pvmm up` (channel back-end, confined in its sandbox).

// glibc malloc returns freed buffers to the kernel and faults them back in:
// on the streaming paths that cost more than the copies themselves.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use p2p_service_vm::config::Config;
use tracing_subscriber::EnvFilter;

/// One P2P node that serves many applications through the p2pvm API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (default: ~/.config/p2pvm/p2pd.toml when it exists).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory (identity, app tokens, lock); overrides the config file.
    #[arg(long, env = "P2PVM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// API Unix socket path (default: <data-dir>/api.sock).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Listen multiaddr; repeat for several. Replaces the configured list.
    #[arg(long)]
    listen: Vec<String>,
    /// Bootstrap peer multiaddr ending in /p2p/<id>; repeat for several. Adds to the config.
    #[arg(long)]
    bootstrap: Vec<String>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Serve `/metrics` (and the dashboard) on this address; overrides
    /// `[metrics] listen` (the service VM's init passes its TAP address).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Where `p2pvmm up --metrics` serves the VMs' states (its `/vms.json`),
    /// for the dashboard's VMs page; overrides `[metrics] vms_url`.
    #[arg(long)]
    vms_url: Option<String>,
    /// Serve the inter-VM channel brokered at this socket (set by `p2pvmm`).
    #[arg(long, conflicts_with = "channel_device")]
    channel_broker: Option<PathBuf>,
    /// Serve the inter-VM channel on this VM's channel device: `auto` or its
    /// sysfs directory (in the service VM).
    #[arg(long)]
    channel_device: Option<String>,
    /// How to map the channel device's region: auto, devmem or sysfs.
    #[arg(long)]
    channel_mapping: Option<String>,
    /// Confine this process before starting (Landlock to the data directory,
    /// seccomp, no_new_privs): the sandbox backend's in-process half.
    #[arg(long)]
    confine: bool,
    /// Operator console: confine like the service, then run COMMAND (default:
    /// a shell) with `p2pctl` on PATH holding the admin capability, instead of
    /// starting a node. `p2pvmm console service` runs this inside the sandbox.
    #[arg(long, requires = "confine")]
    console: bool,
    /// The console's command and arguments.
    #[arg(last = true)]
    command: Vec<String>,
    /// Log filter, e.g. `info` or `p2p_service_vm=debug`.
    #[arg(long, env = "P2PD_LOG", default_value = "info")]
    log: String,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => {
            let default = dirs::config_dir().map(|d| d.join("p2pvm/p2pd.toml"));
            match default {
                Some(p) if p.exists() => Config::load(&p)?,
                _ => Config::default(),
            }
        }
    };
    if let Some(d) = &cli.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(s) = &cli.api_socket {
        config.api_socket = Some(s.clone());
    }
    if !cli.listen.is_empty() {
        config.listen = cli.listen.clone();
    }
    config.bootstrap.extend(cli.bootstrap.iter().cloned());
    if cli.no_mdns {
        config.mdns = false;
    }
    if let Some(m) = cli.metrics {
        config.metrics.listen = Some(m);
    }
    if let Some(u) = &cli.vms_url {
        config.metrics.vms_url = Some(u.clone());
    }
    if let Some(b) = &cli.channel_broker {
        config.channel_broker = Some(b.clone());
    }
    if let Some(d) = &cli.channel_device {
        config.channel_device = Some(d.clone());
    }
    if let Some(m) = &cli.channel_mapping {
        config.channel_mapping = m.clone();
    }
    Ok(config)
}

/// What the confined service may still read besides its data directory: its
/// config file and the directories of the sockets it connects to.
fn sandbox_extras(cli: &Cli, config: &Config) -> Vec<PathBuf> {
    let mut extras: Vec<PathBuf> = cli.config.iter().cloned().collect();
    let parent = |p: &PathBuf| p.parent().map(|d| d.to_path_buf());
    if config.virus.enabled && config.virus.clamd_tcp.is_none() {
        extras.extend(parent(&config.virus.clamd_socket));
    }
    extras.extend(config.channel_broker.as_ref().and_then(parent));
    extras
}

fn confine(cli: &Cli, config: &Config) -> anyhow::Result<()> {
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(|d| d.to_path_buf())
        .context("locating p2pd's directory")?;
    use p2p_service_vm::confine::{self, Policy};
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let mut policy = Policy::service(&config.data_dir, &sandbox_extras(cli, config));
    let socket = config.api_socket_path();
    if let Some(dir) = socket.parent().filter(|d| !d.starts_with(&config.data_dir)) {
        std::fs::create_dir_all(dir)?;
        policy.read_write.push(dir.to_path_buf());
    }
    if cli.console {
        // The console runs p2pctl, which sits next to p2pd.
        policy.read_exec.push(exe_dir);
    }
    let report = confine::confine(&policy).context("confining p2pd")?;
    tracing::info!(?report, "p2pd confined");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).context("invalid --log filter")?)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = load_config(&cli)?;
    // Confinement covers the calling thread and the threads it starts later,
    // so it must come before the runtime exists.
    if cli.confine {
        confine(&cli, &config)?;
    }
    if cli.console {
        return console(&cli, &config);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(config))
}

/// Replaces this process with the operator's console command.
fn console(cli: &Cli, config: &Config) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(|d| d.to_path_buf())
        .context("locating p2pd's directory")?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![exe_dir];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = match cli.command.split_first() {
        Some((prog, args)) => {
            let mut c = std::process::Command::new(prog);
            c.args(args);
            c
        }
        None => std::process::Command::new("/bin/sh"),
    };
    cmd.env("PATH", std::env::join_paths(dirs)?)
        .env(p2pvm_proto::env::API_SOCKET, config.api_socket_path())
        .env(
            p2pvm_proto::env::TOKEN_FILE,
            config
                .data_dir
                .join(p2p_service_vm::api::apps::ADMIN_TOKEN_FILE),
        )
        .env("PS1", "p2pvm-service# ");
    Err(anyhow::Error::new(cmd.exec()).context("starting the console command"))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = p2pvm_signals::shutdown_on_signals();
    p2p_service_vm::daemon::run(config, shutdown).await?;
    Ok(())
}
