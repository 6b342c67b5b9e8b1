//! `p2pvm-images`: builds the two VM images `p2pvmm up --isolation vm` boots.
//!
//! `p2pvm-images build` compiles our programs in release mode (unless
//! `--bin-dir` names ready ones), fetches Debian's kernel with apt-get and
//! writes `vmlinux`, `service.cpio`, `client.cpio` and `images.lock` to the
//! output directory. `p2pvm-images store PATH` creates a service VM store disk.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use p2pvm_images::build::{BuildOptions, build};
use p2pvm_images::kernel::KernelOptions;
use p2pvm_images::release;
use p2pvm_images::util::Cache;

#[derive(Parser)]
#[command(version, about = "Builds p2pvm's VM images")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Builds vmlinux, service.cpio, client.cpio and images.lock.
    Build(BuildArgs),
    /// Builds our programs in release mode, as the images and the nested
    /// test host use them (one cargo invocation), and prints the directory.
    Release,
    /// Creates an ext4 store disk for the service VM (kept if it exists).
    Store {
        /// The disk image file.
        path: PathBuf,
        /// Size of a new store, MiB.
        #[arg(long, default_value_t = p2pvm_images::store::DEFAULT_STORE_MIB)]
        size_mib: u64,
    },
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Output directory (default: $P2PVM_IMAGES, else
    /// ~/.local/share/p2pvmm/images, where `p2pvmm up` looks).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pin the kernel (`6.1.0-57-amd64`); default: what `linux-image-6.12-amd64`
    /// depends on now, asked of apt.
    #[arg(long, env = p2pvm_images::kernel::KERNEL_PIN_ENV)]
    kernel: Option<String>,
    /// Use the kernel already in the cache instead of asking apt for the
    /// current one (no network when it is there).
    #[arg(long)]
    offline: bool,
    /// Take our programs from this directory instead of building them.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The signature database for clamd in the service VM.
    #[arg(long)]
    signatures: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Build(args) => build_images(args),
        Cmd::Release => {
            println!("{}", release::build()?.display());
            Ok(())
        }
        Cmd::Store { path, size_mib } => {
            let state = p2pvm_images::store::ensure(&path, size_mib)?;
            println!("{}: {state:?}", path.display());
            Ok(())
        }
    }
}

fn build_images(args: BuildArgs) -> anyhow::Result<()> {
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => release::build()?,
    };
    let programs = release::programs(&bin_dir, args.signatures)?;
    let opts = BuildOptions {
        out: std::path::absolute(args.out.unwrap_or_else(default_out))?,
        kernel: KernelOptions {
            pin: args
                .kernel
                .map(|k| k.trim().trim_start_matches("linux-image-").to_string()),
            refresh: !args.offline,
        },
        programs,
    };
    let built = build(&Cache::from_env()?, &opts)?;
    println!(
        "kernel {} ({})",
        built.lock.kernel.version, built.lock.kernel.package
    );
    for image in &built.lock.images {
        println!(
            "{:<13} {:>7.1} MiB  sha256 {}",
            image.file,
            image.bytes as f64 / f64::from(1 << 20),
            image.sha256
        );
    }
    println!(
        "images in {}  — boot them: p2pvmm up --isolation vm --images {0}",
        built.dir.display()
    );
    Ok(())
}

/// Where `p2pvmm up` finds images by default.
fn default_out() -> PathBuf {
    if let Some(dir) = std::env::var_os("P2PVM_IMAGES").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("P2PVMM_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/p2pvmm")))
        .unwrap_or_else(|| PathBuf::from("."));
    home.join("images")
}
