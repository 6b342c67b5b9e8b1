//! `p2pvmm`: brings the split platform up and opens the operator's console.

// glibc malloc returns freed buffers to the kernel and faults them back in:
// on the streaming paths that cost more than the copies themselves.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use vmm::isolation::{self, HostVirt, Isolation};
use vmm::sandbox::{self, Home};

/// The p2pvm supervisor: one P2P node for the machine, kept apart from the user's OS.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// State directory (default: ~/.local/share/p2pvmm).
    #[arg(long, global = true, env = "P2PVMM_HOME")]
    home: Option<PathBuf>,
    /// Log filter.
    #[arg(long, global = true, env = "P2PVMM_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the platform: the channel, the service side, the front-end.
    Up {
        /// Isolation backend.
        #[arg(long, value_enum, default_value_t = Isolation::Auto)]
        isolation: Isolation,
        /// p2pd config file for the service side.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Extra p2pd arguments, after `--` (e.g. `-- --listen /ip4/0.0.0.0/tcp/4001`).
        #[arg(last = true)]
        service_args: Vec<OsString>,
    },
    /// Open the operator's console inside a side (`service`), or run COMMAND there.
    Console {
        /// Which side.
        #[arg(value_parser = ["service"])]
        side: String,
        /// Command to run instead of a shell.
        #[arg(last = true)]
        command: Vec<OsString>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).context("invalid --log filter")?)
        .with_writer(std::io::stderr)
        .init();
    let home = Home::new(cli.home.clone().unwrap_or_else(Home::default_root));
    match cli.cmd {
        Cmd::Up {
            isolation,
            config,
            service_args,
        } => up(home, isolation, config, service_args),
        Cmd::Console { command, .. } => console(&home, &command),
    }
}

fn up(
    home: Home,
    requested: Isolation,
    config: Option<PathBuf>,
    service_args: Vec<OsString>,
) -> anyhow::Result<()> {
    let choice = isolation::choose(requested, &HostVirt::probe())?;
    println!("p2pvmm: isolation {} ({})", choice.backend, choice.reason);
    println!(
        "p2pvmm: service side: p2pd in a sandbox (user, mount, pid, ipc, uts namespaces; Landlock; seccomp); its data: {}",
        home.service_dir().display()
    );
    println!(
        "p2pvmm: apps connect to {}  (export P2PVM_API_SOCKET={0})",
        home.api_socket().display()
    );
    println!(
        "p2pvmm: admin token {} — operator console: p2pvmm --home {} console service",
        home.admin_token().display(),
        home.root().display()
    );
    let config = config
        .map(|c| std::path::absolute(&c))
        .transpose()
        .context("config path")?;
    let opts = vmm::supervisor::UpOptions {
        home,
        config,
        service_args,
        layout: p2pvm_channel::Layout::standard(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            stop.cancel();
        });
        vmm::supervisor::up(opts, shutdown).await
    })?;
    Ok(())
}

fn console(home: &Home, command: &[OsString]) -> anyhow::Result<()> {
    let pid: u32 = std::fs::read_to_string(home.service_pid())
        .with_context(|| {
            format!(
                "no running service side under {} (is `p2pvmm up` running?)",
                home.root().display()
            )
        })?
        .trim()
        .parse()
        .context("service.pid")?;
    let base: Vec<OsString> = std::fs::read_to_string(home.service_args_file())
        .context("service.args")?
        .lines()
        .map(OsString::from)
        .collect();
    if base.is_empty() {
        bail!("service.args is empty");
    }
    let (program, args) = sandbox::console_command(pid, &base, command);
    let err = std::process::Command::new(&program).args(&args).exec();
    Err(anyhow::Error::new(err).context(format!("running {}", program.display())))
}
