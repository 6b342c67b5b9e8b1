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
mod error;
mod events;
mod fastpath;
mod fetch;
mod items;
mod portmap;
pub(crate) use fetch::open_protocol;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub(crate) mod group_topics;
#[doc(hidden)]
pub mod probe;
mod providers;
mod publish;
mod rights;
mod search;
mod server;
mod slots;
mod types;
mod verdicts;
pub(crate) mod wire;

pub use error::{ContentServiceError, LocalError, ProviderError, Unavailable, VerifyError};
pub use events::ContentEvent;
pub(crate) use types::now_unix;
pub use types::{ContentInfo, PublishMeta, VerifiedManifest, content_key, guess_mime, keyword_key};

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use libp2p::PeerId;
use p2pvm_content::{ContentId, Store};
use tracing::{info, warn};

use crate::config::ContentConfig;
use crate::context::NodeContext;
use crate::report::chain;

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

/// How many ended downloads [`ContentService::transfers`] still shows.
const ENDED_SHOWN: usize = 16;

fn transfer_of(d: &fetch::Download) -> Transfer {
    let size = d.partial.size();
    Transfer {
        id: d.id,
        name: d.manifest.manifest.name.clone(),
        held_bytes: (d.partial.held() * p2pvm_content::BLOCK_BYTES).min(size),
        size,
        state: "running",
    }
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
    limiter: Option<server::Limiter>,
    /// The upload caps of throttled peers.
    throttles: server::PeerThrottles,
    /// Content streams being served, per peer (capped).
    served: Arc<server::PeerStreams>,
    /// Who this node sends blocks to at the moment.
    upload_slots: slots::UploadSlots,
    /// Searches answered per peer (rate-limited).
    search_limits: server::SearchLimits,
    /// Answer batches computed and not yet sent, node-wide (bounded).
    serve_permits: Arc<tokio::sync::Semaphore>,
    /// Answer batches computed and not yet sent, per peer (bounded).
    peer_batches: server::PeerBatches,
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

/// The system clock plus the seconds in `file` (tests of expiry only; see
/// `ContentConfig::test_clock_offset_file`).
fn offset_clock(file: std::path::PathBuf) -> p2pvm_security::groups::Clock {
    p2pvm_security::groups::Clock::from_fn(move || {
        let offset: i64 = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        now.saturating_add(offset).max(0) as u64
    })
}
impl ContentService {
    /// Starts serving the transfer protocol over the node's store and
    /// re-announces stored items.
    pub fn start(ctx: NodeContext) -> Result<Self, ContentServiceError> {
        let data_dir = ctx.config.data_dir.clone();
        let virus = &ctx.config.virus;
        let drm = &ctx.config.drm;
        let credit = ctx.config.credit.clone();
        let listen = ctx.config.listen.clone();
        let config = ctx.config.content.clone();
        let key = &ctx.key;
        let local = key.public().to_peer_id();
        let mut groups = p2pvm_security::Groups::open(&data_dir.join("groups"), local)
            .map_err(|e| ContentServiceError::from(LocalError::Groups(e)))?;
        if let Some(file) = config.test_clock_offset_file.clone() {
            warn!(file = %file.display(), "CLOCK FAULT INJECTION IS ON: group certificates are checked at a time a test moves (tests only)");
            groups = groups.with_clock(offset_clock(file));
        }
        let groups = Arc::new(groups);
        let fast_path = if config.fast_path {
            let fast = fastpath::FastPath::new(key)
                .and_then(|f| f.with_groups(groups.clone(), key))
                .map_err(|e| ContentServiceError::from(LocalError::FastPath(e)))?;
            Some(fast)
        } else {
            None
        };
        let rights = rights::Rights::load(drm, local, groups)?;
        if config.test_silent_server {
            warn!(
                "CONTENT FAULT INJECTION IS ON: this node answers no content request (tests only)"
            );
        }
        if config.test_wrong_group_keys {
            warn!("GROUP FAULT INJECTION IS ON: this node hands out wrong topic keys (tests only)");
        }
        let filter = ctx.virus.clone();
        let ping = filter.enabled().then(|| filter.clone());
        let budget = budget::Budget::new(config.memory_budget_bytes / p2pvm_content::BLOCK_BYTES);
        let read_ahead = Arc::new(tokio::sync::Semaphore::new(
            (config.read_ahead_bytes / fetch::READ_AHEAD_UNIT)
                .min(tokio::sync::Semaphore::MAX_PERMITS as u64) as usize,
        ));
        let verdicts = filter.enabled().then(|| {
            verdicts::Verdicts::open(&data_dir.join("verdicts.redb"), virus.database_dir.clone())
        });
        let verdicts = match verdicts {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                warn!(error = %chain(&e), "cannot open the verdict cache: every fetch is scanned");
                None
            }
            None => None,
        };
        let ban_secs = virus.ban_hours * 3600.0;
        let svc = Self {
            inner: Arc::new(Inner {
                ctx,
                ban_secs,
                credit,
                limiter: server::Limiter::new(config.upload_rate_bytes_per_sec),
                throttles: server::PeerThrottles::default(),
                served: Arc::default(),
                upload_slots: slots::UploadSlots::new(
                    config.upload_slots as usize,
                    config.upload_rate_bytes_per_sec,
                ),
                search_limits: server::SearchLimits::default(),
                serve_permits: Arc::new(tokio::sync::Semaphore::new(server::BATCHES_IN_FLIGHT)),
                peer_batches: server::PeerBatches::default(),
                config,
                downloads: Mutex::new(HashMap::new()),
                ended: Mutex::default(),
                events: events::ContentEvents::default(),
                fast_path,
                fast_path_port: std::sync::atomic::AtomicU16::new(0),
                local_readers: Arc::new(tokio::sync::Semaphore::new(32)),
                read_ahead,
                budget,
                verdicts,
                rights,
                group_messages: Arc::new(tokio::sync::Semaphore::new(32)),
            }),
        };
        if let Some(f) = ping {
            let primed = svc.clone();
            svc.spawn(async move {
                match f.ping().await {
                    Ok(()) => {
                        info!(clamd = %f.describe(), "virus filter ready");
                        // Learn clamd's version now, so cached verdicts stay
                        // usable if clamd is away later.
                        if let Some(v) = &primed.inner.verdicts {
                            v.fingerprint(&f).await;
                        }
                    }
                    Err(e) => {
                        warn!(error = %chain(&e), "virus filter cannot reach clamd: content will be refused until it can")
                    }
                }
            });
        }
        server::spawn(svc.clone());
        svc.watch_crls();
        if svc.inner.fast_path.is_some() {
            svc.listen_fast_path(&listen);
        }
        let again = svc.clone();
        svc.spawn(async move { again.announce_as_the_network_grows().await });
        Ok(svc)
    }

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

    /// Binds the fast path next to the first TCP listen address. A node that
    /// cannot still serves everything over libp2p.
    fn listen_fast_path(&self, listen: &[String]) {
        let port = self.inner.config.fast_path_port;
        let Some(addr) = fastpath::listen_addr(listen, port) else {
            info!("no TCP listen address: the content fast path is off");
            return;
        };
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std);
        match bound {
            Ok(l) => {
                let bound = l.local_addr().ok();
                let port = bound.map_or(0, |a| a.port());
                self.inner
                    .fast_path_port
                    .store(port, std::sync::atomic::Ordering::Release);
                fastpath::spawn_server(self.clone(), l);
                if let Some(bound) = bound
                    && self.inner.ctx.config.nat.upnp
                {
                    portmap::spawn(self, bound);
                }
            }
            Err(e) => warn!(%addr, error = %chain(&e), "cannot listen for the content fast path"),
        }
    }

    /// The block memory budget in bytes: (in use, most ever in use, total).
    pub fn memory(&self) -> (u64, u64, u64) {
        let b = &self.inner.budget;
        let (used, peak) = b.usage();
        let block = p2pvm_content::BLOCK_BYTES;
        (used * block, peak * block, b.total() * block)
    }

    /// The downloads running now, largest share held first, then the
    /// latest to end, newest first.
    pub fn transfers(&self) -> Vec<Transfer> {
        let downloads: Vec<Arc<fetch::Download>> = self
            .inner
            .downloads
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect();
        let mut out: Vec<Transfer> = downloads
            .iter()
            .map(|d| Transfer {
                state: "running",
                ..transfer_of(d)
            })
            .collect();
        out.sort_by(|a, b| {
            // Shares compared without division (and without overflow).
            (u128::from(b.held_bytes) * u128::from(a.size.max(1)))
                .cmp(&(u128::from(a.held_bytes) * u128::from(b.size.max(1))))
                .then(a.id.0.cmp(&b.id.0))
        });
        out.extend(self.inner.ended.lock().expect("lock").iter().rev().cloned());
        out
    }

    /// Keeps how a download ended among the latest.
    pub(crate) fn transfer_ended(&self, d: &fetch::Download, state: &'static str) {
        let mut ended = self.inner.ended.lock().expect("lock");
        if ended.len() == ENDED_SHOWN {
            ended.pop_front();
        }
        ended.push_back(Transfer {
            state,
            ..transfer_of(d)
        });
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

    /// Streams verified bytes of `range` (the whole item when `None`), blocks in
    /// playback order. The item is kept and provided to others when `keep` is
    /// set and the whole item was asked for.
    pub async fn fetch(
        &self,
        id: &ContentId,
        range: Option<Range<u64>>,
        keep: bool,
    ) -> Result<
        (
            ContentInfo,
            Range<u64>,
            impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
        ),
        ContentServiceError,
    > {
        fetch::open_reader(self, id, range, keep).await
    }

    /// A buffer of up to `want` bytes to hold ahead of a client (a bulk
    /// ring), charged to the node's read-ahead pool while the returned
    /// permit lives: the largest power of two the pool has room for, else
    /// 64 KiB uncharged.
    pub(crate) fn charge_buffer(
        &self,
        want: u64,
    ) -> (u64, Option<tokio::sync::OwnedSemaphorePermit>) {
        fetch::charge_buffer(&self.inner.read_ahead, want)
    }

    /// Downloads a whole item into the store (swarm-friendly order) and returns
    /// once it is stored.
    pub async fn download(&self, id: &ContentId) -> Result<ContentInfo, ContentServiceError> {
        fetch::download(self, id, &[]).await
    }

    /// [`Self::download`], asking `sources` first (see [`Self::stat_from`]).
    pub async fn download_from(
        &self,
        id: &ContentId,
        sources: &[PeerId],
    ) -> Result<ContentInfo, ContentServiceError> {
        fetch::download(self, id, sources).await
    }

    /// Searches by keywords across the network, or by content id.
    pub async fn search(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<ContentInfo>, ContentServiceError> {
        search::search(self, query, limit).await
    }
}
