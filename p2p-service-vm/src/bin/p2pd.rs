//! `p2pd`: the P2P service daemon (host mode; the service VM's back-end later).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use p2p_service_vm::config::Config;
use tokio_util::sync::CancellationToken;
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
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).context("invalid --log filter")?)
        .with_writer(std::io::stderr)
        .init();
    let config = load_config(&cli)?;

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
        signals.cancel();
    });
    p2p_service_vm::daemon::run(config, shutdown).await?;
    Ok(())
}
