//! The split platform under test: `p2pvmm up` in sandbox mode, in a temporary
//! home, with the service side listening on loopback.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use guest_api::Client;
use tokio::process::Child;

use crate::{bin, clamd_socket};

/// One running `p2pvmm up`.
#[derive(Debug)]
pub struct Platform {
    /// The state directory.
    pub home: PathBuf,
    _tmp: tempfile::TempDir,
    child: Option<Child>,
    /// The service side's peer id.
    pub peer_id: String,
    /// Its TCP multiaddr with /p2p/ suffix.
    pub addr: String,
    /// Where `p2pvmm up --metrics` serves the sides' states and the
    /// front-end's channel figures.
    pub figures_port: u16,
}

impl Platform {
    /// Starts the platform; the service side bootstraps from `bootstrap` and
    /// scans with the tests' clamd.
    pub async fn up(bootstrap: &[String]) -> Result<Self> {
        let config = format!(
            "[virus]\nclamd_socket = \"{}\"\ndatabase_dir = \"{}\"\n",
            clamd_socket().display(),
            crate::clamd_database_dir().display()
        );
        Self::up_with(bootstrap, &config).await
    }

    /// Starts the platform with the service side's p2pd config `config`.
    pub async fn up_with(bootstrap: &[String], config: &str) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("p2pvmm-").tempdir()?;
        let home = tmp.path().join("home");
        let cfg = tmp.path().join("p2pd.toml");
        std::fs::write(&cfg, config)?;
        let figures_port = crate::scrape::free_port()?;
        let mut cmd = crate::command(bin("p2pvmm"));
        cmd.arg("--home")
            .arg(&home)
            .args(["up", "--isolation", "sandbox", "--config"])
            .arg(&cfg)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{figures_port}"))
            .args(["--", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"]);
        for b in bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        cmd.env("P2PVM_BIN_DIR", crate::bin_dir())
            .env("P2PVMM_LOG", "warn")
            .env("P2P_FRONTEND_LOG", "warn")
            .env("P2PD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let mut p = Self {
            home,
            _tmp: tmp,
            child: Some(cmd.spawn()?),
            peer_id: String::new(),
            addr: String::new(),
            figures_port,
        };
        let admin = p.wait_ready().await?;
        let info = admin.node_info().await?;
        p.peer_id = info.peer_id.clone();
        let tcp = info
            .listen_addrs
            .iter()
            .find(|a| a.contains("/tcp/"))
            .context("no TCP listen address")?;
        p.addr = format!("{tcp}/p2p/{}", info.peer_id);
        Ok(p)
    }

    /// The socket apps use: the front-end's.
    pub fn socket(&self) -> PathBuf {
        self.home.join("api.sock")
    }

    /// The service side's data directory.
    pub fn service_dir(&self) -> PathBuf {
        self.home.join("service")
    }

    /// Host pid of the sandboxed p2pd.
    pub fn service_pid(&self) -> Result<u32> {
        Ok(std::fs::read_to_string(self.home.join("run/service.pid"))?
            .trim()
            .parse()?)
    }

    /// Pid of the front-end.
    pub fn frontend_pid(&self) -> Result<u32> {
        Ok(std::fs::read_to_string(self.home.join("run/frontend.pid"))?
            .trim()
            .parse()?)
    }

    fn admin_token(&self) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.service_dir().join("admin.token"))?
                .trim()
                .to_owned(),
        )
    }

    /// An admin session through the front-end.
    pub async fn admin(&self) -> Result<Client> {
        Ok(Client::builder()
            .socket(self.socket())
            .token(self.admin_token()?)
            .name("test-admin")
            .no_reconnect()
            .connect()
            .await?)
    }

    /// An app session (reconnecting) through the front-end.
    pub async fn app(&self, name: &str) -> Result<Client> {
        let token = self.admin().await?.issue_token(name).await?;
        Ok(Client::builder()
            .socket(self.socket())
            .token(token)
            .name(name)
            .connect()
            .await?)
    }

    async fn wait_ready(&mut self) -> Result<Client> {
        for _ in 0..300 {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("p2pvmm exited early: {status}");
            }
            if crate::is_socket(&self.socket())
                && let Ok(c) = self.admin().await
                && let Ok(i) = c.node_info().await
                && !i.listen_addrs.is_empty()
            {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the platform under {} did not come up", self.home.display())
    }

    /// Runs `command` in the operator's console (inside the service sandbox).
    pub async fn console(&self, command: &[&str]) -> Result<std::process::Output> {
        Ok(crate::command(bin("p2pvmm"))
            .arg("--home")
            .arg(&self.home)
            .args(["--log", "warn", "console", "service", "--"])
            .args(command)
            .env("P2PVM_BIN_DIR", crate::bin_dir())
            .output()
            .await?)
    }

    /// Stops the platform with SIGTERM.
    pub async fn down(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let pid = child.id().context("no pid")?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        Ok(tokio::time::timeout(Duration::from_secs(15), child.wait()).await??)
    }
}
