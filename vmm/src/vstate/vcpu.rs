//! vCPUs: created and given their CPUID, MSRs, FPU and local APIC state
//! here, then each runs `KVM_RUN` on a thread of its own, dispatching port
//! and MMIO exits to the buses.
//!
//! To stop a vCPU the main thread sets the run's exit flag and sends the
//! thread [`kick_signal`] until it leaves `KVM_RUN` (the signal makes the
//! ioctl return `EINTR`; its handler only notes, for the guest profile,
//! that a kick came).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::regs::{self, EntryMode};
use crate::arch::x86_64::{cpuid, msr};
use crate::devices::bus::Bus;
use crate::lifecycle::{ExitReason, ExitSignal};
use crate::vstate::profile::{GuestProfile, Mode};
use crate::vstate::vm::Vm;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {id}: {what}")]
    Kvm {
        /// Which vCPU.
        id: u8,
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Boot structures could not be written.
    #[error("vCPU {0}: boot registers")]
    Regs(u8, #[source] regs::RegsError),
    /// Some MSRs were refused.
    #[error("vCPU {id}: KVM set {set} of {wanted} MSRs")]
    Msrs {
        /// Which vCPU.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
}

/// Exits counted across all vCPUs (boot-time analysis, `--report`).
#[derive(Debug, Default)]
pub struct ExitCounts {
    /// Port reads and writes.
    pub pio: AtomicU64,
    /// MMIO reads and writes.
    pub mmio: AtomicU64,
    /// Accesses nothing answered.
    pub unhandled: AtomicU64,
    /// Per-port counts, kept only with `P2PVMM_EXIT_STATS=1` (boot analysis).
    pub by_port: Option<Box<[AtomicU64]>>,
}

impl ExitCounts {
    /// Counters; per-port ones if `P2PVMM_EXIT_STATS=1`.
    pub fn new() -> Self {
        let detailed = std::env::var_os("P2PVMM_EXIT_STATS").is_some_and(|v| v == "1");
        Self {
            by_port: detailed.then(|| (0..=u16::MAX).map(|_| AtomicU64::new(0)).collect()),
            ..Default::default()
        }
    }

    fn port(&self, port: u16) {
        self.pio.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &self.by_port {
            p[port as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The busiest ports, most exits first.
    pub fn top_ports(&self, n: usize) -> Vec<(u16, u64)> {
        let Some(p) = &self.by_port else {
            return Vec::new();
        };
        let mut v: Vec<(u16, u64)> = p
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u16, c.load(Ordering::Relaxed)))
            .filter(|(_, c)| *c > 0)
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.truncate(n);
        v
    }
}

/// One vCPU, configured, not yet running.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    counts: Arc<ExitCounts>,
    profile: Option<Arc<GuestProfile>>,
}

/// What the vCPU threads share.
#[derive(Debug, Clone)]
pub struct VcpuShared {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The run's end.
    pub exit: Arc<ExitSignal>,
    /// Exit counters.
    pub counts: Arc<ExitCounts>,
    /// Where samples of the guest's instruction pointer go, if sampled.
    pub profile: Option<Arc<GuestProfile>>,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and sets its CPU state; the boot vCPU
    /// (`entry` given) also gets its registers. The others wait in the
    /// kernel for the guest's INIT/SIPI.
    pub fn new(
        kvm: &Kvm,
        vm: &Vm,
        id: u8,
        count: u8,
        mem: &GuestMemoryMmap,
        entry: Option<EntryMode>,
        shared: VcpuShared,
    ) -> Result<Self, VcpuError> {
        let err = |what| move |source| VcpuError::Kvm { id, what, source };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(err("KVM_CREATE_VCPU"))?;

        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::patch(
            &mut cpuid,
            id,
            count,
            kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        );
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

        let supported = kvm
            .get_msr_index_list()
            .map_err(err("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs = msr::boot_msrs(supported.as_slice());
        let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                wanted: msrs.as_slice().len(),
            });
        }
        fd.set_fpu(&regs::fpu()).map_err(err("KVM_SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

        if let Some(mode) = entry {
            let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
            let sregs = regs::sregs(mem, mode, sregs).map_err(|e| VcpuError::Regs(id, e))?;
            fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs::regs(mode))
                .map_err(err("KVM_SET_REGS"))?;
        }
        Ok(Self {
            fd,
            id,
            pio: shared.pio,
            mmio: shared.mmio,
            exit: shared.exit,
            counts: shared.counts,
            profile: shared.profile,
        })
    }

    /// The vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Runs the vCPU until the run ends (for whatever reason, from any thread).
    pub fn run(mut self) {
        while !self.exit.stopping() {
            if let Some(reason) = self.step() {
                self.exit.request(reason);
            }
        }
        if let Ok(r) = self.fd.get_regs() {
            tracing::debug!(
                vcpu = self.id,
                rip = format_args!("{:#x}", r.rip),
                "vCPU stopped"
            );
        }
    }

    /// Where the guest was when it triple-faulted: the one trace such a
    /// reset leaves (the guest prints nothing). On Intel (VMX) these are the
    /// registers at the fault; on AMD (SVM) KVM has already put the vCPU
    /// through INIT when it reports the shutdown, so they read as reset
    /// values and only the fact of the triple fault is news.
    fn log_triple_fault(&self) {
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        tracing::warn!(
            vcpu = self.id,
            rip = format_args!("{:#x}", regs.map_or(0, |r| r.rip)),
            rsp = format_args!("{:#x}", regs.map_or(0, |r| r.rsp)),
            cr0 = format_args!("{:#x}", sregs.map_or(0, |s| s.cr0)),
            cr2 = format_args!("{:#x}", sregs.map_or(0, |s| s.cr2)),
            cr3 = format_args!("{:#x}", sregs.map_or(0, |s| s.cr3)),
            cr4 = format_args!("{:#x}", sregs.map_or(0, |s| s.cr4)),
            "triple fault: the guest reset without asking"
        );
    }

    /// One `KVM_RUN`; `Some` when the run must end.
    fn step(&mut self) -> Option<ExitReason> {
        // A kick that landed since the last `KVM_RUN` returned found this
        // thread handling an exit: that time is the VMM's.
        if KICKED.replace(false)
            && let Some(p) = &self.profile
        {
            p.record(self.id, 0, Mode::Vmm);
        }
        let counts = &self.counts;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                counts.port(port);
                // A string instruction (`rep insb`) hands over all its
                // elements at once; every register here is at most 4 bytes,
                // so longer data is taken byte by byte.
                let unit = if data.len() > 4 { 1 } else { data.len().max(1) };
                for chunk in data.chunks_mut(unit) {
                    if !self.pio.read(u64::from(port), chunk) {
                        counts.unhandled.fetch_add(1, Ordering::Relaxed);
                        chunk.fill(0xff);
                    }
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                counts.port(port);
                let unit = if data.len() > 4 { 1 } else { data.len().max(1) };
                for chunk in data.chunks(unit) {
                    if !self.pio.write(u64::from(port), chunk) {
                        counts.unhandled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                counts.mmio.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.read(addr, data) {
                    counts.unhandled.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                counts.mmio.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.write(addr, data) {
                    counts.unhandled.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            // A triple fault: what Linux ends with when every reset method
            // failed, or a guest that faulted beyond repair.
            Ok(VcpuExit::Shutdown) => {
                self.log_triple_fault();
                Some(ExitReason::Reset)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_CRASH => ExitReason::Panic,
                other => ExitReason::Error(format!("vCPU {}: system event {other}", self.id)),
            }),
            // Only without an in-kernel LAPIC; ours has one, so just go on.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Error(format!(
                "vCPU {}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})",
                self.id
            ))),
            Ok(VcpuExit::InternalError) => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                Some(ExitReason::Error(format!(
                    "vCPU {}: KVM internal error (emulation failed) at rip {rip:#x}",
                    self.id
                )))
            }
            Ok(other) => Some(ExitReason::Error(format!(
                "vCPU {}: unexpected exit {other:?}",
                self.id
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: the profiler's (or the stop's). No exit is pending
                // here (KVM completes one before it looks for signals), so
                // the registers are the guest's own.
                KICKED.set(false);
                if let Some(p) = &self.profile
                    && let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs())
                {
                    let mode = if s.cs.dpl == 3 {
                        Mode::User
                    } else {
                        Mode::Kernel
                    };
                    p.record(self.id, r.rip, mode);
                }
                None
            }
            Err(e) => Some(ExitReason::Error(format!("vCPU {}: KVM_RUN: {e}", self.id))),
        }
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// Set by [`kick_signal`]'s handler on the thread it lands on, so a vCPU
    /// can tell that a kick came while it was out of `KVM_RUN`. Constant
    /// initialisation and no destructor: touching it is safe in a handler.
    static KICKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

extern "C" fn note_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KICKED.set(true);
}

/// Installs the handler of [`kick_signal`]; once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), note_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}
