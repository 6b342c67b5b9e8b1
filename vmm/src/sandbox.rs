//! The `sandbox` backend's process recipes: how the service side is started
//! inside its namespaces, and how the operator's console joins them.
//!
//! Namespaces come from util-linux's `unshare` (user, mount, pid with its own
//! `/proc`, ipc, uts — not net: the node talks to the internet). Inside,
//! `p2pd --confine` applies Landlock (only its data directory, the sockets it
//! needs and system files) and a seccomp filter to itself before it starts any
//! thread. The console enters the same namespaces with `nsenter` and runs
//! `p2pd --confine --console`, so the operator's shell is confined exactly like
//! the service and finds `p2pctl` with the admin token.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where a `p2pvmm up` instance keeps its state.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// Uses `root` (created on `up`).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// `~/.local/share/p2pvmm` (or under `$XDG_DATA_HOME`).
    pub fn default_root() -> PathBuf {
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("p2pvmm")
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The API socket apps connect to (served by the front-end).
    pub fn api_socket(&self) -> PathBuf {
        self.root.join("api.sock")
    }
    /// The service side's data directory (the only user directory it sees).
    pub fn service_dir(&self) -> PathBuf {
        self.root.join("service")
    }
    /// Supervisor runtime files.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    /// The channel broker socket.
    pub fn broker(&self) -> PathBuf {
        self.run_dir().join("broker.sock")
    }
    /// Host pid of the sandboxed p2pd (for the console).
    pub fn service_pid(&self) -> PathBuf {
        self.run_dir().join("service.pid")
    }
    /// Pid of the front-end.
    pub fn frontend_pid(&self) -> PathBuf {
        self.run_dir().join("frontend.pid")
    }
    /// The front-end's channel figures (Prometheus text it rewrites each second).
    pub fn frontend_figures(&self) -> PathBuf {
        self.run_dir().join("frontend.prom")
    }
    /// The p2pd arguments that locate the service's state (for the console).
    pub fn service_args_file(&self) -> PathBuf {
        self.run_dir().join("service.args")
    }
    /// The operator's admin token.
    pub fn admin_token(&self) -> PathBuf {
        self.service_dir().join("admin.token")
    }
}

/// Finds one of our binaries: `$P2PVM_BIN_DIR`, then next to this executable,
/// then `$PATH`.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("P2PVM_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
        && dir.join(name).exists()
    {
        return dir.join(name);
    }
    PathBuf::from(name)
}

/// The p2pd arguments that pin down the service's state: data directory,
/// channel broker, config file.
pub fn service_base_args(home: &Home, config: Option<&Path>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--data-dir".into(),
        home.service_dir().into(),
        "--channel-broker".into(),
        home.broker().into(),
    ];
    if let Some(c) = config {
        args.extend(["--config".into(), c.as_os_str().to_owned()]);
    }
    args
}

/// The namespaces the service side gets.
pub const UNSHARE_ARGS: &[&str] = &[
    "--user",
    "--map-current-user",
    "--mount",
    "--pid",
    "--fork",
    "--mount-proc",
    "--ipc",
    "--uts",
    // If the supervisor (or this unshare) dies, the service goes too.
    "--kill-child=SIGTERM",
];

/// The service side's command line: `unshare … -- p2pd --confine …`.
pub fn service_command(base: &[OsString], extra: &[OsString]) -> (PathBuf, Vec<OsString>) {
    let mut args: Vec<OsString> = UNSHARE_ARGS.iter().map(OsString::from).collect();
    args.push("--".into());
    args.push(bin("p2pd").into());
    args.push("--confine".into());
    args.extend(base.iter().cloned());
    args.extend(extra.iter().cloned());
    (PathBuf::from("unshare"), args)
}

/// The front-end's command line: `unshare --user --net -- p2p-frontend …`.
/// The front-end needs the channel and its app socket (both reached through
/// the filesystem or inherited descriptors) and nothing of the network, so it
/// gets an empty network namespace: a compromised front-end cannot talk to
/// anything but its peers on this machine.
pub fn frontend_command(broker: &Path, socket: &Path, figures: &Path) -> (PathBuf, Vec<OsString>) {
    let args: Vec<OsString> = vec![
        "--user".into(),
        "--map-current-user".into(),
        "--net".into(),
        "--".into(),
        bin("p2p-frontend").into(),
        "--broker".into(),
        broker.into(),
        "--socket".into(),
        socket.into(),
        "--figures".into(),
        figures.into(),
    ];
    (PathBuf::from("unshare"), args)
}

/// The console's command line: `nsenter` into the service's namespaces, then
/// `p2pd --confine --console -- COMMAND`.
pub fn console_command(
    pid: u32,
    base: &[OsString],
    command: &[OsString],
) -> (PathBuf, Vec<OsString>) {
    let mut args: Vec<OsString> = [
        "--target",
        &pid.to_string(),
        "--user",
        "--mount",
        "--pid",
        "--ipc",
        "--uts",
        "--preserve-credentials",
        "--",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(bin("p2pd").into());
    args.push("--confine".into());
    args.push("--console".into());
    // The operator wants the shell, not the confinement report.
    args.extend(["--log".into(), "warn".into()]);
    args.extend(base.iter().cloned());
    if !command.is_empty() {
        args.push("--".into());
        args.extend(command.iter().cloned());
    }
    (PathBuf::from("nsenter"), args)
}

/// The first child of process `pid` (the p2pd that `unshare --fork` started).
pub fn first_child(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}
