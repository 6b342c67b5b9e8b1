//! [`ClientBuilder`]: where the socket and the app token come from (the
//! builder, else the environment), and opening the session.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use super::{Client, TaskGuard};
use crate::conn::{self, Inner, Target};
use crate::error::{Error, Result};

/// Environment variable naming the API socket.
pub const ENV_SOCKET: &str = p2pvm_proto::env::API_SOCKET;
/// Environment variable holding the app token.
pub const ENV_TOKEN: &str = p2pvm_proto::env::TOKEN;
/// Environment variable naming a file that holds the app token.
pub const ENV_TOKEN_FILE: &str = p2pvm_proto::env::TOKEN_FILE;

/// The socket a node uses when nothing else is configured:
/// `~/.local/share/p2pvm/api.sock`.
pub fn default_socket_path() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("p2pvm/api.sock")
}

/// Configures and opens a [`Client`].
///
/// ```no_run
/// # async fn f() -> guest_api::Result<()> {
/// let client = guest_api::Client::builder()
///     .socket("/run/p2pvm/api.sock")
///     .token("p2pvm1.…")
///     .name("chat-demo")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    socket: Option<PathBuf>,
    token: Option<String>,
    name: Option<String>,
    no_reconnect: bool,
}

impl ClientBuilder {
    /// The API socket; default `$P2PVM_API_SOCKET`, else [`default_socket_path`].
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// The app token; default `$P2PVM_TOKEN`, else the contents of `$P2PVM_TOKEN_FILE`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// A name for the node's logs.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Turns automatic reconnection off (it is on by default).
    pub fn no_reconnect(mut self) -> Self {
        self.no_reconnect = true;
        self
    }

    fn resolve_token(&self) -> Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.trim().to_owned());
        }
        if let Ok(t) = std::env::var(ENV_TOKEN) {
            return Ok(t.trim().to_owned());
        }
        if let Some(f) = std::env::var_os(ENV_TOKEN_FILE) {
            return std::fs::read_to_string(&f)
                .map(|t| t.trim().to_owned())
                .map_err(|_| Error::NoToken);
        }
        Err(Error::NoToken)
    }

    /// Connects, authenticates and starts the session.
    pub async fn connect(self) -> Result<Client> {
        let target = Target {
            socket: self
                .socket
                .clone()
                .or_else(|| std::env::var_os(ENV_SOCKET).map(PathBuf::from))
                .unwrap_or_else(default_socket_path),
            token: self.resolve_token()?,
            name: self.name.clone().unwrap_or_else(|| "guest-api".into()),
            reconnect: !self.no_reconnect,
        };
        let (conn, welcome) = conn::dial(&target).await?;
        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            target,
            next_id: AtomicU64::new(1),
            out: Mutex::new(None),
            pending: Mutex::new(Default::default()),
            regs: Mutex::new(Default::default()),
            streams: Mutex::new(Default::default()),
            opened: Mutex::new(Default::default()),
            events,
            welcome: Mutex::new(welcome),
            generation: watch::channel(0).0,
        });
        let mut generation = inner.generation.subscribe();
        let task = tokio::spawn(conn::run(inner.clone(), conn));
        // The task publishes the sender before bumping the generation.
        let _ = generation.wait_for(|g| *g > 0).await;
        Ok(Client {
            inner,
            _task: Arc::new(TaskGuard(task)),
        })
    }
}
