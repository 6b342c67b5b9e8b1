//! p2pvm-init: PID 1 of both p2pvm guests.
//!
//! Where it sits: the kernel starts it from the initramfs p2pvm-images built.
//! It mounts the pseudo file systems, loads the image's modules in order,
//! configures the service VM's network from the kernel command line and
//! mounts its store, then supervises the guest's programs — clamd and p2pd
//! (the node, the channel's back-end) in the service VM, the front-end in
//! the client VM — restarting them when they die, and keeps a shell on the
//! serial console (in the service VM `p2pctl` there holds the node's admin
//! capability: `p2pctl credit list`). `poweroff`, `reboot` and `halt` (busybox
//! signals PID 1) stop the programs, unmount the store and end the VM.

mod boot;
mod services;
mod system;

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

use boot::{Boot, Role};
use services::{Io, Spec, Supervisor};

/// Prints a line on the console, prefixed `p2pvm-init:`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("p2pvm-init: {}", format_args!($($arg)*))
    };
}

const P2PD_API: &str = "/var/lib/p2pd/api.sock";
const CLIENT_API: &str = "/run/p2pvm/api.sock";
const CLAMD_SOCKET: &str = "/run/clamd.sock";
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn main() {
    if std::process::id() != 1 {
        eprintln!("p2pvm-init is the init (PID 1) of a p2pvm guest; it does nothing elsewhere");
        std::process::exit(2);
    }
    system::mount_pseudo_filesystems();
    system::boot_marker();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let image_role = std::fs::read_to_string("/etc/p2pvm/role").ok();
    let boot = match Boot::parse(&cmdline, image_role.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            say!("{e}; starting only a shell");
            Boot::parse("p2pvm.role=client", None).expect("a fixed, valid command line")
        }
    };
    say!("{:?} VM, {:.2} s since boot", boot.role, system::uptime());
    system::set_hostname();
    system::load_modules();
    // Ctrl-Alt-Del becomes SIGINT for us instead of an immediate reset.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    let boot = if boot.role == Role::Service {
        // Without its link the node still serves local apps, but has no
        // address to serve its figures on.
        let networked = system::configure_network(&boot);
        system::mount_store();
        if networked {
            boot
        } else {
            Boot { ip: None, ..boot }
        }
    } else {
        system::configure_network(&Boot {
            ip: None,
            ..boot.clone()
        });
        boot
    };
    let _ = std::fs::create_dir_all("/run/p2pvm");
    let mode = run(&boot);
    shut_down(mode);
}

/// The programs of this guest, in start order.
fn specs(boot: &Boot) -> Vec<Spec> {
    let log_env = vec![
        ("RUST_LOG".to_string(), boot.log_level.clone()),
        ("PATH".into(), PATH.into()),
    ];
    let (api, banner) = match boot.role {
        Role::Service => (
            P2PD_API,
            "P2P service VM: p2pctl here holds the node's admin capability (p2pctl credit list, p2pctl peers, p2pctl app issue NAME)",
        ),
        Role::Client => (
            CLIENT_API,
            "client VM: apps reach the P2P node through the front-end; an app needs a token (P2PVM_TOKEN) from the service VM's console: p2pctl app issue NAME",
        ),
    };
    let mut specs = match boot.role {
        Role::Service => vec![
            Spec {
                name: "clamd",
                argv: vec![
                    "/usr/sbin/clamd".into(),
                    "-c".into(),
                    "/etc/clamav/clamd.conf".into(),
                ],
                env: log_env.clone(),
                ready: Some(CLAMD_SOCKET.into()),
                after: None,
                io: Io::Logged,
            },
            Spec {
                name: "p2pd",
                argv: p2pd_argv(boot),
                env: log_env.clone(),
                ready: Some(P2PD_API.into()),
                // p2pd's virus filter wants clamd; loading signatures takes seconds.
                after: Some(("clamd", Duration::from_secs(60))),
                io: Io::Logged,
            },
        ],
        Role::Client => vec![Spec {
            name: "front-end",
            argv: vec![
                "/usr/bin/p2p-frontend".into(),
                "--device".into(),
                "auto".into(),
                "--socket".into(),
                CLIENT_API.into(),
                "--mapping".into(),
                boot.mapping.clone(),
            ],
            env: log_env.clone(),
            ready: Some(CLIENT_API.into()),
            after: None,
            io: Io::Logged,
        }],
    };
    let prompt = match boot.role {
        Role::Service => "service# ",
        Role::Client => "client# ",
    };
    specs.push(Spec {
        name: "console",
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo; echo \"$P2PVM_BANNER\"; exec /bin/setsid -c /bin/sh".into(),
        ],
        env: vec![
            ("PATH".into(), PATH.into()),
            ("HOME".into(), "/root".into()),
            ("TERM".into(), "vt100".into()),
            ("PS1".into(), prompt.into()),
            ("P2PVM_API_SOCKET".into(), api.into()),
            ("P2PVM_BANNER".into(), banner.into()),
        ],
        ready: None,
        after: None,
        io: Io::Terminal(console_tty()),
    });
    specs
}

/// The serial line behind `/dev/console` (a controlling terminal needs the
/// real device).
fn console_tty() -> PathBuf {
    std::fs::read_to_string("/sys/class/tty/console/active")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .last()
                .map(|t| PathBuf::from(format!("/dev/{t}")))
        })
        .unwrap_or_else(|| PathBuf::from("/dev/ttyS0"))
}

/// Supervises until a power request; returns what was asked.
fn run(boot: &Boot) -> RebootMode {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    if let Err(e) = mask.thread_block() {
        say!("cannot block signals ({e}): power requests will not be handled");
    }
    let mut signals =
        match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => Some(fd),
            Err(e) => {
                say!("signalfd: {e}");
                None
            }
        };
    let mut sup = Supervisor::new(specs(boot), boot.log_to_console);
    loop {
        sup.tick(Instant::now());
        let outputs: Vec<(usize, BorrowedFd<'_>)> = sup.output_fds();
        let mut fds: Vec<PollFd<'_>> = outputs
            .iter()
            .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        if let Some(sfd) = &signals {
            fds.push(PollFd::new(sfd.as_fd(), PollFlags::POLLIN));
        }
        let _ = poll(&mut fds, PollTimeout::from(200u16));
        let readable: Vec<usize> = outputs
            .iter()
            .zip(&fds)
            .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|((i, _), _)| *i)
            .collect();
        drop(fds);
        for i in readable {
            sup.drain(i);
        }
        let mut request = None;
        if let Some(sfd) = &mut signals {
            while let Ok(Some(info)) = sfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGTERM | Signal::SIGINT) => request = Some(RebootMode::RB_AUTOBOOT),
                    Ok(Signal::SIGUSR1 | Signal::SIGUSR2) => {
                        request = Some(RebootMode::RB_POWER_OFF)
                    }
                    _ => {}
                }
            }
        }
        reap(&mut sup);
        if let Some(mode) = request {
            say!(
                "{}: stopping the programs",
                if mode == RebootMode::RB_AUTOBOOT {
                    "reboot"
                } else {
                    "power-off"
                }
            );
            sup.stop_all(Duration::from_secs(10));
            return mode;
        }
    }
}

/// Reaps every ended child: ours are restarted, orphans just collected.
fn reap(sup: &mut Supervisor) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                sup.exited(pid, &format!("exited with status {code}"), Instant::now());
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                sup.exited(pid, &format!("was killed by {sig}"), Instant::now());
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Ends the VM: the remaining processes, the store, then the kernel call.
fn shut_down(mode: RebootMode) -> ! {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), Signal::SIGKILL);
    while waitpid(None, Some(WaitPidFlag::WNOHANG)).is_ok_and(|s| s != WaitStatus::StillAlive) {}
    nix::unistd::sync();
    if let Err(e) = nix::mount::umount(system::STORE_MOUNT)
        && e != nix::Error::EINVAL
    {
        say!("unmounting the store: {e}");
    }
    nix::unistd::sync();
    say!("bye");
    let _ = reboot(mode);
    // reboot(2) does not return on success.
    std::process::exit(1)
}

/// p2pd's command line. With a network, its figures and dashboard are
/// served on the VM's side of the TAP (reachable from the host only), and
/// the dashboard's VMs page asks `p2pvmm up` on the host's side.
fn p2pd_argv(boot: &boot::Boot) -> Vec<String> {
    let mut argv: Vec<String> = [
        "/usr/bin/p2pd",
        "--config",
        "/etc/p2pd.toml",
        "--channel-mapping",
        &boot.mapping,
    ]
    .map(String::from)
    .into();
    if let Some(ip) = &boot.ip {
        argv.extend(["--metrics".into(), format!("{}:{METRICS_PORT}", ip.addr)]);
    }
    if let (Some(_), Some(gw)) = (&boot.ip, boot.gateway) {
        argv.extend([
            "--vms-url".into(),
            format!("http://{gw}:{VMS_PORT}/vms.json"),
        ]);
    }
    argv
}

/// Where p2pd serves `/metrics` and the dashboard in the service VM.
const METRICS_PORT: u16 = 9100;
/// Where `p2pvmm up` serves the VMs' figures on the host's side of the TAP
/// (`vmm::platform::FIGURES_PORT`).
const VMS_PORT: u16 = 9101;

#[cfg(test)]
mod tests {
    use super::boot::Boot;

    #[test]
    fn p2pd_serves_its_figures_on_the_tap_and_only_with_a_network() {
        let with =
            Boot::parse("p2pvm.ip=10.99.0.2/24 p2pvm.gw=10.99.0.1", Some("service")).unwrap();
        let argv = super::p2pd_argv(&with);
        assert!(
            argv.windows(2)
                .any(|w| w == ["--metrics", "10.99.0.2:9100"]),
            "{argv:?}"
        );
        assert!(
            argv.windows(2)
                .any(|w| w == ["--vms-url", "http://10.99.0.1:9101/vms.json"]),
            "{argv:?}"
        );
        let without = Boot::parse("quiet", Some("service")).unwrap();
        let argv = super::p2pd_argv(&without);
        assert!(
            !argv.iter().any(|a| a == "--metrics" || a == "--vms-url"),
            "{argv:?}"
        );
    }
}
