//! Test harness: real `p2pd` processes on loopback, driven through `guest-api`.
//!
//! Binaries are found next to the test executable's `deps/` folder (the normal
//! cargo layout), or in `$P2PVM_BIN_DIR`. Build them first with
//! `cargo build --workspace --bins` (the README's test command does).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use guest_api::Client;
use tokio::process::{Child, Command};

pub mod browser;
pub mod nat;
pub mod playback;
pub mod scrape;
pub mod split;
pub mod swarm;
pub mod torrent;

/// Where the workspace binaries are.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("P2PVM_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, failing loudly when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Whether `name` is something the workspace binaries read from their
/// environment: their clap `env`s and defaults (`P2PVM_API_SOCKET`,
/// `P2PVM_TOKEN`, `P2PVM_TOKEN_FILE`, `P2PVM_DATA_DIR`, `P2PVMM_HOME`, ...),
/// their log filters (`P2PD_LOG`, `P2PVMM_LOG`, `P2P_FRONTEND_LOG`,
/// `RUST_LOG`) and the VMM's developer switches (`P2PVMM_EXIT_STATS`, ...).
pub fn read_by_our_binaries(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    ["P2PVM_", "P2PVMM_", "P2PD_", "P2P_FRONTEND_"]
        .iter()
        .any(|p| name.starts_with(p))
        || name == "RUST_LOG"
}

/// What the harness spawns does not see the user's environment for p2pvm: a
/// user who exported `P2PVM_TOKEN` for their own node (as the README says
/// to) must not make a test's `p2pctl` present that token to the test's
/// node. Every process a test starts goes through this; the harness then
/// sets what it means the process to see.
pub trait Hermetic {
    /// Removes every variable [`read_by_our_binaries`] from the child's
    /// environment.
    fn hermetic(&mut self) -> &mut Self;
}

fn ours() -> impl Iterator<Item = std::ffi::OsString> {
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| read_by_our_binaries(k))
}

impl Hermetic for std::process::Command {
    fn hermetic(&mut self) -> &mut Self {
        for k in ours() {
            self.env_remove(k);
        }
        self
    }
}

impl Hermetic for Command {
    fn hermetic(&mut self) -> &mut Self {
        for k in ours() {
            self.env_remove(k);
        }
        self
    }
}

/// A `Command` for `program` (async) with the user's p2pvm environment
/// removed ([`Hermetic`]).
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.hermetic();
    c
}

/// The blocking twin of [`command`].
pub fn std_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    c.hermetic();
    c
}

/// The clamd socket tests use: `$P2PVM_CLAMD_SOCKET`, else where
/// `scripts/clamd.sh` puts it.
pub fn clamd_socket() -> PathBuf {
    std::env::var_os("P2PVM_CLAMD_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/p2pvm-clamd/clamd.sock"))
}

/// The signature database of that clamd (`scripts/clamd.sh` keeps it beside
/// the socket).
pub fn clamd_database_dir() -> PathBuf {
    clamd_socket()
        .parent()
        .map(|d| d.join("db"))
        .unwrap_or_else(|| PathBuf::from("/tmp/p2pvm-clamd/db"))
}

/// One p2pd process with its own data directory and socket.
#[derive(Debug)]
pub struct TestNode {
    /// Data directory (kept across restarts).
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    /// API socket.
    pub socket: PathBuf,
    /// Peer id.
    pub peer_id: String,
    /// A TCP multiaddr with /p2p/ suffix.
    pub addr: String,
    extra_args: Vec<String>,
    store_bytes: Option<u64>,
    capture_log: bool,
    log_filter: Option<String>,
    host: Option<p2pvm_netlab::Host>,
    tcp_port: Option<u16>,
}

/// Options for starting a node.
#[derive(Debug, Default, Clone)]
pub struct NodeOpts {
    /// Bootstrap multiaddrs.
    pub bootstrap: Vec<String>,
    /// TOML config text, written to a file and passed with --config.
    pub config_toml: Option<String>,
    /// Give the content store its own tmpfs of this many bytes (p2pd runs in a
    /// user + mount namespace to mount it), to exercise a full disk.
    pub store_bytes: Option<u64>,
    /// Write p2pd's log (at `info` unless `P2PD_LOG` says otherwise) to a
    /// file that [`TestNode::log`] reads, instead of the test's stderr.
    pub capture_log: bool,
    /// The captured log's filter instead of `info` (`P2PD_LOG` syntax).
    pub log_filter: Option<String>,
    /// Run in this host of a network lab (its own namespace, address and
    /// shaped line) instead of on loopback.
    pub host: Option<p2pvm_netlab::Host>,
    /// Listen for TCP on this port instead of one the kernel picks (an
    /// address declared in the config before the node starts needs it).
    pub tcp_port: Option<u16>,
}

impl TestNode {
    /// The running daemon's process id.
    pub fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .context("not running")
    }

    /// Starts a node in a fresh temporary directory.
    pub async fn start(opts: NodeOpts) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("p2pvm-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let mut args = Vec::new();
        for b in &opts.bootstrap {
            args.push("--bootstrap".to_string());
            args.push(b.clone());
        }
        // Every test node scans with the real clamd that scripts/clamd.sh runs,
        // unless the test configures the filter itself.
        let mut toml = opts.config_toml.clone().unwrap_or_default();
        if !toml.contains("[virus]") {
            toml.push_str(&format!(
                "\n[virus]\nclamd_socket = \"{}\"\ndatabase_dir = \"{}\"\n",
                clamd_socket().display(),
                clamd_database_dir().display()
            ));
        }
        let cfg = dir.join("p2pd.toml");
        std::fs::write(&cfg, toml)?;
        args.push("--config".into());
        args.push(cfg.display().to_string());
        let mut node = Self {
            socket: dir.join("data/api.sock"),
            dir,
            _tmp: Some(tmp),
            child: None,
            peer_id: String::new(),
            addr: String::new(),
            extra_args: args,
            store_bytes: opts.store_bytes,
            capture_log: opts.capture_log,
            log_filter: opts.log_filter,
            host: opts.host,
            tcp_port: opts.tcp_port,
        };
        node.launch().await?;
        Ok(node)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("p2pd.log")
    }

    /// What p2pd logged so far (with `capture_log`; empty otherwise).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The data directory given to p2pd.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Spawns a p2pd on this node's data directory (another one, if `self` runs).
    pub fn spawn_raw(&self) -> Result<Child> {
        let mut cmd = match (self.store_bytes, &self.host) {
            (None, None) => command(bin("p2pd")),
            (None, Some(host)) => {
                // `ip netns exec` execs p2pd in place: the child's pid is p2pd's.
                let mut c = command("ip");
                c.args(["netns", "exec", &host.netns]).arg(bin("p2pd"));
                c
            }
            (Some(_), Some(_)) => bail!("a lab node with its own store size is not supported"),
            (Some(bytes), None) => {
                let store = self.data_dir().join("content");
                std::fs::create_dir_all(&store)?;
                let mut c = command("unshare");
                c.args(["--user", "--map-root-user", "--mount", "sh", "-c"])
                    .arg("mount -t tmpfs -o size=$1 tmpfs \"$2\" && shift 2 && exec \"$@\"")
                    .args(["sh", &bytes.to_string()])
                    .arg(&store)
                    .arg(bin("p2pd"));
                c
            }
        };
        let ip = self
            .host
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |h| h.ip);
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .arg("--no-mdns")
            .args([
                "--listen",
                &format!("/ip4/{ip}/tcp/{}", self.tcp_port.unwrap_or(0)),
            ])
            .args(["--listen", &format!("/ip4/{ip}/udp/0/quic-v1")])
            .args(&self.extra_args)
            // Not the user's P2PD_LOG: a test that reads the log needs `info`.
            .env(
                "P2PD_LOG",
                match (&self.log_filter, self.capture_log) {
                    (Some(f), true) => f.as_str(),
                    (None, true) => "info",
                    (_, false) => "warn",
                },
            )
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if self.capture_log {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())?;
            cmd.stderr(log);
        }
        Ok(cmd.spawn()?)
    }

    async fn launch(&mut self) -> Result<()> {
        self.child = Some(self.spawn_raw()?);
        let admin = self.wait_ready().await?;
        let info = admin.node_info().await?;
        self.peer_id = info.peer_id.clone();
        let tcp = info
            .listen_addrs
            .iter()
            .find(|a| a.contains("/tcp/"))
            .context("no TCP listen address")?;
        self.addr = format!("{tcp}/p2p/{}", info.peer_id);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<Client> {
        for _ in 0..200 {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("p2pd exited early: {status}");
            }
            if self.socket.exists()
                && let Ok(c) = self.admin().await
                && let Ok(i) = c.node_info().await
                && !i.listen_addrs.is_empty()
            {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("p2pd at {} did not become ready", self.socket.display())
    }

    /// The admin token of this node.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin.token"))
            .expect("admin token")
            .trim()
            .to_owned()
    }

    /// An admin session (no reconnection).
    pub async fn admin(&self) -> guest_api::Result<Client> {
        Client::builder()
            .socket(&self.socket)
            .token(self.admin_token())
            .name("test-admin")
            .no_reconnect()
            .connect()
            .await
    }

    /// Issues a token for `app` and opens a session with it.
    pub async fn app(&self, app: &str) -> Result<Client> {
        let token = self.admin().await?.issue_token(app).await?;
        Ok(Client::builder()
            .socket(&self.socket)
            .token(token)
            .name(app)
            .connect()
            .await?)
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let pid = child.id().context("no pid")? as i32;
        // SIGTERM through the kill(1) command keeps this crate free of unsafe FFI.
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        Ok(tokio::time::timeout(Duration::from_secs(10), child.wait()).await??)
    }

    /// Kills the process with SIGKILL.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Starts p2pd again on the same data directory.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop().await?;
        }
        self.launch().await
    }
}

/// Starts `n` nodes in a chain: node i bootstraps only from node i-1, so the
/// far ends learn of each other only through the DHT.
pub async fn chain(n: usize) -> Result<Vec<TestNode>> {
    let mut nodes: Vec<TestNode> = Vec::with_capacity(n);
    for i in 0..n {
        let bootstrap = if i == 0 {
            vec![]
        } else {
            vec![nodes[i - 1].addr.clone()]
        };
        nodes.push(
            TestNode::start(NodeOpts {
                bootstrap,
                ..Default::default()
            })
            .await?,
        );
    }
    Ok(nodes)
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deterministic, incompressible-looking bytes (xorshift), for test items.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A benchmark's mode and item size: a full run under `cargo bench` (the
/// `--bench` flag) with `full_mib`, else a quick smoke run with `smoke_mib` (as
/// `cargo test --all-targets` runs bench binaries); `P2PVM_BENCH_MIB` overrides.
pub fn bench_size(full_mib: usize, smoke_mib: usize) -> (bool, usize) {
    let full = std::env::args().any(|a| a == "--bench");
    let mib = std::env::var("P2PVM_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { full_mib } else { smoke_mib });
    (full, mib)
}

/// The median of some timings (benchmarks run a few repetitions).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Reads a stream to its end, discarding the bytes; returns how many there were.
pub async fn drain(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

/// Starts a node bootstrapped from `bootstrap`, with optional TOML config.
pub async fn node_with(bootstrap: &[&TestNode], config: Option<String>) -> Result<TestNode> {
    TestNode::start(NodeOpts {
        bootstrap: bootstrap.iter().map(|n| n.addr.clone()).collect(),
        config_toml: config,
        ..Default::default()
    })
    .await
}

/// A clock a test moves for one node's certificate checks
/// (`content.test_clock_offset_file`): expiry is tested by moving it, not by
/// waiting for it.
#[derive(Debug)]
pub struct TestClock {
    dir: tempfile::TempDir,
}

impl TestClock {
    /// A clock at the system's time.
    pub fn new() -> Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("offset")
    }

    /// The config that hands this clock to a node.
    pub fn config(&self) -> String {
        format!("[content]\ntest_clock_offset_file = {:?}\n", self.file())
    }

    /// Puts the node's clock `secs` ahead of the system's.
    pub fn advance(&self, secs: i64) -> Result<()> {
        std::fs::write(self.file(), secs.to_string())?;
        Ok(())
    }
}

/// Whether `path` exists as a Unix socket.
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Two nodes, the second bootstrapped from the first.
pub async fn pair() -> Result<(TestNode, TestNode)> {
    let a = TestNode::start(NodeOpts::default()).await?;
    let b = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        ..Default::default()
    })
    .await?;
    // `a` can only reach `b` once b's bootstrap dial has landed.
    let admin = a.admin().await?;
    eventually(Duration::from_secs(30), "the pair connected", || async {
        let peers = admin.peers().await.ok()?;
        peers.iter().any(|p| p.peer_id == b.peer_id).then_some(())
    })
    .await?;
    Ok((a, b))
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .parse()
        .with_context(|| format!("{field} of {pid}"))
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may itself hold spaces.
    let rest = stat.rsplit_once(')').context("no command name")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / clock_ticks())
}

/// A competing process that keeps one core busy until dropped: benchmarks
/// report their figures with and without it, for a machine that is not idle.
#[derive(Debug)]
pub struct CpuHog(std::process::Child);

impl CpuHog {
    /// Starts the busy loop (a shell spinning on `:`).
    pub fn start() -> Result<Self> {
        Ok(Self(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()?,
        ))
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the `openssl` CLI in `dir` (tests make CAs, certificates and CRLs
/// with it, as an operator would), failing with its stderr.
pub fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA (`ca.pem`, `ca.key`: P-256, 30 days, CA and CRL-signing usages) made
/// with the `openssl` CLI in `dir`, as docs/security.md shows.
pub fn openssl_ca(dir: &Path, subject: &str) -> Result<()> {
    let mut args: Vec<&str> = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
         -keyout ca.key -out ca.pem -days 30 -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign -subj"
        .split_whitespace()
        .collect();
    args.push(subject);
    openssl(dir, &args)
}

/// Fetches a whole item (kept in the node's store when `keep`), or the API
/// error the fetch got; an error reading the stream fails the test.
pub async fn fetch_or_refusal(
    c: &Client,
    id: &str,
    keep: bool,
) -> Result<Result<Vec<u8>, guest_api::Error>> {
    use tokio::io::AsyncReadExt;
    let (_, mut s) = match c.fetch_content(id, 0, 0, keep).await {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .await
        .context("reading the stream")?;
    Ok(Ok(out))
}

/// Publishes `data` as an item named `name` with default rights; its id.
pub async fn publish_named(c: &Client, name: &str, data: &[u8]) -> Result<String> {
    let meta = guest_api::proto::ContentPublishRequest {
        name: name.into(),
        ..Default::default()
    };
    Ok(c.publish_content(meta, data).await?.content_id)
}

/// Fetches a whole item, kept in the node's store; any refusal fails.
pub async fn fetch_whole(c: &Client, id: &str) -> Result<Vec<u8>> {
    Ok(fetch_or_refusal(c, id, true).await??)
}

/// Flips a bit every 4 KiB of each stored item's bytes (the node stopped).
pub fn rot_store(node: &TestNode) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(node.data_dir().join("content/blobs"))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "data") {
            let mut bytes = std::fs::read(&p)?;
            for i in (100..bytes.len()).step_by(4096) {
                bytes[i] ^= 0x10;
            }
            std::fs::write(&p, bytes)?;
            n += 1;
        }
    }
    Ok(n)
}
