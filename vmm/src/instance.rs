//! One VM's life in its `p2pvmm run` process: its state directory
//! ([`VmDir`]) and console socket (kept across guest reboots, so an attached
//! operator stays attached), a build-and-run per boot, and the report of how
//! it went.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::builder::{self, BuildError};
use crate::config::VmConfig;
use crate::console::{self, Console};
use crate::lifecycle::{BootTimes, ExitReason};
use crate::runner::{self, ThreadSetup};
use crate::vm_dir::VmDir;
use crate::vstate::memory::HugePages;
use crate::vstate::profile::GuestProfile;

/// What to do when the guest resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReboot {
    /// Boot it again (what a machine does).
    Restart,
    /// End the run (like QEMU's `-no-reboot`).
    Exit,
}

/// How `p2pvmm run` runs a VM.
pub struct RunOptions {
    /// State directory root (`--home`).
    pub home: PathBuf,
    /// Copy the console to stdout.
    pub console_stdout: bool,
    /// Guest reset policy.
    pub on_reboot: OnReboot,
    /// Per-thread confinement.
    pub setup: Arc<dyn ThreadSetup>,
    /// When the VMM process started (boot times count from here).
    pub started: Instant,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("home", &self.home)
            .field("on_reboot", &self.on_reboot)
            .finish_non_exhaustive()
    }
}

/// Why the VM could not run.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// Preparing the state directory or console failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM could not be built.
    #[error("Building the VM")]
    Build(#[from] BuildError),
}

/// How the VM's last boot went, for the operator and for benchmarks.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `poweroff`, `reset`, `panic`, `stopped` or `error: ...`.
    pub exit: String,
    /// Boots done (1 + guest reboots).
    pub boots: u32,
    /// ms from the VMM's start (or the reboot) until the vCPUs entered the guest.
    pub setup_ms: Option<f64>,
    /// ms from the VMM's start (or the reboot) to the guest's first console byte.
    pub first_output_ms: Option<f64>,
    /// ms to the guest's `/init` (boot-marker port).
    pub init_ms: Option<f64>,
    /// Largest resident memory beyond guest RAM, KiB.
    pub vmm_overhead_kib: u64,
    /// Guest RAM, MiB.
    pub guest_mem_mib: u64,
    /// Whether guest RAM could use transparent huge pages.
    pub huge_pages: bool,
    /// Port-I/O exits in the last boot.
    pub pio_exits: u64,
    /// MMIO exits in the last boot.
    pub mmio_exits: u64,
    /// Seconds the last boot ran.
    pub ran_s: f64,
}

impl Report {
    /// The exit reason as it ended the run.
    pub fn reason_text(reason: &ExitReason) -> String {
        match reason {
            ExitReason::PowerOff => "poweroff".into(),
            ExitReason::Reset => "reset".into(),
            ExitReason::Panic => "panic".into(),
            ExitReason::Stopped => "stopped".into(),
            ExitReason::Error(e) => format!("error: {e}"),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstanceError {
    let what = what.into();
    move |source| InstanceError::Io { what, source }
}

/// Runs `config` until it powers off, panics, fails, is stopped, or resets
/// (with [`OnReboot::Exit`]); returns the final reason and the report.
pub fn run(config: &VmConfig, opts: &RunOptions) -> Result<(ExitReason, Report), InstanceError> {
    let dir = VmDir::new(&opts.home, &config.name);
    std::fs::create_dir_all(dir.path())
        .map_err(io(format!("creating {}", dir.path().display())))?;
    std::fs::write(dir.pid_file(), format!("{}\n", std::process::id()))
        .map_err(io("writing the pid file"))?;
    let listener =
        console::bind(&dir.console_socket()).map_err(io("binding the console socket"))?;
    let log = File::create(dir.console_log()).map_err(io("creating the console log"))?;
    crate::vstate::vcpu::install_kick_handler().map_err(io("installing the vCPU kick handler"))?;

    let mut boot = Arc::new(BootTimes::new(opts.started));
    let console =
        Console::new(Some(log), opts.console_stdout, boot.clone()).map_err(io("console"))?;
    let mut boots = 0;
    loop {
        boots += 1;
        let listener = listener.try_clone().map_err(io("console socket"))?;
        let profile = GuestProfile::from_env(&config.name, boots).map(Arc::new);
        let machine = builder::build(
            config,
            console.clone(),
            Some(listener),
            boot.clone(),
            profile,
        )?;
        let huge = machine.ram.huge_pages == HugePages::Advised;
        let counts = machine.counts.clone();
        let sink = crate::metrics::FigureSink {
            path: dir.figures(),
            boots,
            guest_memory_bytes: config.mem_mib << 20,
        };
        let outcome = runner::run(
            machine,
            opts.setup.clone(),
            Some(&dir.memory_report()),
            Some(&sink),
        )
        .map_err(io("starting the VM's threads"))?;
        let report = Report {
            exit: Report::reason_text(&outcome.reason),
            boots,
            setup_ms: boot.setup_ms(),
            first_output_ms: boot.first_output_ms(),
            init_ms: boot.init_ms(),
            vmm_overhead_kib: outcome.max_overhead_kib,
            guest_mem_mib: config.mem_mib,
            huge_pages: huge,
            pio_exits: counts.pio.load(std::sync::atomic::Ordering::Relaxed),
            mmio_exits: counts.mmio.load(std::sync::atomic::Ordering::Relaxed),
            ran_s: outcome.ran.as_secs_f64(),
        };
        let top = counts.top_ports(12);
        if !top.is_empty() {
            let text: Vec<String> = top.iter().map(|(p, c)| format!("{p:#x}:{c}")).collect();
            tracing::info!(ports = %text.join(" "), "port exits by port");
        }
        if outcome.reason == ExitReason::Reset && opts.on_reboot == OnReboot::Restart {
            tracing::info!(vm = %config.name, boots, "guest reset: booting again");
            boot = Arc::new(BootTimes::new(Instant::now()));
            console.set_boot(boot.clone());
            continue;
        }
        let _ = std::fs::remove_file(dir.console_socket());
        let _ = std::fs::remove_file(dir.pid_file());
        return Ok((outcome.reason, report));
    }
}
