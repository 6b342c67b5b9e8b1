//! `p2pvmm up` in the sandbox backend: owns the channel (region + doorbells,
//! brokered to both sides), runs the service side in its sandbox and the
//! front-end on the host, and restarts either when it dies. The service side
//! comes back with a new channel generation; the front-end resets its app
//! sessions and apps reconnect.

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use p2pvm_channel::{Broker, Layout};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::sandbox::{self, Home};

/// Why the supervisor could not start.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The channel could not be created.
    #[error(transparent)]
    Channel(#[from] p2pvm_channel::ChannelError),
    /// Preparing directories or sockets, or starting a child, failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SuperviseError {
    let what = what.into();
    move |source| SuperviseError::Io { what, source }
}

/// What `up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// State directory.
    pub home: Home,
    /// p2pd config file for the service side.
    pub config: Option<PathBuf>,
    /// Extra p2pd arguments (listen addresses, bootstrap peers, ...).
    pub service_args: Vec<OsString>,
    /// Channel layout.
    pub layout: Layout,
    /// Where to serve the two sides' state and the front-end's channel
    /// figures (`GET /metrics`, `GET /vms.json`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

/// One supervised child: how to (re)start it and its restart state.
struct Managed {
    name: &'static str,
    /// Sent to the child when the supervisor dies (see `start`).
    death_signal: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    backoff: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A child that ran this long before dying is restarted without delay growth.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

impl Managed {
    fn new(
        name: &'static str,
        death_signal: &'static str,
        (program, args): (PathBuf, Vec<OsString>),
    ) -> Self {
        Self {
            name,
            death_signal,
            program,
            args,
            child: None,
            started: Instant::now(),
            restarts: 0,
            backoff: BACKOFF_MIN,
        }
    }

    fn start(&mut self) -> Result<u32, SuperviseError> {
        // setpriv(1) sets the parent-death signal before exec (no unsafe
        // pre_exec here): if the supervisor dies, even by SIGKILL, its
        // children are told to stop instead of running on unsupervised.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", self.death_signal, "--"])
            .arg(&self.program)
            .args(&self.args)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!(
                "starting the {} ({})",
                self.name,
                self.program.display()
            )))?;
        let pid = child.id().unwrap_or(0);
        self.child = Some(child);
        self.started = Instant::now();
        Ok(pid)
    }

    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.wait().await,
            None => std::future::pending().await,
        }
    }

    /// The delay before the next restart.
    fn next_delay(&mut self) -> Duration {
        if self.started.elapsed() >= HEALTHY_RUN {
            self.backoff = BACKOFF_MIN;
        }
        let d = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.restarts += 1;
        d
    }

    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            warn!(child = self.name, "did not stop on SIGTERM; killing");
            let _ = child.kill().await;
        }
    }
}

pub(crate) fn private_dir(p: &Path) -> Result<(), SuperviseError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(io(format!("creating {}", p.display())))
}

/// Binds the broker socket at `path` and answers attaches on a thread of its
/// own (the answers are tiny blocking sendmsg calls).
pub fn start_broker(path: &Path, broker: Arc<Broker>) -> Result<(), SuperviseError> {
    let path = path.to_path_buf();
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(io(format!("binding {}", path.display())))?;
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn.and_then(|c| broker.answer(c)) {
                    Ok(side) => info!(?side, "channel handed out"),
                    Err(e) => warn!(error = %e, "broker request failed"),
                }
            }
        })
        .map_err(io("starting the broker thread"))?;
    Ok(())
}

/// Records the front-end's pid (unshare without --fork execs it in place).
fn record_frontend_pid(home: &Home, pid: u32) {
    let _ = std::fs::write(home.frontend_pid(), format!("{pid}\n"));
}

/// Records the sandboxed p2pd's host pid for the console, once it exists.
async fn record_service_pid(home: &Home, unshare_pid: u32) {
    for _ in 0..200 {
        // setpriv execs unshare in place, whose forked child is p2pd.
        if let Some(pid) = sandbox::first_child(unshare_pid) {
            let _ = std::fs::write(home.service_pid(), format!("{pid}\n"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    warn!("could not find the sandboxed service's pid; the console will not work");
}

/// Puts both sides' states on the board the figures server reads.
fn post(board: &crate::metrics::Board, service: &Managed, frontend: &Managed, home: &Home) {
    let side = |name: &str, m: &Managed, console: String| crate::metrics::VmStatus {
        name: name.into(),
        state: if m.child.is_some() {
            "running"
        } else {
            "restarting"
        }
        .into(),
        restarts: m.restarts,
        memory_mib: 0,
        console,
        figures: None,
    };
    let root = home.root().display();
    *board.lock().expect("lock") = vec![
        side(
            "service",
            service,
            format!("p2pvmm --home {root} console service"),
        ),
        side("front-end", frontend, String::new()),
    ];
}

/// Serves the sides' states and the front-end's channel figures on `addr`
/// (loopback or private only) until `shutdown`.
async fn serve_figures(
    addr: std::net::SocketAddr,
    board: &crate::metrics::Board,
    home: &Home,
    shutdown: CancellationToken,
) -> Result<(), SuperviseError> {
    if !p2pvm_httpd::is_private(addr.ip()) {
        return Err(SuperviseError::Io {
            what: format!("serving figures on {addr}: only a loopback or private address"),
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(io(format!("binding the figures' address {addr}")))?;
    info!(%addr, "the sandbox's figures at GET /metrics and /vms.json");
    tokio::spawn(crate::metrics::serve(
        listener,
        board.clone(),
        crate::metrics::Sources::Sandbox {
            frontend: home.frontend_figures(),
        },
        shutdown,
    ));
    Ok(())
}

/// Runs the platform until `shutdown`.
pub async fn up(opts: UpOptions, shutdown: CancellationToken) -> Result<(), SuperviseError> {
    let home = &opts.home;
    private_dir(home.root())?;
    private_dir(&home.run_dir())?;
    private_dir(&home.service_dir())?;
    let broker = Arc::new(Broker::new(opts.layout)?);
    start_broker(&home.broker(), broker.clone())?;

    let base = sandbox::service_base_args(home, opts.config.as_deref());
    let args_text: Vec<String> = base
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    std::fs::write(home.service_args_file(), args_text.join("\n"))
        .map_err(io("writing service.args"))?;

    // unshare ignores SIGTERM while it waits for its child, so it gets SIGKILL
    // and passes SIGTERM on to p2pd (--kill-child); p2pd shuts down cleanly.
    let mut service = Managed::new(
        "service side",
        "SIGKILL",
        sandbox::service_command(&base, &opts.service_args),
    );
    let mut frontend = Managed::new(
        "front-end",
        "SIGTERM",
        sandbox::frontend_command(&home.broker(), &home.api_socket(), &home.frontend_figures()),
    );
    let board = crate::metrics::Board::default();
    if let Some(addr) = opts.metrics {
        serve_figures(addr, &board, home, shutdown.clone()).await?;
    }

    let pid = service.start()?;
    record_service_pid(home, pid).await;
    record_frontend_pid(home, frontend.start()?);
    info!("platform up");

    loop {
        post(&board, &service, &frontend, home);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            status = service.wait() => {
                let delay = service.next_delay();
                error!(status = ?status.ok(), restarts = service.restarts, ?delay, "the service side exited; restarting it");
                let _ = std::fs::remove_file(home.service_pid());
                service.child = None;
                post(&board, &service, &frontend, home);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                let pid = service.start()?;
                record_service_pid(home, pid).await;
                println!("p2pvmm: service side restarted ({} restarts)", service.restarts);
            }
            status = frontend.wait() => {
                let delay = frontend.next_delay();
                error!(status = ?status.ok(), restarts = frontend.restarts, ?delay, "the front-end exited; restarting it");
                frontend.child = None;
                post(&board, &service, &frontend, home);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                record_frontend_pid(home, frontend.start()?);
            }
        }
    }
    info!("stopping");
    frontend.stop().await;
    // unshare ignores SIGTERM: stop p2pd itself, unshare follows it out.
    if let Some(pid) = std::fs::read_to_string(home.service_pid())
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    service.stop().await;
    let _ = std::fs::remove_file(home.service_pid());
    let _ = std::fs::remove_file(home.broker());
    Ok(())
}
