//! Self-confinement: the "sandbox" isolation backend of `p2pd`.
//!
//! `p2pd` parses strangers' bytes all day (Noise handshakes, QUIC, Kademlia and
//! gossipsub messages, manifests, content). If one of those parsers is ever
//! exploited, this module decides what the attacker holds: not the user's files,
//! and not the kernel's most dangerous interfaces.
//!
//! ```text
//!   p2pvmm (supervisor) ── starts p2pd under `unshare`: mount, PID, IPC, UTS
//!        │                 namespaces come from here, not from this module
//!        ▼
//!   p2pd main():  read config ─▶ confine(&Policy::service(..)) ─▶ start tokio runtime
//!                                   │
//!                                   ├─ 1. PR_SET_NO_NEW_PRIVS: execve can never gain
//!                                   │     privileges (setuid, file caps) again
//!                                   ├─ 2. Landlock: the filesystem shrinks to the policy
//!                                   │     (system dirs read-only, data dir read-write)
//!                                   └─ 3. seccomp: a deny-list of syscalls returns EPERM
//! ```
//!
//! # Call it early, from the only thread
//!
//! [`confine`] must run on the main thread before any other thread exists, i.e.
//! before the tokio runtime starts. Landlock (`landlock_restrict_self`) and
//! seccomp (`seccomp(SECCOMP_SET_MODE_FILTER)` without `TSYNC`) restrict the
//! *calling thread* and the threads and processes it creates afterwards; threads
//! that already exist keep running unconfined, and one unconfined worker thread is
//! all an attacker needs. [`confine`] therefore counts the process's threads first
//! and refuses to run if there is more than one.
//!
//! # Why the seccomp filter is a deny-list
//!
//! The default action is *allow*; only the syscalls in [`DENIED_SYSCALLS`] fail
//! with `EPERM`. An allow-list would be stronger, but tokio, libp2p (TCP, QUIC
//! over quinn, mDNS), redb and glibc use a wide set of syscalls that changes with
//! their versions and with the kernel (`epoll` vs `io_uring`, `clone` vs `clone3`,
//! `statx`, `getrandom`, ...); an allow-list that is one syscall short kills the
//! node in the field. The deny-list instead removes what a P2P daemon never needs
//! and what widens the kernel's attack surface or helps an attacker escape:
//! debugging other processes, mounts and namespaces, kernel modules, `bpf`,
//! `perf_event_open`, `userfaultfd` (a classic exploit primitive), keyrings,
//! file handles, clock setting, device nodes. An allow-list derived from traces of
//! the end-to-end tests is future hardening.
//!
//! When the kernel lacks Landlock or seccomp, [`confine`] still succeeds but logs
//! a `warn!` and says so in its [`Report`]: a node that runs unconfined must be
//! visible, never silent.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, PathBeneath, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus,
};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The newest Landlock ABI the `landlock` crate knows. Rights the running kernel
/// lacks are dropped (best effort) and reported as
/// [`LandlockStatus::PartiallyEnforced`]; raise this when the crate learns newer
/// ABIs so new kernels confine more.
const LANDLOCK_ABI: ABI = ABI::V10;

/// Directories holding the dynamic loader, shared libraries and programs; read and
/// executed, never written.
const SYSTEM_EXEC_DIRS: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/sbin"];

/// Read-only system paths: configuration (`/etc`: DNS resolver, hosts, TLS roots),
/// `/proc` and `/sys` (CPU count, memory limits, tokio and glibc read them), and the
/// kernel's random devices.
const SYSTEM_READ_ONLY: &[&str] = &["/etc", "/proc", "/sys", "/dev/urandom", "/dev/random"];

/// Files under `/etc` that distributions often make symlinks out of `/etc`
/// (systemd-resolved's `stub-resolv.conf` lives in `/run`). Landlock checks the
/// resolved path, so the target must be in the policy too.
const ETC_SYMLINKS: &[&str] = &["/etc/resolv.conf", "/etc/hosts", "/etc/localtime"];

/// What the confined process may still reach in the filesystem. A path grants
/// its rights to everything beneath it. Paths must exist when [`confine`] runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Read, write, create, delete and rename beneath these (the data dir,
    /// `/dev/null`). Execution is not granted: a writable directory that is also
    /// executable would let an attacker drop and run a binary.
    pub read_write: Vec<PathBuf>,
    /// Read files and list directories beneath these, and (on kernels with
    /// Landlock ABI 9 or newer) connect to Unix sockets there, which is how p2pd
    /// reaches clamd.
    pub read_only: Vec<PathBuf>,
    /// Read and execute beneath these: system libraries and p2pd's own binary.
    pub read_exec: Vec<PathBuf>,
}

impl Policy {
    /// The policy `p2pd` runs under: the system directories needed to run,
    /// `/dev/null` and `data_dir` read-write, plus `extra_read_only` (for example
    /// the config file and the directory of clamd's socket).
    ///
    /// Nothing under the user's home is included unless passed in: `data_dir` and
    /// the extras are the only user paths. System paths and extras that do not
    /// exist are skipped (a missing extra is logged); `data_dir` is always
    /// included, so create it first, or [`confine`] fails on it.
    pub fn service(data_dir: &Path, extra_read_only: &[PathBuf]) -> Policy {
        let existing = |paths: &[&str]| -> Vec<PathBuf> {
            paths
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .collect()
        };

        let mut read_exec = existing(SYSTEM_EXEC_DIRS);
        // The binary itself may live outside /usr (a cargo target dir, /opt);
        // the loader maps it with PROT_EXEC, which Landlock checks as Execute.
        match std::env::current_exe() {
            Ok(exe) => read_exec.push(exe),
            Err(error) => tracing::warn!(%error, "Cannot find the current executable"),
        }

        let mut read_only = existing(SYSTEM_READ_ONLY);
        for link in ETC_SYMLINKS {
            if let Ok(target) = std::fs::canonicalize(link)
                && !target.starts_with("/etc")
                && !target.starts_with("/usr")
            {
                read_only.push(target);
            }
        }
        for extra in extra_read_only {
            if extra.exists() {
                read_only.push(extra.clone());
            } else {
                tracing::warn!(path = %extra.display(), "Skipping a missing path in the sandbox policy");
            }
        }

        let mut read_write = existing(&["/dev/null"]);
        read_write.push(data_dir.to_path_buf());

        Policy {
            read_write,
            read_only,
            read_exec,
        }
    }
}

/// How much of the confinement the kernel enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The Landlock filesystem restriction.
    pub landlock: LandlockStatus,
    /// Whether the seccomp deny-list is installed; `false` only when the kernel
    /// has no seccomp filtering (then [`confine`] logged a warning).
    pub seccomp: bool,
    /// Whether `no_new_privs` is set, read back from the kernel.
    pub no_new_privs: bool,
}

/// The Landlock part of a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LandlockStatus {
    /// Every requested access right is enforced.
    FullyEnforced,
    /// The ruleset is enforced, but the kernel's Landlock ABI lacks some of the
    /// requested rights (for example Unix-socket connects before ABI 9).
    PartiallyEnforced,
    /// Nothing is enforced; the string says why.
    NotEnforced(String),
}

/// Why [`confine`] failed. The process may be partly confined afterwards (the
/// steps cannot be undone), so the caller should exit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfineError {
    /// `/proc/self/task` could not be listed to count threads.
    #[error("Cannot count the process's threads")]
    CountThreads(#[source] io::Error),
    /// Other threads exist; they would stay unconfined.
    #[error("Confinement must run before any other thread starts, but {count} threads exist")]
    OtherThreads {
        /// Threads in the process, the caller included.
        count: usize,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("Cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    /// A policy path could not be opened.
    #[error("Cannot open sandbox policy path {}", path.display())]
    PolicyPath {
        /// The path from the [`Policy`].
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },
    /// Building or enforcing the Landlock ruleset failed.
    #[error("Cannot apply the Landlock ruleset")]
    Landlock(#[source] RulesetError),
    /// The seccomp filter does not compile for this architecture.
    #[error("Cannot build the seccomp filter")]
    SeccompBuild(#[source] seccompiler::BackendError),
    /// The kernel rejected the seccomp filter.
    #[error("Cannot install the seccomp filter")]
    SeccompInstall(#[source] seccompiler::Error),
}

/// Confines the calling process: no new privileges, Landlock, seccomp (see the
/// module docs). Irreversible.
///
/// Call it from the main thread before any other thread exists (before the tokio
/// runtime is built); it returns [`ConfineError::OtherThreads`] otherwise, before
/// changing anything.
pub fn confine(policy: &Policy) -> Result<Report, ConfineError> {
    let count = std::fs::read_dir("/proc/self/task")
        .map_err(ConfineError::CountThreads)?
        .count();
    if count != 1 {
        return Err(ConfineError::OtherThreads { count });
    }
    confine_current_thread(policy)
}

/// The steps of [`confine`] without the thread check; the tests call it because
/// libtest runs each test on a thread of its own.
fn confine_current_thread(policy: &Policy) -> Result<Report, ConfineError> {
    // First, so that neither a later failure nor anything below can leave the
    // process able to regain privileges through a setuid binary. Unprivileged
    // seccomp and Landlock require it too.
    nix::sys::prctl::set_no_new_privs().map_err(ConfineError::NoNewPrivs)?;
    let landlock = restrict_filesystem(policy)?;
    let seccomp = install_deny_list()?;
    let no_new_privs = nix::sys::prctl::get_no_new_privs().map_err(ConfineError::NoNewPrivs)?;
    let report = Report {
        landlock,
        seccomp,
        no_new_privs,
    };
    tracing::info!(?report, "Process confined");
    Ok(report)
}

/// Applies the Landlock ruleset built from `policy`.
fn restrict_filesystem(policy: &Policy) -> Result<LandlockStatus, ConfineError> {
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let grants = [
        (&policy.read_only, read | AccessFs::ResolveUnix),
        (&policy.read_exec, read | AccessFs::Execute),
        (&policy.read_write, all & !BitFlags::from(AccessFs::Execute)),
    ];

    // Handling every right means every right not granted below is denied.
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .and_then(Ruleset::create)
        .map_err(ConfineError::Landlock)?;
    for (paths, access) in grants {
        for path in paths {
            let rule = path_rule(path, access)?;
            ruleset = ruleset.add_rule(rule).map_err(ConfineError::Landlock)?;
        }
    }
    let status = ruleset.restrict_self().map_err(ConfineError::Landlock)?;
    Ok(landlock_status(&status))
}

/// A rule granting `access` beneath `path`. Directory-only rights (listing,
/// creating entries) are masked off for a file: the kernel rejects them there.
fn path_rule(path: &Path, access: BitFlags<AccessFs>) -> Result<PathBeneath<File>, ConfineError> {
    let policy_path = |source| ConfineError::PolicyPath {
        path: path.to_path_buf(),
        source,
    };
    // O_PATH: a handle to name the hierarchy, which needs no read permission.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(policy_path)?;
    let is_dir = file.metadata().map_err(policy_path)?.is_dir();
    let access = if is_dir {
        access
    } else {
        access & AccessFs::from_file(LANDLOCK_ABI)
    };
    Ok(PathBeneath::new(file, access))
}

/// Translates the crate's status, warning when the filesystem is not confined.
fn landlock_status(status: &RestrictionStatus) -> LandlockStatus {
    match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::FullyEnforced,
        RulesetStatus::PartiallyEnforced => {
            // Expected on every kernel older than LANDLOCK_ABI; the missing
            // rights are the newest, narrowest ones.
            tracing::info!(kernel = ?status.landlock, "Landlock partially enforced");
            LandlockStatus::PartiallyEnforced
        }
        RulesetStatus::NotEnforced => {
            let reason = match status.landlock {
                landlock::LandlockStatus::NotEnabled => {
                    "the kernel has Landlock but it is not enabled (add it to the lsm= boot parameter)"
                }
                landlock::LandlockStatus::NotImplemented => {
                    "the kernel is built without Landlock (CONFIG_SECURITY_LANDLOCK)"
                }
                landlock::LandlockStatus::Available { .. } => {
                    "the kernel's Landlock supports none of the requested rights"
                }
            };
            tracing::warn!(
                reason,
                "LANDLOCK IS NOT ENFORCED: p2pd can read and write every file its user can"
            );
            LandlockStatus::NotEnforced(reason.to_owned())
        }
    }
}

/// Syscalls that fail with `EPERM` after [`confine`]: none is needed by a P2P
/// daemon, and each either widens the kernel's attack surface or helps an
/// attacker leave the sandbox.
pub const DENIED_SYSCALLS: &[(&str, libc::c_long)] = &[
    // Reading and writing other processes' memory.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    // Mounts and namespaces: the supervisor sets these up, p2pd never changes them.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("fsconfig", libc::SYS_fsconfig),
    ("fspick", libc::SYS_fspick),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    // Replacing or extending the kernel.
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    // Large kernel interfaces that recur in exploit chains.
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    // Opening files by handle bypasses path-based checks.
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    // Machine administration.
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("syslog", libc::SYS_syslog),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    ("personality", libc::SYS_personality),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("vhangup", libc::SYS_vhangup),
    // Clocks: peers' timestamps and timeouts depend on them.
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("adjtimex", libc::SYS_adjtimex),
    // Device nodes.
    #[cfg(target_arch = "x86_64")]
    ("mknod", libc::SYS_mknod),
    ("mknodat", libc::SYS_mknodat),
];

/// The x32 ABI shares x86_64's audit architecture, so seccompiler's arch check
/// lets its syscalls through; they carry this bit in their number. A deny-list
/// must name them too, or `syscall(nr | X32_SYSCALL_BIT)` walks around it on
/// kernels built with `CONFIG_X86_X32_ABI`.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;

/// x32 has its own numbers for a few denied syscalls (the 512..=547 compat block
/// of `arch/x86/entry/syscalls/syscall_64.tbl`): ptrace, kexec_load,
/// process_vm_readv, process_vm_writev.
#[cfg(target_arch = "x86_64")]
const X32_COMPAT_DENIED: &[libc::c_long] = &[521, 528, 539, 540];

/// Every syscall number the filter denies on this architecture.
fn denied_syscall_numbers() -> Vec<libc::c_long> {
    let mut numbers: Vec<libc::c_long> = DENIED_SYSCALLS.iter().map(|&(_, nr)| nr).collect();
    #[cfg(target_arch = "x86_64")]
    {
        let x32 = numbers
            .iter()
            .chain(X32_COMPAT_DENIED)
            .map(|nr| nr | X32_SYSCALL_BIT)
            .collect::<Vec<_>>();
        numbers.extend(x32);
    }
    numbers
}

/// Compiles the deny-list for the architecture this binary runs on.
fn deny_list_program() -> Result<BpfProgram, ConfineError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(ConfineError::SeccompBuild)?;
    // An empty rule list matches the syscall whatever its arguments.
    let rules: BTreeMap<_, _> = denied_syscall_numbers()
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(ConfineError::SeccompBuild)?;
    BpfProgram::try_from(filter).map_err(ConfineError::SeccompBuild)
}

/// Installs the deny-list on the calling thread; `Ok(false)` when the kernel
/// has no seccomp filtering.
fn install_deny_list() -> Result<bool, ConfineError> {
    let program = deny_list_program()?;
    match seccompiler::apply_filter(&program) {
        Ok(()) => Ok(true),
        // ENOSYS: no seccomp at all; EINVAL: no SECCOMP_SET_MODE_FILTER. The
        // filter itself is valid (the tests install it), so these mean the kernel.
        Err(seccompiler::Error::Seccomp(error))
            if matches!(error.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) =>
        {
            tracing::warn!(
                %error,
                "SECCOMP IS NOT ENFORCED: the kernel has no seccomp filtering"
            );
            Ok(false)
        }
        Err(error) => Err(ConfineError::SeccompInstall(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSliceMut;
    use std::process::Command;
    use std::sync::{Arc, Barrier};

    use landlock::{CompatLevel, Compatible};
    use nix::errno::Errno;
    use nix::sched::CloneFlags;
    use nix::sys::uio::RemoteIoVec;
    use nix::unistd::Pid;

    /// Set in the re-executed test binary: confine and probe.
    const CHILD_ENV: &str = "P2PVM_CONFINE_CHILD";
    const DATA_DIR_ENV: &str = "P2PVM_CONFINE_DATA_DIR";
    const OUTSIDE_DIR_ENV: &str = "P2PVM_CONFINE_OUTSIDE_DIR";
    /// "1" when the parent found Landlock in the kernel, so the child must
    /// enforce it rather than accept `NotEnforced`.
    const EXPECT_LANDLOCK_ENV: &str = "P2PVM_CONFINE_EXPECT_LANDLOCK";
    /// The child's last line; without it a filter matching no test would "pass".
    const CHILD_OK: &str = "CONFINE-CHILD-OK";
    const CONFINED_TEST: &str = "confine::tests::confined_process_loses_files_and_syscalls";

    /// Confinement is irreversible, so the real test runs in a re-executed copy
    /// of this test binary; this process only prepares directories and judges.
    #[test]
    fn confined_process_loses_files_and_syscalls() {
        if std::env::var_os(CHILD_ENV).is_some() {
            confined_child();
            return;
        }
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), b"not for p2pd").unwrap();

        // Baselines: everything the child must be denied works here, so a pass
        // in the child is the sandbox's doing.
        assert_eq!(
            std::fs::read(outside.path().join("secret.txt")).unwrap(),
            b"not for p2pd"
        );
        nix::sys::personality::get().expect("personality works unconfined");
        read_own_memory().expect("process_vm_readv works unconfined");

        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CONFINED_TEST, "--nocapture"])
            .env(CHILD_ENV, "1")
            .env(DATA_DIR_ENV, data.path())
            .env(OUTSIDE_DIR_ENV, outside.path())
            .env(
                EXPECT_LANDLOCK_ENV,
                if landlock_in_kernel() { "1" } else { "0" },
            )
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("--- confined child stdout\n{stdout}--- confined child stderr\n{stderr}");
        assert!(
            output.status.success() && stdout.contains(CHILD_OK),
            "confined child failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            output.status
        );
    }

    /// The child side; panics (failing the child's test) on any escape.
    fn confined_child() {
        let data = PathBuf::from(std::env::var_os(DATA_DIR_ENV).unwrap());
        let outside = PathBuf::from(std::env::var_os(OUTSIDE_DIR_ENV).unwrap());
        let expect_landlock = std::env::var(EXPECT_LANDLOCK_ENV).unwrap() == "1";

        let policy = Policy::service(&data, &[]);
        let all_paths = || {
            policy
                .read_write
                .iter()
                .chain(&policy.read_only)
                .chain(&policy.read_exec)
        };
        assert!(
            !all_paths().any(|p| outside.starts_with(p)),
            "{} is inside the policy {policy:?}; the test would prove nothing",
            outside.display()
        );

        let report = confine_current_thread(&policy).expect("confine");
        println!("report: {report:?}");

        if expect_landlock {
            assert!(
                !matches!(report.landlock, LandlockStatus::NotEnforced(_)),
                "the kernel has Landlock but the ruleset is not enforced"
            );
            assert_denied(std::fs::read(outside.join("secret.txt")), "read outside");
            assert_denied(
                std::fs::write(outside.join("new.txt"), b"x"),
                "write outside",
            );
            assert_denied(std::fs::read_dir(&outside), "list outside");
            assert_denied(std::fs::create_dir(outside.join("d")), "mkdir outside");
        } else {
            println!("Landlock is not in this kernel: skipping the filesystem checks");
        }
        // Everything the node does in its data dir still works.
        std::fs::write(data.join("inside.txt"), b"ok").expect("write in data dir");
        assert_eq!(std::fs::read(data.join("inside.txt")).unwrap(), b"ok");
        std::fs::create_dir(data.join("sub")).expect("mkdir in data dir");
        std::fs::rename(data.join("inside.txt"), data.join("sub/moved.txt"))
            .expect("rename in data dir");
        std::fs::remove_file(data.join("sub/moved.txt")).expect("unlink in data dir");
        std::fs::write("/dev/null", b"x").expect("write /dev/null");

        assert!(report.seccomp, "seccomp not installed");
        assert!(report.no_new_privs, "no_new_privs not reported");
        assert_eq!(
            nix::sys::personality::get(),
            Err(Errno::EPERM),
            "personality"
        );
        assert_eq!(read_own_memory(), Err(Errno::EPERM), "process_vm_readv");
        assert_eq!(
            nix::sched::unshare(CloneFlags::CLONE_NEWUTS),
            Err(Errno::EPERM),
            "unshare"
        );

        // The kernel's own view. /proc/self is the thread-group leader, which
        // libtest leaves unconfined; this thread is the confined one.
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
        assert!(status.contains("\nNoNewPrivs:\t1\n"), "{status}");
        println!("{CHILD_OK}");
    }

    fn assert_denied<T: std::fmt::Debug>(result: io::Result<T>, what: &str) {
        match result {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
            other => panic!("{what}: expected PermissionDenied, got {other:?}"),
        }
    }

    /// `process_vm_readv` on this process: allowed to anyone unconfined.
    fn read_own_memory() -> nix::Result<usize> {
        let source = [7u8; 8];
        let mut target = [0u8; 8];
        let remote = [RemoteIoVec {
            base: source.as_ptr() as usize,
            len: source.len(),
        }];
        nix::sys::uio::process_vm_readv(Pid::this(), &mut [IoSliceMut::new(&mut target)], &remote)
    }

    /// Whether the kernel supports Landlock, probed by creating (not enforcing)
    /// a ruleset that must not be downgraded.
    fn landlock_in_kernel() -> bool {
        Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::Execute)
            .and_then(Ruleset::create)
            .is_ok()
    }

    #[test]
    fn confine_refuses_while_other_threads_run() {
        let barrier = Arc::new(Barrier::new(2));
        let other = {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
            })
        };
        // An empty policy: were the check missing, this test process would lose
        // its whole filesystem and the suite would fail loudly.
        let result = confine(&Policy::default());
        barrier.wait();
        other.join().unwrap();
        match result {
            Err(ConfineError::OtherThreads { count }) => assert!(count >= 2),
            other => panic!("expected OtherThreads, got {other:?}"),
        }
    }

    #[test]
    fn service_policy_has_system_dirs_data_dir_and_extras_only() {
        let data = tempfile::tempdir().unwrap();
        let config = data.path().join("p2pd.toml");
        std::fs::write(&config, "").unwrap();
        let missing = data.path().join("missing");
        let policy = Policy::service(data.path(), &[config.clone(), missing.clone()]);

        assert!(policy.read_write.contains(&data.path().to_path_buf()));
        assert!(policy.read_write.contains(&PathBuf::from("/dev/null")));
        assert!(policy.read_only.contains(&config));
        assert!(!policy.read_only.contains(&missing));
        assert!(policy.read_only.contains(&PathBuf::from("/etc")));
        assert!(policy.read_exec.contains(&PathBuf::from("/usr")));
        assert!(policy.read_exec.contains(&std::env::current_exe().unwrap()));
        // Nothing of the user's own beyond what was passed in (and the binary).
        if let Some(home) = dirs::home_dir() {
            let exe = std::env::current_exe().unwrap();
            for path in policy
                .read_write
                .iter()
                .chain(&policy.read_only)
                .chain(&policy.read_exec)
            {
                let explicit = path == data.path() || *path == config || *path == exe;
                assert!(explicit || !path.starts_with(&home), "{}", path.display());
            }
        }
        // Every entry exists, except that data_dir is kept unconditionally.
        assert!(policy.read_only.iter().all(|p| p.exists()));
        assert!(policy.read_exec.iter().all(|p| p.exists()));
    }

    #[test]
    fn deny_list_compiles_without_duplicates() {
        let numbers = denied_syscall_numbers();
        let unique: std::collections::BTreeSet<_> = numbers.iter().collect();
        assert_eq!(unique.len(), numbers.len(), "duplicate syscall numbers");
        #[cfg(target_arch = "x86_64")]
        assert!(numbers.contains(&(libc::SYS_ptrace | X32_SYSCALL_BIT)));
        #[cfg(target_arch = "x86_64")]
        assert!(numbers.contains(&(521 | X32_SYSCALL_BIT)));
        assert!(!deny_list_program().unwrap().is_empty());
    }
}
