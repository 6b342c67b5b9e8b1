//! Wires a node together: data directory, lock, identity, credentials, libp2p
//! node, API service and its socket; runs until shutdown.

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use p2pvm_security::{Ledger, Policy, Weights};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{self, ApiService, apps::AppRegistry};
use crate::compute::{ComputeService, ComputeServiceError};
use crate::config::{Config, ConfigError};
use crate::content::ContentService;
use crate::context::NodeContext;
use crate::identity::{self, IdentityError};
use crate::node::{Node, NodeStartError};
use crate::report::chain;

/// Lock file that keeps two daemons off one data directory.
pub const LOCK_FILE: &str = "p2pd.lock";

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be prepared.
    #[error("Data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon holds the data directory.
    #[error("Data directory {0} is in use by another p2pd")]
    Locked(PathBuf),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The credential store could not be opened.
    #[error(transparent)]
    Apps(#[from] api::apps::AppsError),
    /// The libp2p node could not start.
    #[error(transparent)]
    Node(#[from] NodeStartError),
    /// The content store could not be opened.
    #[error("Content store: {0}")]
    Store(#[from] p2pvm_content::StoreError),
    /// The content service could not start.
    #[error("Content: {0}")]
    Content(#[from] crate::content::ContentServiceError),
    /// The compute service could not start.
    #[error("Compute: {0}")]
    Compute(#[from] ComputeServiceError),
    /// The credit ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] p2pvm_security::LedgerError),
    /// The API socket could not be bound.
    #[error(transparent)]
    Bind(#[from] api::server::BindError),
    /// The metrics address could not be bound.
    #[error("metrics address {addr}")]
    Metrics {
        /// `[metrics] listen`.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn open_ledger(dir: &std::path::Path, config: &Config) -> Result<Ledger, DaemonError> {
    let c = &config.credit;
    Ok(Ledger::open(
        &dir.join("credit.redb"),
        Weights::default(),
        Policy {
            throttle_below: c.throttle_below,
            refuse_below: c.refuse_below,
        },
        c.half_life_hours * 3600.0,
    )?)
}

/// How long shutdown waits for the service's tasks to end.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a node with `config` until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    config.validate()?;
    let dir = &config.data_dir.clone();
    let dir_err = |source| DaemonError::DataDir {
        path: dir.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(dir_err)?;
    let lock = File::create(dir.join(LOCK_FILE)).map_err(dir_err)?;
    if lock.try_lock().is_err() {
        return Err(DaemonError::Locked(dir.clone()));
    }

    let key = identity::load_or_create(dir)?;
    let apps = AppRegistry::open(dir)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let node = Node::start(key.clone(), &config, &mut registry)?;
    let handle = node.handle();
    let socket = config.api_socket_path();
    let listener = api::server::bind(&socket)?;

    let node_task = tokio::spawn(node.run(shutdown.clone()));
    let ledger = Arc::new(open_ledger(dir, &config)?);
    let ledger_task = tokio::spawn(crate::credit::run(
        ledger.clone(),
        handle.clone(),
        shutdown.clone(),
    ));
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            crate::metrics::server::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let ctx = NodeContext::new(
        config,
        key,
        handle.clone(),
        ledger,
        registry,
        shutdown.clone(),
    )?;
    let config = ctx.config.clone();
    let content = ContentService::start(ctx.clone())?;
    let compute = ComputeService::start(ctx.clone(), content.clone())?;
    let gateway = config.content.gateway.map(|addr| {
        let (c, s) = (content.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::content::gateway::serve(c, addr, s).await {
                tracing::error!(%addr, error = %chain(&e), "HTTP gateway failed");
            }
        })
    });
    let svc = ApiService::new(ctx.clone(), content, compute, apps);
    let metrics_task = metrics_listener.map(|l| {
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        let dashboard = config
            .metrics
            .serves_dashboard()
            .then(|| crate::dashboard::Dashboard::start(svc.clone(), port).routes());
        tokio::spawn(crate::metrics::server::serve(
            l,
            ctx.metrics.clone(),
            dashboard,
            shutdown.clone(),
        ))
    });
    info!(
        peer_id = %handle.peer_id(),
        socket = %socket.display(),
        data_dir = %dir.display(),
        mdns = config.mdns,
        "p2pd ready"
    );
    let backend = config.channel_source()?.map(|source| {
        let (svc, stop) = (svc.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::backend::serve(source, svc, stop.clone()).await {
                // Without its channel the service side is useless to the
                // client; exit so the supervisor restarts it.
                tracing::error!(error = %chain(&e), "channel back-end failed");
                stop.cancel();
            }
        })
    });
    api::server::serve(listener, svc.clone(), shutdown.clone()).await;
    if let Some(b) = backend {
        let _ = b.await;
    }
    if let Some(g) = gateway {
        let _ = g.await;
    }
    if let Some(m) = metrics_task {
        let _ = m.await;
    }
    // Every session, stream, transfer and server task watches the shutdown
    // token; wait for them, so nothing is cut off mid-write.
    let all_done = ctx.tasks.stopped(STOP_GRACE).await;
    let tasks_left = ctx.tasks.running();
    if !all_done {
        tracing::warn!(
            tasks_left,
            running = ?ctx.tasks.running_by_origin(),
            "tasks still running {}s after shutdown; leaving them",
            STOP_GRACE.as_secs()
        );
    }

    let _ = std::fs::remove_file(&socket);
    let _ = node_task.await;
    let _ = ledger_task.await;
    drop(lock);
    info!(tasks_left, "p2pd stopped");
    Ok(())
}
