//! The node context: what every service of `p2pd` shares, built once by the
//! daemon and handed to each of them.
//!
//! ```text
//!   daemon::run ─► NodeContext::new ─┬─► ContentService::start(ctx)
//!                                    ├─► ComputeService::start(ctx, content)
//!                                    └─► ApiService::new(ctx, content, compute, apps)
//! ```
//!
//! A service takes the node-wide parts from here (identity, libp2p node,
//! credit ledger, virus filter, store, tasks, shutdown, configuration,
//! metrics) and
//! keeps its own state private; services use each other only through their
//! public methods.

use std::sync::Arc;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::{PeerId, StreamProtocol};
use p2pvm_content::{Store, StoreError};
use p2pvm_security::{ClamdAddr, Ledger, VirusFilter};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{Config, VirusConfig};
use crate::metrics::Metrics;
use crate::node::NodeHandle;
use crate::report::chain;
use crate::tasks::Tasks;

/// The parts of the node every service shares. Cheap to clone.
#[derive(Clone)]
pub struct NodeContext {
    /// The node's configuration, validated.
    pub config: Arc<Config>,
    /// The node's identity: its libp2p key, which also signs manifests and
    /// receipts and proves the fast path's TLS certificates.
    pub key: Keypair,
    /// The libp2p node.
    pub node: NodeHandle,
    /// What this node observed of each peer.
    pub ledger: Arc<Ledger>,
    /// The virus filter content entering the node passes.
    pub virus: VirusFilter,
    /// The content store (`data_dir/content`).
    pub store: Arc<Store>,
    /// Every task any service starts, waited for at shutdown.
    pub tasks: Tasks,
    /// Cancelled when the node stops.
    pub shutdown: CancellationToken,
    /// The node's figures (`/metrics`).
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for NodeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeContext")
            .field("peer_id", &self.node.peer_id())
            .field("data_dir", &self.config.data_dir)
            .finish_non_exhaustive()
    }
}

impl NodeContext {
    /// Opens the store and sets up the virus filter the configuration asks
    /// for, around a running node.
    pub fn new(
        config: Config,
        key: Keypair,
        node: NodeHandle,
        ledger: Arc<Ledger>,
        registry: prometheus_client::registry::Registry,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let store = Arc::new(Store::open(&config.data_dir.join("content"))?);
        let virus = virus_filter(&config.virus);
        Ok(Self {
            metrics: Arc::new(Metrics::new(registry, ledger.clone(), virus.clone())),
            virus,
            config: Arc::new(config),
            key,
            node,
            ledger,
            store,
            tasks: Tasks::default(),
            shutdown,
        })
    }

    /// Starts a task under the node's supervision: it is stopped by the
    /// shutdown token like every task here, and shutdown waits for it.
    #[track_caller]
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Serves `protocol`: each inbound stream goes to `serve`, as a task the
    /// node supervises, until shutdown.
    #[track_caller]
    pub fn serve_protocol<F, Fut>(&self, protocol: StreamProtocol, serve: F)
    where
        F: Fn(PeerId, libp2p::Stream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut incoming = match self.node.stream_control().accept(protocol.clone()) {
            Ok(i) => i,
            Err(e) => {
                warn!(%protocol, error = %chain(&e), "cannot serve the protocol");
                return;
            }
        };
        let tasks = self.tasks.clone();
        let shutdown = self.shutdown.clone();
        self.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = incoming.next() => match next {
                        Some((peer, stream)) => {
                            tasks.spawn(serve(peer, stream));
                        }
                        None => return,
                    },
                }
            }
        });
    }
}

/// The filter `[virus]` asks for: clamd over its socket or TCP, or off
/// (development only, said loudly).
fn virus_filter(virus: &VirusConfig) -> VirusFilter {
    if !virus.enabled {
        warn!(
            "VIRUS FILTER IS OFF: content entering this node is not scanned (development only; set [virus] enabled = true)"
        );
        VirusFilter::off()
    } else if let Some(tcp) = &virus.clamd_tcp {
        VirusFilter::clamd(ClamdAddr::Tcp(tcp.clone()))
    } else {
        VirusFilter::clamd(ClamdAddr::Socket(virus.clamd_socket.clone()))
    }
}
