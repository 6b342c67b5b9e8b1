//! `p2pvmm up --isolation vm`: several VMs, each in a `p2pvmm run` process
//! of its own, supervised.
//!
//! One process per VM, not one thread: a device model compromised by its
//! guest then holds that VM's memory and devices only — the other VM's
//! memory is not mapped in it (seccomp and the process boundary together
//! are what Firecracker's jailer and Cloud Hypervisor rely on too).
//!
//! Policy: a VM that crashed, panicked or was killed is started again
//! (backing off while it keeps failing quickly); one whose guest powered off
//! stays off unless its `restart` is `always`.
//!
//! VMs with a `channel` end and no broker of their own get the supervisor's:
//! one region and one pair of event channels for the set, handed to each
//! VM's process (and again to a restarted one) over `run/broker.sock`. SIGTERM/SIGINT stop every VM and then `up` returns;
//! `up` also returns once every VM has powered off. Each child dies with
//! `up` (parent-death signal), so no VM outlives its supervisor.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::config::{ChannelSide, RestartPolicy, VmConfig, VmSet};
use crate::vm_dir::VmDir;

/// Why the VMs could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// A VM's configuration is invalid.
    #[error("VM {name}: {source}")]
    Config {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: crate::config::ConfigError,
    },
    /// Two VMs share a name.
    #[error("Two VMs are named {0}")]
    DuplicateName(String),
    /// The channel cannot be set up as configured.
    #[error("channel: {0}")]
    Channel(String),
    /// The figures' address is public or cannot be bound.
    #[error("serving the VMs' figures on {addr}: {why}")]
    Metrics {
        /// `--metrics`.
        addr: std::net::SocketAddr,
        /// Why.
        why: String,
    },
    /// The `[[vm]]` file could not be read.
    #[error("Reading {path}")]
    ReadSet {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `[[vm]]` file is not valid.
    #[error("Invalid VM set {path}")]
    ParseSet {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// Writing a VM's configuration or starting its process failed.
    #[error("VM {name}: {what}")]
    Io {
        /// The VM.
        name: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A VM that ran this long before failing is restarted without delay growth.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// How long VMs get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

/// Exit status of `p2pvmm run` when its guest powered off (or was stopped).
const EXIT_CLEAN: i32 = 0;

struct Managed {
    config: VmConfig,
    config_file: PathBuf,
    /// Its process's `figures.json`.
    figures: PathBuf,
    child: Option<Child>,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Duration,
    restarts: u32,
    done: bool,
}

/// How each VM process is started.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `p2pvmm` binary.
    pub exe: PathBuf,
    /// `--home`.
    pub home: PathBuf,
    /// `--log` for the children.
    pub log: String,
    /// Extra `run` flags (e.g. `--seccomp log`).
    pub run_args: Vec<String>,
    /// Where to serve the VMs' figures (`crate::metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// `metrics` is a default, not the operator's choice: failing to serve
    /// there is a warning, not a reason to stay down.
    pub metrics_by_default: bool,
}

fn io(name: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> SuperviseError {
    let name = name.to_owned();
    move |source| SuperviseError::Io { name, what, source }
}

fn check(set: &VmSet) -> Result<(), SuperviseError> {
    for side in [ChannelSide::Device, ChannelSide::Driver] {
        let ends = set
            .vm
            .iter()
            .filter(|v| {
                v.channel
                    .as_ref()
                    .is_some_and(|c| c.side == side && c.broker.is_none())
            })
            .count();
        if ends > 1 {
            return Err(SuperviseError::Channel(format!(
                "{ends} VMs are the channel's {side:?} end; a channel has one of each"
            )));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for vm in &set.vm {
        vm.validate().map_err(|source| SuperviseError::Config {
            name: vm.name.clone(),
            source,
        })?;
        if !names.insert(vm.name.as_str()) {
            return Err(SuperviseError::DuplicateName(vm.name.clone()));
        }
    }
    Ok(())
}

impl Managed {
    fn start(&mut self, launch: &Launch) -> Result<(), SuperviseError> {
        let name = self.config.name.clone();
        let dir = VmDir::new(&launch.home, &name);
        // A snapshot of the last process is not this one's.
        let _ = std::fs::remove_file(&self.figures);
        let child = Command::new(&launch.exe)
            .arg("--home")
            .arg(&launch.home)
            .arg("--log")
            .arg(&launch.log)
            .arg("run")
            .arg("--config")
            .arg(&self.config_file)
            .arg("--report")
            .arg(dir.path().join("report.json"))
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .args(&launch.run_args)
            .spawn()
            .map_err(io(&name, "starting its p2pvmm process"))?;
        info!(vm = %name, pid = child.id(), restarts = self.restarts, "VM started");
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }

    /// Looks at the child; schedules a restart if it failed.
    fn poll(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return,
            Err(e) => {
                warn!(vm = %self.config.name, error = %e, "cannot wait for the VM");
                return;
            }
        };
        self.child = None;
        // Its last snapshot is not the VM's state any more.
        let _ = std::fs::remove_file(&self.figures);
        let name = &self.config.name;
        if status.code() == Some(EXIT_CLEAN) && self.config.restart == RestartPolicy::OnFailure {
            info!(vm = %name, "VM powered off; it stays off");
            self.done = true;
            return;
        }
        let ran = self.started.elapsed();
        self.backoff = if ran >= HEALTHY_RUN {
            BACKOFF_MIN
        } else {
            (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
        };
        self.restarts += 1;
        // A seccomp filter kills with SIGSYS: a thread made a syscall its
        // filter does not list (`p2pvmm run --seccomp log` finds which).
        let why = if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGSYS) {
            "a seccomp violation"
        } else {
            "failed"
        };
        error!(vm = %name, %status, why, ran_s = ran.as_secs_f64(), backoff_ms = self.backoff.as_millis() as u64, "VM failed; restarting");
        self.restart_at = Some(Instant::now() + self.backoff);
    }
}

/// Runs `set` until every VM powered off or `stop` is set.
pub fn up(set: &VmSet, launch: &Launch, stop: &AtomicBool) -> Result<(), SuperviseError> {
    check(set)?;
    let set = with_broker(set, launch)?;
    let mut vms = Vec::new();
    for config in &set.vm {
        let dir = VmDir::new(&launch.home, &config.name);
        std::fs::create_dir_all(dir.path()).map_err(io(&config.name, "creating its directory"))?;
        let config_file = dir.path().join("vm.toml");
        let text = toml::to_string(config)
            .map_err(|e| io(&config.name, "writing its configuration")(std::io::Error::other(e)))?;
        std::fs::write(&config_file, text)
            .map_err(io(&config.name, "writing its configuration"))?;
        vms.push(Managed {
            config: config.clone(),
            config_file,
            figures: dir.figures(),
            child: None,
            started: Instant::now(),
            restart_at: None,
            backoff: Duration::ZERO,
            restarts: 0,
            done: false,
        });
    }
    let board = crate::metrics::Board::default();
    let _server = match launch.metrics {
        None => None,
        Some(addr) => match FiguresServer::start(addr, board.clone(), launch.home.clone()) {
            Ok(s) => Some(s),
            Err(e) if launch.metrics_by_default => {
                warn!(error = %e, "the VMs' figures are not served (pass --metrics to choose where)");
                None
            }
            Err(e) => return Err(e),
        },
    };
    for vm in &mut vms {
        vm.start(launch)?;
    }
    while !stop.load(Ordering::Relaxed) {
        for vm in &mut vms {
            vm.poll();
            if vm.restart_at.is_some_and(|t| Instant::now() >= t)
                && let Err(e) = vm.start(launch)
            {
                error!(error = %e, "restart failed; trying again later");
                vm.restart_at = Some(Instant::now() + BACKOFF_MAX);
            }
        }
        post(&board, &vms, &launch.home);
        if vms.iter().all(|v| v.done) {
            info!("every VM powered off");
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
    shutdown(&mut vms);
    Ok(())
}

/// Puts each VM's state on the board the figures server reads.
fn post(board: &crate::metrics::Board, vms: &[Managed], home: &Path) {
    let status = vms
        .iter()
        .map(|v| crate::metrics::VmStatus {
            name: v.config.name.clone(),
            state: match (&v.child, v.done) {
                (Some(_), _) => "running",
                (None, true) => "off",
                (None, false) => "restarting",
            }
            .into(),
            restarts: v.restarts,
            memory_mib: v.config.mem_mib,
            console: format!("p2pvmm --home {} console {}", home.display(), v.config.name),
            figures: None,
        })
        .collect();
    *board.lock().expect("lock") = status;
}

/// `GET /metrics` and `GET /vms.json` on a thread of their own (the
/// supervisor's loop is plain threads); stopped when dropped.
struct FiguresServer {
    stop: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FiguresServer {
    fn start(
        addr: std::net::SocketAddr,
        board: crate::metrics::Board,
        home: PathBuf,
    ) -> Result<Self, SuperviseError> {
        let refuse = |why: String| SuperviseError::Metrics { addr, why };
        if !p2pvm_httpd::is_private(addr.ip()) {
            return Err(refuse(
                "only a loopback or private address (the figures carry no token)".into(),
            ));
        }
        // Bound here, so a bad address fails `up` at once.
        let listener = std::net::TcpListener::bind(addr).map_err(|e| refuse(e.to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| refuse(e.to_string()))?;
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("figures".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        error!(error = %e, "no runtime for the figures server");
                        return;
                    }
                };
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => {
                            crate::metrics::serve(
                                l,
                                board,
                                crate::metrics::Sources::Vms(home),
                                token,
                            )
                            .await
                        }
                        Err(e) => error!(error = %e, "figures server"),
                    }
                });
            })
            .map_err(|e| refuse(e.to_string()))?;
        info!(%addr, "the VMs' figures at GET /metrics and /vms.json");
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FiguresServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the set's channel broker if a VM needs it, and points those VMs
/// at it.
fn with_broker(set: &VmSet, launch: &Launch) -> Result<VmSet, SuperviseError> {
    let mut set = set.clone();
    let wanting: Vec<&mut VmConfig> = set
        .vm
        .iter_mut()
        .filter(|v| v.channel.as_ref().is_some_and(|c| c.broker.is_none()))
        .collect();
    if wanting.is_empty() {
        return Ok(set);
    }
    let home = crate::sandbox::Home::new(launch.home.clone());
    let chan = |e: &dyn std::fmt::Display| SuperviseError::Channel(e.to_string());
    crate::supervisor::private_dir(home.root()).map_err(|e| chan(&e))?;
    crate::supervisor::private_dir(&home.run_dir()).map_err(|e| chan(&e))?;
    let broker =
        p2pvm_channel::Broker::new(p2pvm_channel::Layout::standard()).map_err(|e| chan(&e))?;
    let path = home.broker();
    crate::supervisor::start_broker(&path, std::sync::Arc::new(broker)).map_err(|e| chan(&e))?;
    info!(broker = %path.display(), "channel broker for the VMs");
    for vm in wanting {
        if let Some(c) = vm.channel.as_mut() {
            c.broker = Some(path.clone());
        }
    }
    Ok(set)
}

/// SIGTERM to every VM, then SIGKILL to what is left after the grace period.
fn shutdown(vms: &mut [Managed]) {
    for vm in vms.iter() {
        if let Some(c) = &vm.child {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let running: Vec<&mut Managed> = vms
            .iter_mut()
            .filter_map(|v| {
                let alive = v
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                alive.then_some(v)
            })
            .collect();
        if running.is_empty() {
            info!("every VM stopped");
            return;
        }
        if Instant::now() >= deadline {
            for v in running {
                warn!(vm = %v.config.name, "VM did not stop in time; killing it");
                if let Some(c) = v.child.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// Reads a `[[vm]]` file.
pub fn load(path: &Path) -> Result<VmSet, SuperviseError> {
    let text = std::fs::read_to_string(path).map_err(|source| SuperviseError::ReadSet {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| SuperviseError::ParseSet {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmConfig {
        VmConfig {
            name: name.into(),
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: 64,
            vcpus: 1,
            disks: vec![],
            nets: vec![],
            rng: false,
            channel: None,
            restart: RestartPolicy::OnFailure,
        }
    }

    #[test]
    fn names_must_be_unique_and_valid() {
        assert!(
            check(&VmSet {
                vm: vec![vm("a"), vm("b")]
            })
            .is_ok()
        );
        assert!(matches!(
            check(&VmSet {
                vm: vec![vm("a"), vm("a")]
            }),
            Err(SuperviseError::DuplicateName(_))
        ));
        assert!(matches!(
            check(&VmSet {
                vm: vec![vm("a b")]
            }),
            Err(SuperviseError::Config { .. })
        ));
    }

    /// A stand-in for `p2pvmm`: exits with the status its VM's name asks for.
    fn fake_vmm(dir: &Path) -> PathBuf {
        let exe = dir.join("fake-p2pvmm");
        let script = "#!/bin/sh\n\
            case \"$*\" in\n\
              *vms/ok/vm.toml*) exit 0 ;;\n\
              *vms/crash/vm.toml*) echo x >> \"$(dirname \"$7\")/starts\"; exit 1 ;;\n\
              *) sleep 30 ;;\n\
            esac\n";
        std::fs::write(&exe, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        exe
    }

    fn fake_launch(dir: &Path) -> Launch {
        Launch {
            metrics: None,
            metrics_by_default: false,
            exe: fake_vmm(dir),
            home: dir.to_path_buf(),
            log: "info".into(),
            run_args: vec![],
        }
    }

    #[test]
    fn powered_off_stays_off_crashed_restarts_stop_stops_all() {
        let dir = tempfile::tempdir().unwrap();
        let launch = fake_launch(dir.path());
        let stop = AtomicBool::new(false);
        let set = VmSet {
            vm: vec![vm("ok"), vm("crash"), vm("long")],
        };
        std::thread::scope(|s| {
            let h = s.spawn(|| up(&set, &launch, &stop));
            std::thread::sleep(Duration::from_millis(1500));
            stop.store(true, Ordering::Relaxed);
            h.join().unwrap().unwrap();
        });
        let starts = std::fs::read_to_string(dir.path().join("vms/crash/starts")).unwrap();
        // 200 + 400 + 800 ms of backoff fit in 1.5 s: started 3 or 4 times.
        assert!((3..=4).contains(&starts.lines().count()), "{starts:?}");
        assert!(dir.path().join("vms/ok/vm.toml").exists());
    }

    #[test]
    fn up_returns_when_every_vm_powered_off() {
        let dir = tempfile::tempdir().unwrap();
        let launch = fake_launch(dir.path());
        let stop = AtomicBool::new(false);
        let t = Instant::now();
        up(&VmSet { vm: vec![vm("ok")] }, &launch, &stop).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
