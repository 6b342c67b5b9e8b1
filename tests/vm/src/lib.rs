//! p2pvm-testhost: a reusable test host with a real `/dev/kvm`, for booting Linux guests
//! under a VMM in tests and benches.
//!
//! On machines whose `/dev/kvm` cannot run Linux guests (the PVM software hypervisor), the
//! harness boots Debian's kernel as a test host ("L1") under QEMU's emulator with emulated
//! AMD SVM; L1 loads `kvm-amd` and runs the scenario's script, which starts a VMM (ours, or
//! QEMU for comparison) on the same kernel as the guest ("L2"). On a host with hardware
//! virtualization the same script runs directly on the host instead.
//!
//! ```no_run
//! use p2pvm_testhost::{Scenario, TestHost};
//! let host = TestHost::prepare()?;
//! let outcome = host.run(&p2pvm_testhost::scenarios::qemu_l2_boot())?;
//! outcome.ensure_success()?;
//! println!("L2 at init after {} s", outcome.result_f64("init_s")?);
//! # let _ = Scenario::new("x", "true");
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Parts: [`kernel`] (download, unpack, `vmlinux`, `kernel.lock`), [`modules`] (closures
//! from `modules.dep`), [`cpio`] (deterministic newc archives), [`image`] (content-cached
//! initramfs images), [`bundle`] (programs with their libraries, QEMU's firmware),
//! [`scripts`] (init scripts and the shell API), [`scenario`] (what a test asks for),
//! [`run`] (QEMU or direct runner with a watchdog), [`console`] (result lines, [`Outcome`]),
//! [`vmm_bin`] (the release `p2pvmm` scenarios put in L1), [`profile`] (where a nested boot
//! spends its wall-clock time).

#![forbid(unsafe_code)]

pub mod bundle;
pub mod console;
pub mod platform;
pub mod profile;
pub mod run;
pub mod scenario;
pub mod scenarios;
pub mod scripts;
mod testhost;
pub mod vmm_bin;

// The image tools are shared with the product's image builder.
pub use p2pvm_images::{cpio, elf, image, kernel, libs, modules, util};

pub use console::{L1Ready, Outcome, ResultLine};
pub use kernel::{KERNEL_PIN_ENV, Kernel, KernelOptions, REFRESH_ENV};
pub use run::{HostDied, Limit, RUNNER_ENV, RunnerKind, WatchdogError};
pub use scenario::{ExtraFile, Scenario};
pub use testhost::{Images, L1_MODULES, L1_OPTIONAL_MODULES, L2_MODULES, Options, TestHost};
pub use util::CACHE_ENV;

/// Whether a run failed because the test host itself did: it ended without
/// reporting, or it went silent (with a heartbeat on, a frozen test host), or
/// its own kernel reported a CPU stall. That is the test bench failing (QEMU's
/// emulator, docs/vm-mode.md), not what runs on it.
pub fn is_bench_failure(e: &anyhow::Error) -> bool {
    e.downcast_ref::<HostDied>().is_some()
        || e.downcast_ref::<WatchdogError>()
            .is_some_and(|w| matches!(w.limit, Limit::Silence | Limit::HostStall))
}

/// Runs `scenario` on `host`, and once more, saying so on stderr
/// (`RETRY: ...`, which `scripts/vm-pass-rate.sh` counts), when the first run
/// failed by [`is_bench_failure`]. Any other failure, and any failure of the
/// second run, is returned.
pub fn run_once_more_if_the_bench_failed(
    host: &TestHost,
    scenario: &Scenario,
) -> anyhow::Result<Outcome> {
    match host.run(scenario) {
        Err(e) if is_bench_failure(&e) => {
            eprintln!(
                "RETRY: the nested test host died or stalled (the emulator, not the platform); \
                 running the scenario once more. First run: {e:#}"
            );
            host.run(scenario)
        }
        other => other,
    }
}

/// Installs a `tracing` subscriber printing to stderr (filter from `RUST_LOG`, default
/// `info`), so the console stream is visible; does nothing if one is installed already.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
