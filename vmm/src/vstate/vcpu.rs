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
    KVM_EXIT_IO, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
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
    /// `KVM_EXIT_HLT` and `KVM_EXIT_INTR` (rare with the in-kernel LAPIC).
    pub halt: AtomicU64,
    /// `KVM_RUN` interrupted by a signal (a kick: the stop's, the profiler's).
    pub kicked: AtomicU64,
    /// Every other exit (shutdown, system events, failed entries).
    pub other: AtomicU64,
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

    /// Exits so far by reason, as the metrics name them.
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("io", n(&self.pio)),
            ("mmio", n(&self.mmio)),
            ("halt", n(&self.halt)),
            ("signal", n(&self.kicked)),
            ("other", n(&self.other)),
        ]
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
    /// Bytes of the fd's `kvm_run` mapping (`KVM_GET_VCPU_MMAP_SIZE`).
    run_size: usize,
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
            run_size: vm.fd().run_size(),
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

    /// A port I/O exit whose data area KVM put outside its own mapping, or
    /// whose size disagrees with what kvm-ioctls saw: not the guest's doing.
    fn bad_pio_exit(&self, port: u16) -> ExitReason {
        ExitReason::Error(format!(
            "vCPU {}: port {port:#x} I/O exit whose data area is not in the kvm_run mapping \
             or not the length reported",
            self.id
        ))
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
                let len = data.len();
                // The exit's data borrows the fd; it is taken again with the
                // element size, which `VcpuExit` does not carry.
                let Some((size, data)) = pio_exit(&mut self.fd, self.run_size, len) else {
                    return Some(self.bad_pio_exit(port));
                };
                let pio = &self.pio;
                let done = pio_in_elements(size, data, |element| {
                    if !pio.read(u64::from(port), element) {
                        counts.unhandled.fetch_add(1, Ordering::Relaxed);
                        element.fill(0xff);
                    }
                });
                if let Err(e) = done {
                    counts.unhandled.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                    crate::warn_limited!(vcpu = self.id, port, "port read not emulated: {e}");
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                counts.port(port);
                let len = data.len();
                let Some((size, data)) = pio_exit(&mut self.fd, self.run_size, len) else {
                    return Some(self.bad_pio_exit(port));
                };
                let pio = &self.pio;
                let done = pio_out_elements(size, data, |element| {
                    if !pio.write(u64::from(port), element) {
                        counts.unhandled.fetch_add(1, Ordering::Relaxed);
                    }
                });
                if let Err(e) = done {
                    counts.unhandled.fetch_add(1, Ordering::Relaxed);
                    crate::warn_limited!(vcpu = self.id, port, "port write not emulated: {e}");
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
                counts.other.fetch_add(1, Ordering::Relaxed);
                self.log_triple_fault();
                Some(ExitReason::Reset)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                counts.other.fetch_add(1, Ordering::Relaxed);
                Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    KVM_SYSTEM_EVENT_CRASH => ExitReason::Panic,
                    other => ExitReason::Error(format!("vCPU {}: system event {other}", self.id)),
                })
            }
            // Only without an in-kernel LAPIC; ours has one, so just go on.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => {
                counts.halt.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                counts.other.fetch_add(1, Ordering::Relaxed);
                Some(ExitReason::Error(format!(
                    "vCPU {}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})",
                    self.id
                )))
            }
            Ok(VcpuExit::InternalError) => {
                counts.other.fetch_add(1, Ordering::Relaxed);
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                Some(ExitReason::Error(format!(
                    "vCPU {}: KVM internal error (emulation failed) at rip {rip:#x}",
                    self.id
                )))
            }
            Ok(other) => {
                counts.other.fetch_add(1, Ordering::Relaxed);
                Some(ExitReason::Error(format!(
                    "vCPU {}: unexpected exit {other:?}",
                    self.id
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counts.kicked.fetch_add(1, Ordering::Relaxed);
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

/// The element size and the data area of the port I/O exit `KVM_RUN` just
/// returned on `fd`, whose data kvm-ioctls reported as `len` bytes; `None`
/// if the exit is not port I/O or its data area is not where it may be (in
/// the `run_size`-byte mapping, past the `kvm_run` structure).
///
/// `VcpuExit::IoIn`/`IoOut` give the port and the data but not the size of
/// one element (`rep outsw` of 2 and `outl` both hand over 4 bytes), and
/// their data borrows the fd, so the caller ends that borrow and takes the
/// same data again here with `kvm_run.io.size`. For a read the elements are
/// written into this area, from which KVM completes the guest's `in`/`ins`
/// on the next `KVM_RUN`.
#[allow(unsafe_code)]
fn pio_exit(fd: &mut VcpuFd, run_size: usize, len: usize) -> Option<(usize, &mut [u8])> {
    let run: &mut kvm_run = fd.get_kvm_run();
    if run.exit_reason != KVM_EXIT_IO {
        return None;
    }
    // SAFETY: `exit_reason` is `KVM_EXIT_IO`, so the kernel filled `io`, the
    // union's active member (kvm-ioctls' `run` read the same member to
    // report this exit). It is plain integers, valid for any bit pattern,
    // and copied out here.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let bytes = size.checked_mul(usize::try_from(io.count).ok()?)?;
    let start = usize::try_from(io.data_offset).ok()?;
    let end = start.checked_add(bytes)?;
    if bytes != len || start < std::mem::size_of::<kvm_run>() || end > run_size {
        return None;
    }
    let base = std::ptr::from_mut(run).cast::<u8>();
    // SAFETY: `start..end` was just checked to lie inside the `run_size`
    // bytes kvm-ioctls mapped (read/write, shared) for this vCPU's `kvm_run`
    // and keeps mapped as long as `fd` lives, and past the `kvm_run`
    // structure, so it overlaps no reference to that (`run` is not used
    // again). The slice borrows `fd` mutably, so no other access to the
    // mapping from this process can happen while it lives, and the kernel
    // touches the area only inside `KVM_RUN`, which needs that borrow too.
    // Any bytes are valid `u8`s. This is the same area, found the same way,
    // that kvm-ioctls' `run` handed out as the exit's data.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(start), bytes) };
    Some((size, data))
}

/// Why a port access could not be split into the guest's elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PioError {
    /// Port instructions move 1, 2 or 4 bytes per element.
    #[error("element size {0} is not 1, 2 or 4")]
    Size(usize),
    /// The data is not a whole number of elements.
    #[error("{len} bytes are not a whole number of {size}-byte elements")]
    Length {
        /// The element size.
        size: usize,
        /// The data's length.
        len: usize,
    },
}

/// Whether `len` bytes of port data are whole elements of `size` bytes.
fn pio_elements(size: usize, len: usize) -> Result<(), PioError> {
    if !matches!(size, 1 | 2 | 4) {
        return Err(PioError::Size(size));
    }
    if !len.is_multiple_of(size) {
        return Err(PioError::Length { size, len });
    }
    Ok(())
}

/// Reads a port access (`in`, or `rep ins` of many elements) element by
/// element with the guest's element size: `read` fills each `size`-byte
/// element of `data` in turn. On an error nothing was read.
pub fn pio_in_elements(
    size: usize,
    data: &mut [u8],
    mut read: impl FnMut(&mut [u8]),
) -> Result<(), PioError> {
    pio_elements(size, data.len())?;
    data.chunks_exact_mut(size).for_each(&mut read);
    Ok(())
}

/// Writes a port access (`out`, or `rep outs` of many elements) element by
/// element with the guest's element size: `write` gets each `size`-byte
/// element of `data` in turn. On an error nothing was written.
pub fn pio_out_elements(
    size: usize,
    data: &[u8],
    mut write: impl FnMut(&[u8]),
) -> Result<(), PioError> {
    pio_elements(size, data.len())?;
    data.chunks_exact(size).for_each(&mut write);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The writes a port sees for an `out`/`outs` of `size`-byte elements.
    fn writes(size: usize, data: &[u8]) -> Result<Vec<Vec<u8>>, PioError> {
        let mut seen = Vec::new();
        pio_out_elements(size, data, |e| seen.push(e.to_vec()))?;
        Ok(seen)
    }

    #[test]
    fn outsw_count_3_is_three_word_writes() {
        let seen = writes(2, &[1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(seen, [vec![1, 2], vec![3, 4], vec![5, 6]]);
    }

    #[test]
    fn outsw_count_2_is_two_word_writes_not_one_dword() {
        let seen = writes(2, &[1, 2, 3, 4]).unwrap();
        assert_eq!(seen, [vec![1, 2], vec![3, 4]]);
    }

    #[test]
    fn outsb_is_byte_writes() {
        let seen = writes(1, &[7, 8, 9, 10, 11]).unwrap();
        assert_eq!(seen, [[7], [8], [9], [10], [11]].map(Vec::from));
    }

    #[test]
    fn insl_count_2_reads_two_dwords_in_place() {
        let mut data = [0u8; 8];
        let mut reads = Vec::new();
        let mut next = 0x10u8;
        pio_in_elements(4, &mut data, |e| {
            reads.push(e.len());
            for b in e.iter_mut() {
                *b = next;
                next += 1;
            }
        })
        .unwrap();
        assert_eq!(reads, [4, 4]);
        assert_eq!(data, [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
    }

    #[test]
    fn single_in_and_out_keep_their_width() {
        for size in [1, 2, 4] {
            let data: Vec<u8> = (1..=size as u8).collect();
            assert_eq!(writes(size, &data).unwrap(), std::slice::from_ref(&data));
            let mut buf = vec![0u8; size];
            let mut reads = 0;
            pio_in_elements(size, &mut buf, |e| {
                reads += 1;
                e.copy_from_slice(&data);
            })
            .unwrap();
            assert_eq!((reads, buf), (1, data));
        }
    }

    #[test]
    fn bad_sizes_are_errors_and_touch_nothing() {
        for size in [0, 3, 8, 255] {
            assert_eq!(writes(size, &[0; 8]), Err(PioError::Size(size)));
        }
        assert_eq!(
            writes(4, &[0; 6]),
            Err(PioError::Length { size: 4, len: 6 })
        );
        let mut data = [0xaau8; 3];
        let mut calls = 0;
        assert_eq!(
            pio_in_elements(2, &mut data, |_| calls += 1),
            Err(PioError::Length { size: 2, len: 3 })
        );
        assert_eq!((calls, data), (0, [0xaa; 3]));
        assert_eq!(writes(2, &[]), Ok(Vec::new()));
    }
}
