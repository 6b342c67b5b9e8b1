//! Content sharing and media streaming: the node's store, the transfer
//! protocol's server, the multi-source fetcher, keyword search and the local
//! HTTP gateway.
//!
//! ```text
//!  app ──publish bytes──► ContentService ─► Store (redb index + blob files)
//!                               │  └─► DHT: provider records for the id and each keyword
//!  app ◄─verified bytes── Download ◄─ workers (one per provider, pipelined) ◄─ peers
//!                               └─► Partial (sparse file + tree) ─► served onwards
//! ```
//!
//! Blocks travel on the libp2p connection, or on the fast path (`fastpath`: a
//! TLS 1.3 connection of their own, several times faster) where both ends can.
//!
//! Every byte that reaches an app was checked against the content id: blocks
//! from peers are decoded against the BLAKE3 tree before they are written, and
//! stored items were hashed when they entered the store.
//!
//! The files, by job (this one holds the service's state and start-up):
//! - `types`: manifests, what apps publish and are told, DHT keys (a leaf);
//! - `publish`: an app's bytes scanned, checked, signed, stored, announced;
//! - `items`: the local items (list, pin, delete) and `stat`;
//! - `providers`, `announce`: finding an item's providers, announcing ours;
//! - `fetch/`: the multi-source fetcher behind downloads and streams;
//! - `server`: answering peers' requests; `slots`: who gets upload slots;
//! - `fastpath`: blocks over TLS 1.3 connections of their own (the TLS
//!   policy and the record layer are `security`'s `peer_tls`, `sealed`);
//! - `search`, `gateway`: keyword search, the local HTTP gateway;
//! - `rights`, `crls`, `group_topics`: the glue to `security`'s DRM checker
//!   and trusted groups;
//! - `budget`, `verdicts`, `wire`: block memory, cached virus verdicts, framing.

mod announce;
mod budget;
pub(crate) mod crls;
mod drm;
mod error;
mod events;
mod fastpath;
mod fetch;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub(crate) mod group_topics;
mod items;
mod limits;
mod portmap;
#[doc(hidden)]
pub mod probe;
mod providers;
mod publish;
mod rights;
mod search;
mod server;
mod slots;
mod start;
mod types;
mod verdicts;
pub(crate) mod wire;

pub use error::{ContentServiceError, LocalError, ProviderError, Unavailable, VerifyError};
pub use events::ContentEvent;
pub(crate) use types::now_unix;
pub use types::{ContentInfo, PublishMeta, VerifiedManifest, content_key, guess_mime, keyword_key};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use p2pvm_content::{ContentId, Store};

use crate::config::ContentConfig;
use crate::context::NodeContext;

/// A download in progress, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The item.
    pub id: ContentId,
    /// Its name, from the verified manifest.
    pub name: String,
    /// Verified bytes held so far.
    pub held_bytes: u64,
    /// The item's size.
    pub size: u64,
    /// `running`, or how it ended: `complete`, `failed`, `ended` (a stream
    /// whose readers were done).
    pub state: &'static str,
}

pub(crate) struct Inner {
    /// What the whole node shares: identity, node, ledger, virus filter,
    /// store, tasks, shutdown.
    ctx: NodeContext,
    ban_secs: f64,
    credit: crate::config::CreditConfig,
    config: ContentConfig,
    downloads: Mutex<HashMap<ContentId, Arc<fetch::Download>>>,
    /// The latest downloads to end (for the operator; newest last).
    ended: Mutex<std::collections::VecDeque<Transfer>>,
    limiter: Option<limits::Limiter>,
    /// The upload caps of throttled peers.
    throttles: limits::PeerThrottles,
    /// Content streams being served, per peer (capped).
    served: Arc<limits::PeerStreams>,
    /// Who this node sends blocks to at the moment.
    upload_slots: slots::UploadSlots,
    /// Searches answered per peer (rate-limited).
    search_limits: limits::SearchLimits,
    /// Answer batches computed and not yet sent, node-wide (bounded).
    serve_permits: Arc<tokio::sync::Semaphore>,
    /// Answer batches computed and not yet sent, per peer (bounded).
    peer_batches: limits::PeerBatches,
    /// What sessions are told of transfers, malware and group messages.
    events: events::ContentEvents,
    /// The TLS identity of the fast path; `None` when it is off.
    fast_path: Option<fastpath::FastPath>,
    /// The port the fast path listens on (0: not listening).
    fast_path_port: std::sync::atomic::AtomicU16,
    /// Threads that read stored items for streams, one per stream while it
    /// lasts (a thread per chunk costs a hand-off each); capped, so readers
    /// that stall cannot pin the blocking pool. Streams beyond the cap read
    /// a chunk per short job.
    local_readers: Arc<tokio::sync::Semaphore>,
    /// What readers of stored items may read ahead of their clients, node
    /// wide, in `fetch::READ_AHEAD_UNIT` permits (`content.read_ahead_bytes`).
    read_ahead: Arc<tokio::sync::Semaphore>,
    /// Memory for blocks in flight and waiting for readers.
    budget: Arc<budget::Budget>,
    /// Clean verdicts per signature database (`None`: filter off, or the
    /// cache could not be opened).
    verdicts: Option<verdicts::Verdicts>,
    /// The DRM checker and what it needs.
    rights: rights::Rights,
    /// Group-topic messages being opened at once (a flood waits for none:
    /// beyond this, messages are dropped).
    group_messages: Arc<tokio::sync::Semaphore>,
}

/// The node's content service. Cheap to clone.
#[derive(Clone)]
pub struct ContentService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ContentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentService").finish_non_exhaustive()
    }
}

impl ContentService {
    /// Starts a task the service supervises: it is stopped by the shutdown
    /// token like every task here, and shutdown waits for it (the node context's tasks).
    #[track_caller]
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.ctx.tasks.spawn(task)
    }

    /// Starts supervised blocking work (a long-lived writer thread, say).
    #[track_caller]
    pub(crate) fn spawn_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.inner.ctx.tasks.spawn_blocking(work)
    }

    /// Runs store or file work on a blocking thread, never on the async ones.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ContentService) -> T + Send + 'static,
    ) -> Result<T, ContentServiceError> {
        let svc = self.clone();
        tokio::task::spawn_blocking(move || work(&svc))
            .await
            .map_err(ContentServiceError::task)
    }

    /// Whether `id` was scanned clean by the current signatures; and their
    /// fingerprint, to record a clean scan under if not.
    pub(crate) async fn verdict_cached(
        &self,
        id: &ContentId,
    ) -> (bool, Option<verdicts::Fingerprint>) {
        let checked = match &self.inner.verdicts {
            Some(v) => v.check(&self.inner.ctx.virus, id).await,
            None => (false, None),
        };
        if checked.0 {
            self.inner.ctx.metrics.content.verdict_cache_hits.inc();
        }
        checked
    }

    /// Records that `id` was scanned clean by the signatures `fp` names.
    pub(crate) async fn remember_clean(&self, id: &ContentId, fp: Option<verdicts::Fingerprint>) {
        if let (Some(v), Some(fp)) = (&self.inner.verdicts, fp) {
            v.remember_clean(&self.inner.ctx.virus, id, fp).await;
        }
    }

    /// The block memory budget in bytes: (in use, most ever in use, total).
    pub fn memory(&self) -> (u64, u64, u64) {
        let b = &self.inner.budget;
        let (used, peak) = b.usage();
        let block = p2pvm_content::BLOCK_BYTES;
        (used * block, peak * block, b.total() * block)
    }

    /// The fast path's port, if it listens.
    pub fn fast_path_port(&self) -> Option<u16> {
        match self
            .inner
            .fast_path_port
            .load(std::sync::atomic::Ordering::Acquire)
        {
            0 => None,
            p => Some(p),
        }
    }

    /// The store (for tests and the gateway).
    pub fn store(&self) -> &Store {
        &self.inner.ctx.store
    }

    /// Content streams this node is serving to `peer` now.
    pub fn streams_served_to(&self, peer: &PeerId) -> usize {
        self.inner.served.count(peer)
    }

    pub(crate) fn emit(&self, event: ContentEvent) {
        self.inner.events.emit(event);
    }

    /// Content events from now on (each session has its own receiver).
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<ContentEvent> {
        self.inner.events.subscribe()
    }
}
