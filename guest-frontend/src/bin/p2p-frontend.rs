//! `p2p-frontend`: the front-end driver as a process (started by `p2pvmm up`
//! in the sandbox backend; by the client VM's init in the VM backend).

// glibc malloc returns freed buffers to the kernel and faults them back in:
// on the streaming paths that cost more than the copies themselves.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Serves the p2pvm API to local apps over the inter-VM channel.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The channel broker socket (from the supervisor; sandbox backend).
    #[arg(long, required_unless_present = "device", conflicts_with = "device")]
    broker: Option<PathBuf>,
    /// This VM's channel device (client VM): `auto` or its sysfs directory.
    #[arg(long)]
    device: Option<String>,
    /// How to map the channel device's region: auto, devmem or sysfs.
    #[arg(long, default_value = "auto")]
    mapping: p2pvm_channel::pci::RegionMapping,
    /// The API socket apps connect to.
    #[arg(long)]
    socket: PathBuf,
    /// Write the channel's figures here every second (Prometheus text; the
    /// sandbox supervisor serves them with `p2pvmm up --metrics`).
    #[arg(long)]
    figures: Option<PathBuf>,
    /// Log filter.
    #[arg(long, env = "P2P_FRONTEND_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).context("invalid --log filter")?)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let shutdown = p2pvm_signals::shutdown_on_signals();
    let channel = match (cli.broker, cli.device) {
        (Some(b), _) => p2pvm_channel::Source::Broker(b),
        (None, Some(d)) => p2pvm_channel::Source::device(&d, cli.mapping),
        (None, None) => unreachable!("clap requires one"),
    };
    let opts = guest_frontend::Options {
        channel,
        socket: cli.socket,
        figures: cli.figures,
    };
    guest_frontend::run(opts, shutdown).await?;
    Ok(())
}
