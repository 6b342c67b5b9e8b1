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
