//! What a test asks the test host to do: a [`Scenario`].
//!
//! The L1 script runs with `sh` on the test host (busybox `ash` in L1, the host's `sh` for
//! the direct runner), in `$WORK`, after `lib.sh` was sourced. Its environment:
//!
//! | variable        | nested runner             | direct runner                 |
//! |-----------------|---------------------------|-------------------------------|
//! | `GUEST_KERNEL`  | `/guest/vmlinux`          | `$ROOT/guest/vmlinux`         |
//! | `GUEST_INITRD`  | `/guest/initrd.cpio`      | `$ROOT/guest/initrd.cpio`     |
//! | `WORK`          | `/tmp/work` (tmpfs)       | `$ROOT/work`                  |
//! | `ROOT`          | empty                     | a temporary directory         |
//! | `P2PVMM`        | `/bin/p2pvmm` (if given)  | `$ROOT/bin/p2pvmm`            |
//! | `QEMU`          | bundled QEMU (if asked)   | the host's QEMU               |
//! | `TESTHOST_RUNNER` | `nested`                | `direct`                      |
//! | `TESTHOST_LIB`  | `/testhost/lib.sh`        | `$ROOT/testhost/lib.sh`       |
//!
//! Extra files are at their guest path in L1 and at `$ROOT<guest path>` for the direct
//! runner, so scripts refer to them as `"$ROOT/etc/thing"`. Variables given with
//! [`Scenario::env`] are passed as they are.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::run::Limits;

/// Where [`Scenario::p2pvmm`] puts our VMM.
pub const P2PVMM_GUEST_PATH: &str = "/bin/p2pvmm";
/// Where [`Scenario::p2pvmm`] puts `p2pvm-kvm-hold` (built beside `p2pvmm`),
/// which the test host's init starts before the scenario: one empty VM held
/// open, so that its KVM turns virtualization on once, at boot, rather than
/// when the scenario's first VM starts (docs/vm-mode.md, "Pass rate").
pub const KVM_HOLD_GUEST_PATH: &str = "/bin/p2pvm-kvm-hold";
/// `0` leaves the VM hold out (to measure what it changes).
pub const KVM_HOLD_ENV: &str = "P2PVM_TESTHOST_KVM_HOLD";

/// A file carried into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    /// Absolute path inside the image.
    pub guest: String,
    /// The file on this host.
    pub host: PathBuf,
    /// A program: stripped, with its shared libraries and loader (nested runner).
    pub binary: bool,
}

/// One run of the test host.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name used in logs, errors and image file names.
    pub name: String,
    /// The L1 script (POSIX `sh`).
    pub l1_script: String,
    /// The body of the L2 guest's `/init` (POSIX `sh`, runs as PID 1 after the prelude);
    /// `None` prints `P2PVM-L2-INIT uptime=<L2 uptime>` and powers off.
    pub l2_init: Option<String>,
    /// Files for the L1 test host.
    pub extra_files: Vec<ExtraFile>,
    /// Files for the L2 guest's initramfs.
    pub l2_files: Vec<ExtraFile>,
    /// Modules for L2 besides the defaults ([`crate::L2_MODULES`]).
    pub l2_modules: Vec<String>,
    /// Modules the L1 test host loads besides [`crate::L1_MODULES`].
    pub l1_modules: Vec<String>,
    /// Extra environment variables for the L1 script.
    pub env: Vec<(String, String)>,
    /// Put QEMU (and its libraries and firmware) into L1 as `$QEMU`.
    pub bundle_qemu: bool,
    /// Watchdog: longest whole run (default 240 s).
    pub timeout: Duration,
    /// Watchdog: longest time without a console line (default 90 s).
    pub silence_timeout: Duration,
    /// The test host prints a heartbeat line this often (default none): a
    /// scenario with long quiet steps can then keep a short silence limit,
    /// which a frozen test host reaches in seconds, not minutes.
    pub heartbeat: Option<Duration>,
    /// L1 vCPUs (default 1).
    pub smp: u32,
    /// L1 memory in MiB (default 2048).
    pub mem_mib: u32,
}

impl Scenario {
    /// A scenario running `l1_script` with the defaults.
    pub fn new(name: impl Into<String>, l1_script: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            l1_script: l1_script.into(),
            l2_init: None,
            extra_files: Vec::new(),
            l2_files: Vec::new(),
            l2_modules: Vec::new(),
            l1_modules: Vec::new(),
            env: Vec::new(),
            bundle_qemu: false,
            timeout: Duration::from_secs(240),
            silence_timeout: Duration::from_secs(90),
            heartbeat: None,
            smp: 1,
            mem_mib: 2048,
        }
    }

    /// Sets the body of the L2 guest's `/init`.
    pub fn l2_init(mut self, body: impl Into<String>) -> Self {
        self.l2_init = Some(body.into());
        self
    }

    /// Has the L1 test host load `module` (with what it depends on).
    pub fn l1_module(mut self, module: impl Into<String>) -> Self {
        self.l1_modules.push(module.into());
        self
    }

    /// Copies a host file into L1 at `guest` as it is.
    pub fn file(mut self, guest: impl Into<String>, host: impl AsRef<Path>) -> Self {
        self.extra_files.push(ExtraFile {
            guest: guest.into(),
            host: host.as_ref().to_path_buf(),
            binary: false,
        });
        self
    }

    /// Copies a host program into L1 at `guest`, stripped, with its shared libraries.
    pub fn binary(mut self, guest: impl Into<String>, host: impl AsRef<Path>) -> Self {
        self.extra_files.push(ExtraFile {
            guest: guest.into(),
            host: host.as_ref().to_path_buf(),
            binary: true,
        });
        self
    }

    /// Our VMM: [`Scenario::binary`] at `/bin/p2pvmm`, named by `$P2PVMM`;
    /// with it `p2pvm-kvm-hold` from the same directory, where it was built.
    pub fn p2pvmm(self, host: impl AsRef<Path>) -> Self {
        let hold = host.as_ref().with_file_name("p2pvm-kvm-hold");
        let s = self.binary(P2PVMM_GUEST_PATH, host);
        if hold.is_file() {
            s.binary(KVM_HOLD_GUEST_PATH, hold)
        } else {
            s
        }
    }

    /// Copies a host file into the L2 guest's initramfs (programs are not stripped and
    /// must be static or come with their libraries).
    pub fn l2_file(mut self, guest: impl Into<String>, host: impl AsRef<Path>) -> Self {
        self.l2_files.push(ExtraFile {
            guest: guest.into(),
            host: host.as_ref().to_path_buf(),
            binary: false,
        });
        self
    }

    /// Copies a host program into the L2 guest's initramfs at `guest`,
    /// stripped, with its shared libraries.
    pub fn l2_binary(mut self, guest: impl Into<String>, host: impl AsRef<Path>) -> Self {
        self.l2_files.push(ExtraFile {
            guest: guest.into(),
            host: host.as_ref().to_path_buf(),
            binary: true,
        });
        self
    }

    /// Loads another module in L2 (after the defaults).
    pub fn l2_module(mut self, name: impl Into<String>) -> Self {
        self.l2_modules.push(name.into());
        self
    }

    /// Passes an environment variable to the L1 script.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Bundles QEMU into L1 (`$QEMU`), for comparisons with our VMM.
    pub fn bundle_qemu(mut self) -> Self {
        self.bundle_qemu = true;
        self
    }

    /// Sets the watchdog's total limit.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// Sets the watchdog's silence limit.
    pub fn silence_timeout(mut self, limit: Duration) -> Self {
        self.silence_timeout = limit;
        self
    }

    /// Has the test host print `P2PVM-HEARTBEAT` every `every`.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = Some(every);
        self
    }

    /// Sets L1's vCPU count.
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus.max(1);
        self
    }

    /// Sets L1's memory in MiB.
    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits {
            total: self.timeout,
            silence: self.silence_timeout,
        }
    }

    /// Whether the test host's init holds a VM open (`p2pvm-kvm-hold` is in
    /// its image and [`KVM_HOLD_ENV`] is not `0`).
    pub(crate) fn holds_kvm(&self) -> bool {
        std::env::var(KVM_HOLD_ENV).as_deref() != Ok("0")
            && self
                .extra_files
                .iter()
                .any(|f| f.guest == KVM_HOLD_GUEST_PATH)
    }

    /// Whether an extra file is our VMM.
    pub(crate) fn has_p2pvmm(&self) -> bool {
        self.extra_files
            .iter()
            .any(|f| f.guest == P2PVMM_GUEST_PATH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder() {
        let s = Scenario::new("x", "true")
            .p2pvmm("/tmp/p2pvmm")
            .file("/etc/a", "/tmp/a")
            .env("N", "3")
            .smp(0)
            .timeout(Duration::from_secs(5));
        assert!(s.has_p2pvmm());
        assert_eq!(s.extra_files.len(), 2);
        assert!(s.extra_files[0].binary && !s.extra_files[1].binary);
        assert_eq!(s.smp, 1);
        assert_eq!(s.limits().total, Duration::from_secs(5));
        assert_eq!(s.limits().silence, Duration::from_secs(90));
    }
}
