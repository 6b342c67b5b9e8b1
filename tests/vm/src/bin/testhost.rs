//! `testhost`: manual use of the p2pvm test host.
//!
//! * `testhost prepare` downloads and unpacks the kernel if needed, builds the base images,
//!   and prints the kernel version and the paths.
//! * `testhost run --l1-script FILE [--l2-init FILE] [--file GUEST=HOST]... [--binary
//!   GUEST=HOST]... [--bundle-qemu]` runs a scenario and prints its results; the exit code
//!   is the L1 script's.
//! * `testhost qemu-boot [--runs N]` runs the ready-made QEMU L2 boot scenario.
//! * `testhost trace-resets [--iterations N]` loads the platform's two VMs with the test
//!   host's KVM tracepoints on until a guest resets itself, and prints the last KVM
//!   events of the vCPU that shut down (docs/vm-mode.md, "Guest resets under the
//!   emulator").

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use p2pvm_testhost::{Outcome, Scenario, TestHost};

#[derive(Debug, Parser)]
#[command(about = "Nested KVM test host for p2pvm (see tests/vm/README.md)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Download/unpack the kernel, build the base images, print paths and the kernel version.
    Prepare {
        /// Ask apt for the current kernel even if one is cached.
        #[arg(long)]
        refresh: bool,
    },
    /// Run a scenario.
    Run(RunArgs),
    /// Boot the L2 guest under QEMU inside the test host (the comparison scenario).
    QemuBoot {
        /// How many runs.
        #[arg(long, default_value_t = 1)]
        runs: u32,
    },
    /// Profile our VMM's boot of the bench guest: which guest kernel functions the
    /// wall-clock time goes to (tests/vm/README.md).
    ProfileBoot {
        /// Profiled boots.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// The guest's command line (default: the VMM bench's).
        #[arg(long)]
        cmdline: Option<String>,
        /// Functions listed per boot.
        #[arg(long, default_value_t = 25)]
        top: usize,
        /// Timeline window (ms).
        #[arg(long, default_value_t = 100)]
        window_ms: u32,
    },
    /// Run the platform's VMs under load with KVM tracing until a guest resets itself.
    TraceResets {
        /// Turns of load (round trips, a stream, a typed command) before giving up.
        #[arg(long, default_value_t = 150)]
        iterations: u32,
        /// Events of the failing vCPU to print.
        #[arg(long, default_value_t = 200)]
        lines: u32,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The L1 script (POSIX sh).
    #[arg(long)]
    l1_script: PathBuf,
    /// The body of the L2 guest's /init.
    #[arg(long)]
    l2_init: Option<PathBuf>,
    /// A file for L1, GUEST=HOST (copied as is).
    #[arg(long = "file", value_parser = guest_host)]
    files: Vec<(String, PathBuf)>,
    /// A program for L1, GUEST=HOST (stripped, with its shared libraries).
    #[arg(long = "binary", value_parser = guest_host)]
    binaries: Vec<(String, PathBuf)>,
    /// Our VMM, put at /bin/p2pvmm ($P2PVMM).
    #[arg(long)]
    p2pvmm: Option<PathBuf>,
    /// Bundle qemu-system-x86_64 into L1 ($QEMU).
    #[arg(long)]
    bundle_qemu: bool,
    /// L1 vCPUs.
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// L1 memory (MiB).
    #[arg(long, default_value_t = 2048)]
    mem: u32,
    /// Watchdog: total seconds.
    #[arg(long, default_value_t = 240)]
    timeout: u64,
    /// Watchdog: seconds without a console line.
    #[arg(long, default_value_t = 90)]
    silence: u64,
}

fn guest_host(text: &str) -> Result<(String, PathBuf), String> {
    let (guest, host) = text.split_once('=').ok_or("expected GUEST=HOST")?;
    if !guest.starts_with('/') {
        return Err(format!("guest path {guest:?} must be absolute"));
    }
    Ok((guest.to_string(), PathBuf::from(host)))
}

fn main() -> ExitCode {
    p2pvm_testhost::init_tracing();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("testhost: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Prepare { refresh } => {
            let mut opts = p2pvm_testhost::Options::from_env();
            opts.kernel.refresh |= refresh;
            let host = TestHost::prepare_with(opts)?;
            let kernel = host.kernel();
            println!("kernel      {}", kernel.version);
            println!(
                "deb         {} (sha256 {})",
                kernel.deb.display(),
                kernel.deb_sha256
            );
            println!("vmlinux     {}", kernel.vmlinux.display());
            println!("modules     {}", kernel.modules_dir.display());
            println!("cache       {}", host.cache_dir().display());
            println!("runner      {} ({})", host.runner(), host.runner_reason());
            let images = host.images(&Scenario::new("prepare", "true"))?;
            println!("l2 initrd   {}", images.l2_initrd.display());
            if let Some(l1) = images.l1_initrd {
                println!("l1 initrd   {}", l1.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(args) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let name = args
                .l1_script
                .file_stem()
                .map_or("manual".into(), |s| s.to_string_lossy().into_owned());
            let mut scenario = Scenario::new(name, read(&args.l1_script)?)
                .smp(args.smp)
                .mem_mib(args.mem)
                .timeout(Duration::from_secs(args.timeout))
                .silence_timeout(Duration::from_secs(args.silence));
            if let Some(l2) = &args.l2_init {
                scenario = scenario.l2_init(read(l2)?);
            }
            for (guest, host) in args.files {
                scenario = scenario.file(guest, host);
            }
            for (guest, host) in args.binaries {
                scenario = scenario.binary(guest, host);
            }
            if let Some(vmm) = args.p2pvmm {
                scenario = scenario.p2pvmm(vmm);
            }
            if args.bundle_qemu {
                scenario = scenario.bundle_qemu();
            }
            let outcome = TestHost::prepare()?.run(&scenario)?;
            report(&outcome);
            Ok(ExitCode::from(
                u8::try_from(outcome.exit_status).unwrap_or(1),
            ))
        }
        Cmd::TraceResets { iterations, lines } => {
            let host = TestHost::prepare()?;
            let (scenario, _) = p2pvm_testhost::platform::scenario(
                &host,
                "trace-resets",
                include_str!("../../scenarios/trace-resets-l1.sh"),
            )?;
            let scenario = scenario
                .env("ITERATIONS", iterations.to_string())
                .env("TRACE_LINES", lines.to_string())
                .mem_mib(4096)
                .smp(2)
                .timeout(Duration::from_secs(600 + 30 * u64::from(iterations)))
                .silence_timeout(Duration::from_secs(600));
            let outcome = host.run(&scenario)?;
            report(&outcome);
            Ok(ExitCode::from(
                u8::try_from(outcome.exit_status).unwrap_or(1),
            ))
        }
        Cmd::ProfileBoot {
            runs,
            cmdline,
            top,
            window_ms,
        } => {
            let host = TestHost::prepare()?;
            let scenario = p2pvm_testhost::profile::scenario(runs, cmdline.as_deref())
                .p2pvmm(p2pvm_testhost::vmm_bin::p2pvmm_release()?);
            let outcome = host.run(&scenario)?;
            report(&outcome);
            outcome.ensure_success()?;
            let (symbols, boots) = p2pvm_testhost::profile::parse_console(&outcome.console)?;
            println!("{} kernel text symbols", symbols.len());
            print!(
                "{}",
                p2pvm_testhost::profile::report(&symbols, &boots, top, window_ms)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::QemuBoot { runs } => {
            let host = TestHost::prepare()?;
            for run in 1..=runs {
                let outcome = host.run(&p2pvm_testhost::scenarios::qemu_l2_boot())?;
                println!("run {run}:");
                report(&outcome);
                outcome.ensure_success()?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report(outcome: &Outcome) {
    if let Some(ready) = &outcome.l1_ready {
        let uptime = ready
            .uptime_s
            .map_or(String::new(), |u| format!(" at L1 uptime {u} s"));
        println!(
            "  test host ready ({} runner, /dev/kvm: {}){uptime}",
            outcome.runner, ready.kvm
        );
    }
    for line in &outcome.results {
        let fields: Vec<String> = line
            .fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  result {}", fields.join(" "));
    }
    for warning in &outcome.warnings {
        println!("  {warning}");
    }
    println!(
        "  exit status {}, wall {:.1} s",
        outcome.exit_status,
        outcome.wall.as_secs_f64()
    );
}
