//! Per-thread seccomp filters (allow-lists) for the threads that touch
//! guest-controlled data.
//!
//! | thread | runs | may call |
//! |---|---|---|
//! | `vcpuN` | `KVM_RUN`; port/MMIO exits: PCI config space, virtio and channel registers, MSI-X table, UART, RTC | the common set, `ioctl` KVM_RUN / KVM_GET_REGS / KVM_GET_SREGS / KVM_IRQFD / KVM_SET_GSI_ROUTING / KVM_IOEVENTFD / KVM_SET_USER_MEMORY_REGION / TUNSETOFFLOAD / FIONBIO |
//! | `devices` | the event loop: virtqueues (disk, TAP, entropy), the console socket, the channel's bell | the common set, `epoll_*`, `readv`/`preadv`/`pwritev`/`writev`, `fdatasync`, `getrandom`, `accept4`, `ioctl` KVM_SET_GSI_ROUTING / FIONBIO |
//!
//! The common set is what any thread of this process needs to live and end:
//! `read`/`write`/`sendto`/`recvfrom` (eventfds, the console log and
//! socket), `timerfd_settime` (virtio-net's receive moderation), `futex`, memory (`mprotect` only without `PROT_EXEC`: glibc grows
//! a thread's malloc arena with it), `fcntl(F_GETFD)`,
//! (`mmap`, `munmap`, `mremap`, `madvise`, `brk`), signals (`rt_sigreturn`
//! for the vCPU kick, `sigaltstack`, `rt_sigprocmask`), clocks and sleeps,
//! `close`, `exit`.
//!
//! The main thread is not filtered: it builds the VM (again, after a guest
//! reset: `/dev/kvm`, memfds, files) and never reads guest-controlled data
//! beyond an exit reason. A violation kills the whole process (a compromised
//! device model must not get a second try); `--seccomp log` lets the kernel
//! log violations instead, to find a missing syscall.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// How filters are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kill the process on a syscall outside the list.
    Enforce,
    /// Let it through and have the kernel log it (audit type 1326).
    Log,
    /// No filters.
    Off,
}

/// Why the filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter could not be compiled.
    #[error("Building a seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// A filter could not be installed.
    #[error("Installing a seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// ioctl requests, as the kernel's `_IO*` macros encode them.
mod ioctls {
    /// `_IO(KVMIO, 0x80)`.
    pub const KVM_RUN: u64 = 0xae80;
    /// `_IOR(KVMIO, 0x81, struct kvm_regs)`: read after a failure, for the report.
    pub const KVM_GET_REGS: u64 = 0x8090_ae81;
    /// `_IOR(KVMIO, 0x83, struct kvm_sregs)`: read after a triple fault, for the log.
    pub const KVM_GET_SREGS: u64 = 0x8138_ae83;
    /// `_IOW(KVMIO, 0x76, struct kvm_irqfd)`: the channel device handing its
    /// bell to KVM as an MSI-X irqfd, or taking it back, as the guest
    /// enables, masks or unmasks the vector.
    pub const KVM_IRQFD: u64 = 0x4020_ae76;
    /// `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`: MSI-X table writes, and
    /// deliveries that refresh a stale route.
    pub const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
    /// `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`: a BAR the guest moved.
    pub const KVM_IOEVENTFD: u64 = 0x4040_ae79;
    /// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`: the guest
    /// moved the channel device's region BAR (its memory slot follows).
    pub const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
    /// `_IOW('T', 208, unsigned int)`: a virtio-net device being activated.
    pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
    /// Non-blocking mode of an accepted console socket.
    pub const FIONBIO: u64 = 0x5421;
}

fn common() -> Vec<i64> {
    // mprotect and fcntl are added with argument conditions in `compile`.
    vec![
        libc::SYS_read,
        libc::SYS_write,
        // Console sockets: std sends with MSG_NOSIGNAL and receives with recv.
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_exit,
        // virtio-net's receive moderation timer: armed by the device thread,
        // disarmed by a device reset, which a vCPU's register write makes.
        libc::SYS_timerfd_settime,
    ]
}

fn ioctl_rule(requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    requests
        .iter()
        .map(|&r| {
            let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r)
                .map_err(SeccompError::Build)?;
            SeccompRule::new(vec![c]).map_err(SeccompError::Build)
        })
        .collect()
}

/// One rule: argument `arg` compared with `op` to `value`.
fn arg_rule(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, SeccompError> {
    let c = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(SeccompError::Build)?;
    SeccompRule::new(vec![c]).map_err(SeccompError::Build)
}

fn compile(
    syscalls: Vec<i64>,
    ioctls: &[u64],
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls.into_iter().map(|nr| (nr, Vec::new())).collect();
    rules.insert(libc::SYS_ioctl, ioctl_rule(ioctls)?);
    // glibc grows a thread's malloc arena with mprotect(PROT_READ|PROT_WRITE);
    // never allowed to make anything executable.
    let prot_exec = libc::PROT_EXEC as u64;
    rules.insert(
        libc::SYS_mprotect,
        vec![arg_rule(2, SeccompCmpOp::MaskedEq(prot_exec), 0)?],
    );
    // std asks F_GETFD before closing an fd in debug builds.
    rules.insert(
        libc::SYS_fcntl,
        vec![arg_rule(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)?],
    );
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    BpfProgram::try_from(filter).map_err(SeccompError::Build)
}

/// The vCPU threads' filter.
pub fn vcpu_filter(mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    use ioctls::*;
    compile(
        common(),
        &[
            KVM_RUN,
            KVM_GET_REGS,
            KVM_GET_SREGS,
            KVM_IRQFD,
            KVM_SET_GSI_ROUTING,
            KVM_IOEVENTFD,
            KVM_SET_USER_MEMORY_REGION,
            TUNSETOFFLOAD,
            FIONBIO,
        ],
        mismatch,
    )
}

/// The device thread's filter.
pub fn device_filter(mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut syscalls = common();
    syscalls.extend([
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fdatasync,
        libc::SYS_getrandom,
        libc::SYS_accept4,
    ]);
    compile(
        syscalls,
        &[ioctls::KVM_SET_GSI_ROUTING, ioctls::FIONBIO],
        mismatch,
    )
}

/// The filters a VM's threads install, per [`Mode`].
#[derive(Debug)]
pub struct Filters {
    vcpu: Option<BpfProgram>,
    device: Option<BpfProgram>,
}

impl Filters {
    /// Compiles both filters for `mode`.
    pub fn new(mode: Mode) -> Result<Self, SeccompError> {
        let mismatch = match mode {
            Mode::Off => {
                return Ok(Self {
                    vcpu: None,
                    device: None,
                });
            }
            Mode::Log => SeccompAction::Log,
            Mode::Enforce => SeccompAction::KillProcess,
        };
        Ok(Self {
            vcpu: Some(vcpu_filter(mismatch.clone())?),
            device: Some(device_filter(mismatch)?),
        })
    }
}

/// Which seccomp filter (if any) each thread installs before it starts.
pub trait ThreadSetup: Send + Sync + 'static {
    /// Called first thing on a vCPU thread.
    fn vcpu(&self) -> Result<(), SeccompError> {
        Ok(())
    }
    /// Called first thing on the device thread.
    fn device(&self) -> Result<(), SeccompError> {
        Ok(())
    }
}

/// No confinement (tests).
#[derive(Debug)]
pub struct NoSetup;
impl ThreadSetup for NoSetup {}

fn install(program: &Option<BpfProgram>) -> Result<(), SeccompError> {
    match program {
        Some(p) => seccompiler::apply_filter(p).map_err(SeccompError::Install),
        None => Ok(()),
    }
}

impl ThreadSetup for Filters {
    fn vcpu(&self) -> Result<(), SeccompError> {
        install(&self.vcpu)
    }
    fn device(&self) -> Result<(), SeccompError> {
        install(&self.device)
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    /// Runs `f` on a fresh thread after installing `program` there (built
    /// with EPERM instead of a kill, so the test process survives).
    fn on_filtered_thread<T: Send + 'static>(
        program: BpfProgram,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            seccompiler::apply_filter(&program).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn errno(r: libc::c_long) -> i32 {
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn vcpu_threads_cannot_open_files_or_sockets() {
        let p = vcpu_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (open, socket, execve, write, bad_ioctl) = on_filtered_thread(p, || {
            // SAFETY: raw syscalls with valid or harmless arguments; the
            // filter answers before the kernel looks at them.
            unsafe {
                let path = c"/etc/hostname";
                let open = errno(libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::O_RDONLY,
                ));
                let socket = errno(libc::syscall(
                    libc::SYS_socket,
                    libc::AF_INET,
                    libc::SOCK_STREAM,
                    0,
                ));
                let execve = errno(libc::syscall(libc::SYS_execve, path.as_ptr(), 0, 0));
                let buf = [0u8; 1];
                let write = errno(libc::syscall(libc::SYS_write, -1, buf.as_ptr(), 0));
                let bad_ioctl = errno(libc::syscall(libc::SYS_ioctl, -1, 0x5401u64, 0));
                (open, socket, execve, write, bad_ioctl)
            }
        });
        assert_eq!(
            (open, socket, execve, bad_ioctl),
            (libc::EPERM, libc::EPERM, libc::EPERM, libc::EPERM)
        );
        // Allowed: the kernel itself answers (bad fd).
        assert_eq!(write, libc::EBADF);
    }

    #[test]
    fn device_thread_may_do_io_but_not_spawn() {
        let p = device_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (fdatasync, clone, kvm_run) = on_filtered_thread(p, || {
            // SAFETY: as above.
            unsafe {
                let fdatasync = errno(libc::syscall(libc::SYS_fdatasync, -1));
                let clone = errno(libc::syscall(libc::SYS_fork));
                let kvm_run = errno(libc::syscall(libc::SYS_ioctl, -1, ioctls::KVM_RUN, 0));
                (fdatasync, clone, kvm_run)
            }
        });
        assert_eq!(fdatasync, libc::EBADF, "allowed");
        assert_eq!(
            (clone, kvm_run),
            (libc::EPERM, libc::EPERM),
            "the device thread never runs a vCPU"
        );
    }

    #[test]
    fn malloc_arenas_may_grow_but_nothing_becomes_executable() {
        let p = device_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (rw, rx, getfd, setfl) = on_filtered_thread(p, || {
            // SAFETY: mprotect on a mapping this closure owns; fcntl on an
            // invalid fd (the filter answers first, or the kernel says EBADF).
            unsafe {
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                let rw = errno(libc::syscall(
                    libc::SYS_mprotect,
                    page,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                ));
                let rx = errno(libc::syscall(
                    libc::SYS_mprotect,
                    page,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                ));
                libc::munmap(page, 4096);
                let getfd = errno(libc::syscall(libc::SYS_fcntl, -1, libc::F_GETFD));
                let setfl = errno(libc::syscall(libc::SYS_fcntl, -1, libc::F_SETFL, 0));
                (rw, rx, getfd, setfl)
            }
        });
        assert_eq!((rw, getfd), (0, libc::EBADF));
        assert_eq!((rx, setfl), (libc::EPERM, libc::EPERM));
    }

    #[test]
    fn vcpu_threads_may_move_the_channel_bell_and_log_a_triple_fault() {
        let p = vcpu_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let got = on_filtered_thread(p, || {
            // SAFETY: ioctls on an invalid fd: the filter answers first, or
            // the kernel says EBADF without reading the argument.
            unsafe {
                [ioctls::KVM_IRQFD, ioctls::KVM_GET_SREGS]
                    .map(|nr| errno(libc::syscall(libc::SYS_ioctl, -1, nr, 0)))
            }
        });
        assert_eq!(got, [libc::EBADF, libc::EBADF], "allowed");
    }

    /// The numbers above are the kernel's encoding of each ioctl: direction,
    /// argument size, KVM's type, number.
    #[test]
    fn ioctl_numbers_are_the_kernels() {
        use std::mem::size_of;
        let io = |dir: u64, nr: u64, size: usize| dir << 30 | (size as u64) << 16 | 0xae00 | nr;
        let (w, r) = (1, 2);
        use kvm_bindings as kb;
        // Ours, then the kernel's.
        let cases = [
            (ioctls::KVM_RUN, io(0, 0x80, 0)),
            (ioctls::KVM_GET_REGS, io(r, 0x81, size_of::<kb::kvm_regs>())),
            (
                ioctls::KVM_GET_SREGS,
                io(r, 0x83, size_of::<kb::kvm_sregs>()),
            ),
            (ioctls::KVM_IRQFD, io(w, 0x76, size_of::<kb::kvm_irqfd>())),
            (
                ioctls::KVM_IOEVENTFD,
                io(w, 0x79, size_of::<kb::kvm_ioeventfd>()),
            ),
            (
                ioctls::KVM_SET_GSI_ROUTING,
                io(w, 0x6a, size_of::<kb::kvm_irq_routing>()),
            ),
            (
                ioctls::KVM_SET_USER_MEMORY_REGION,
                io(w, 0x46, size_of::<kb::kvm_userspace_memory_region>()),
            ),
        ];
        for (ours, kernels) in cases {
            assert_eq!(ours, kernels, "{ours:#x} should be {kernels:#x}");
        }
    }

    #[test]
    fn modes() {
        let off = Filters::new(Mode::Off).unwrap();
        assert!(off.vcpu.is_none());
        let on = Filters::new(Mode::Enforce).unwrap();
        assert!(on.vcpu.is_some() && on.device.is_some());
    }
}
