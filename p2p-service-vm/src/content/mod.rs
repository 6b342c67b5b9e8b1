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

mod announce;
mod budget;
pub(crate) mod crls;
mod error;
mod fastpath;
mod fetch;
pub(crate) use fetch::open_protocol;
pub(crate) use server::accept;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub(crate) mod group_topics;
#[doc(hidden)]
pub mod probe;
mod rights;
mod sealed;
mod search;
mod server;
mod slots;
mod verdicts;
pub(crate) mod wire;

pub use error::{ContentServiceError, LocalError, ProviderError, Unavailable, VerifyError, chain};

/// The most payload bytes a fast-path connection may carry before it is
/// replaced: half of what one sealed-frame key may seal.
pub const MAX_ROTATE_BYTES: u64 = sealed::BYTES_PER_KEY / 2;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::Stream;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use libp2p::kad::RecordKey;
use p2pvm_content::{
    ContentId, ItemInfo, Manifest, ManifestError, Rights, SignedManifest, Store, StoreError,
};
use p2pvm_security::{ClamdAddr, Ledger, Standing, Verdict, VirusFilter};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ContentConfig;
use crate::node::{NodeEvent, NodeHandle};

/// A manifest whose signature was checked.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    /// The id it describes.
    pub id: ContentId,
    /// The decoded fields.
    pub manifest: Manifest,
    /// The signed encoding, as stored and sent.
    pub signed: Vec<u8>,
}

impl VerifiedManifest {
    /// Decodes and verifies a signed manifest from anywhere.
    pub fn parse(signed: &[u8]) -> Result<Self, ManifestError> {
        let manifest = SignedManifest::verify_bytes(signed)?;
        Ok(Self {
            id: manifest.id()?,
            manifest,
            signed: signed.to_vec(),
        })
    }
}

/// What an app supplies when publishing.
#[derive(Debug, Clone, Default)]
pub struct PublishMeta {
    /// Human name.
    pub name: String,
    /// MIME type; guessed from the name when empty.
    pub mime_type: String,
    /// Search tags.
    pub tags: Vec<String>,
    /// Rights section.
    pub rights: Option<Rights>,
    /// Keep regardless of the quota.
    pub pin: bool,
}

/// An item as reported to apps.
#[derive(Debug, Clone)]
pub struct ContentInfo {
    /// Manifest.
    pub manifest: VerifiedManifest,
    /// Held in the local store.
    pub local: Option<ItemInfo>,
    /// Peers known to provide it.
    pub providers: Vec<PeerId>,
}

/// Tees what an import reads into a virus scan.
struct ScanningReader<R> {
    inner: R,
    scanner: Arc<Mutex<Option<p2pvm_security::Scanner>>>,
}

impl<R: std::io::Read> std::io::Read for ScanningReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0
            && let Some(s) = self.scanner.lock().expect("lock").as_mut()
        {
            s.blocking_feed(Bytes::copy_from_slice(&buf[..n]));
        }
        Ok(n)
    }
}

/// The DHT key under which providers of an item are announced.
pub fn content_key(id: &ContentId) -> RecordKey {
    let mut h = blake3::Hasher::new();
    h.update(b"p2pvm/content/v1/");
    h.update(&id.0);
    RecordKey::new(h.finalize().as_bytes())
}

/// The DHT key under which providers of items with a keyword are announced.
pub fn keyword_key(word: &str) -> RecordKey {
    let mut h = blake3::Hasher::new();
    h.update(b"p2pvm/keyword/v1/");
    h.update(word.as_bytes());
    RecordKey::new(h.finalize().as_bytes())
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Guesses a MIME type from a file name, for players and browsers.
pub fn guess_mime(name: &str) -> String {
    let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "mp3" => "audio/mpeg",
        "ogg" | "oga" => "audio/ogg",
        "flac" => "audio/flac",
        "wav" => "audio/wav",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "txt" | "md" => "text/plain; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "json" => "application/json",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
    .into()
}

pub(crate) struct Inner {
    pub store: Arc<Store>,
    pub virus: VirusFilter,
    pub ban_secs: f64,
    pub ledger: Arc<Ledger>,
    pub credit: crate::config::CreditConfig,
    pub key: Keypair,
    pub node: NodeHandle,
    pub config: ContentConfig,
    pub downloads: Mutex<HashMap<ContentId, Arc<fetch::Download>>>,
    pub limiter: Option<server::Limiter>,
    /// The upload caps of throttled peers.
    pub throttles: server::PeerThrottles,
    /// Content streams being served, per peer (capped).
    pub served: Arc<server::PeerStreams>,
    /// Who this node sends blocks to at the moment.
    pub upload_slots: slots::UploadSlots,
    /// Searches answered per peer (rate-limited).
    pub search_limits: server::SearchLimits,
    /// Answer batches computed and not yet sent, node-wide (bounded).
    pub serve_permits: Arc<tokio::sync::Semaphore>,
    /// Answer batches computed and not yet sent, per peer (bounded).
    pub peer_batches: server::PeerBatches,
    pub shutdown: CancellationToken,
    pub data_dir: std::path::PathBuf,
    /// The TLS identity of the fast path; `None` when it is off.
    pub fast_path: Option<fastpath::FastPath>,
    /// The port the fast path listens on (0: not listening).
    pub fast_path_port: std::sync::atomic::AtomicU16,
    /// Threads that read stored items for streams, one per stream while it
    /// lasts (a thread per chunk costs a hand-off each); capped, so readers
    /// that stall cannot pin the blocking pool. Streams beyond the cap read
    /// a chunk per short job.
    pub local_readers: Arc<tokio::sync::Semaphore>,
    /// What readers of stored items may read ahead of their clients, node
    /// wide, in `fetch::READ_AHEAD_UNIT` permits (`content.read_ahead_bytes`).
    pub read_ahead: Arc<tokio::sync::Semaphore>,
    /// Memory for blocks in flight and waiting for readers.
    pub budget: Arc<budget::Budget>,
    /// Clean verdicts per signature database (`None`: filter off, or the
    /// cache could not be opened).
    pub verdicts: Option<verdicts::Verdicts>,
    /// Every task the service starts (drivers, workers, readers, scans,
    /// servers): waited for at shutdown.
    pub tasks: crate::tasks::Tasks,
    /// The DRM checker and what it needs.
    pub rights: rights::Rights,
    /// Group-topic messages being opened at once (a flood waits for none:
    /// beyond this, messages are dropped).
    pub group_messages: Arc<tokio::sync::Semaphore>,
}

/// The node's content service. Cheap to clone.
#[derive(Clone)]
pub struct ContentService {
    pub(crate) inner: Arc<Inner>,
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
    /// Opens the store under `data_dir/content`, starts serving the transfer
    /// protocol and re-announces stored items.
    pub fn start(
        config: &crate::config::Config,
        key: Keypair,
        node: NodeHandle,
        ledger: Arc<Ledger>,
        shutdown: CancellationToken,
    ) -> Result<Self, ContentServiceError> {
        let data_dir = &config.data_dir;
        let virus = &config.virus;
        let drm = &config.drm;
        let credit = config.credit.clone();
        let listen = config.listen.clone();
        let config = config.content.clone();
        let local = key.public().to_peer_id();
        let mut groups = p2pvm_security::Groups::open(&data_dir.join("groups"), local)
            .map_err(|e| ContentServiceError::from(LocalError::Groups(e)))?;
        if let Some(file) = config.test_clock_offset_file.clone() {
            warn!(file = %file.display(), "CLOCK FAULT INJECTION IS ON: group certificates are checked at a time a test moves (tests only)");
            groups = groups.with_clock(offset_clock(file));
        }
        let groups = Arc::new(groups);
        let fast_path = if config.fast_path {
            let fast = fastpath::FastPath::new(&key)
                .and_then(|f| f.with_groups(groups.clone(), &key))
                .map_err(|e| ContentServiceError::from(LocalError::FastPath(e.into())))?;
            Some(fast)
        } else {
            None
        };
        let rights = rights::Rights::load(drm, local, groups)?;
        let store = Arc::new(Store::open(&data_dir.join("content"))?);
        if config.test_silent_server {
            warn!(
                "CONTENT FAULT INJECTION IS ON: this node answers no content request (tests only)"
            );
        }
        if config.test_wrong_group_keys {
            warn!("GROUP FAULT INJECTION IS ON: this node hands out wrong topic keys (tests only)");
        }
        let filter = if !virus.enabled {
            warn!(
                "VIRUS FILTER IS OFF: content entering this node is not scanned (development only; set [virus] enabled = true)"
            );
            VirusFilter::off()
        } else if let Some(tcp) = &virus.clamd_tcp {
            VirusFilter::clamd(ClamdAddr::Tcp(tcp.clone()))
        } else {
            VirusFilter::clamd(ClamdAddr::Socket(virus.clamd_socket.clone()))
        };
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
        let svc = Self {
            inner: Arc::new(Inner {
                store,
                virus: filter,
                ban_secs: virus.ban_hours * 3600.0,
                ledger,
                credit,
                key,
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
                node,
                config,
                downloads: Mutex::new(HashMap::new()),
                shutdown,
                data_dir: data_dir.to_owned(),
                fast_path,
                fast_path_port: std::sync::atomic::AtomicU16::new(0),
                local_readers: Arc::new(tokio::sync::Semaphore::new(32)),
                read_ahead,
                budget,
                verdicts,
                tasks: crate::tasks::Tasks::default(),
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
                        warn!(error = %e, "virus filter cannot reach clamd: content will be refused until it can")
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
    /// token like every task here, and [`ContentService::stopped`] waits for it.
    #[track_caller]
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tasks.spawn(task)
    }

    /// Starts supervised blocking work (a long-lived writer thread, say).
    #[track_caller]
    pub(crate) fn spawn_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.inner.tasks.spawn_blocking(work)
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
        match &self.inner.verdicts {
            Some(v) => v.check(&self.inner.virus, id).await,
            None => (false, None),
        }
    }

    /// Records that `id` was scanned clean by the signatures `fp` names.
    pub(crate) async fn remember_clean(&self, id: &ContentId, fp: Option<verdicts::Fingerprint>) {
        if let (Some(v), Some(fp)) = (&self.inner.verdicts, fp) {
            v.remember_clean(&self.inner.virus, id, fp).await;
        }
    }

    /// Waits until every task of the service has ended (after the shutdown
    /// token was cancelled), or `limit` passes; true if all ended.
    pub async fn stopped(&self, limit: std::time::Duration) -> bool {
        self.inner.tasks.stopped(limit).await
    }

    /// Tasks of the service still running.
    pub fn tasks_running(&self) -> usize {
        self.inner.tasks.running()
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
                let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
                self.inner
                    .fast_path_port
                    .store(port, std::sync::atomic::Ordering::Release);
                fastpath::spawn_server(self.clone(), l);
            }
            Err(e) => warn!(%addr, error = %e, "cannot listen for the content fast path"),
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
        &self.inner.store
    }

    pub(crate) fn emit(&self, event: NodeEvent) {
        let _ = self.inner.node.events.send(event);
    }

    /// Imports bytes read from `data` (blocking reader run off the async runtime),
    /// signs the manifest, stores both, and announces the item.
    pub async fn publish(
        &self,
        data: impl std::io::Read + Send + 'static,
        meta: PublishMeta,
    ) -> Result<ContentInfo, ContentServiceError> {
        if meta.name.len() > 1024 || meta.tags.len() > 64 || meta.tags.iter().any(|t| t.len() > 128)
        {
            return Err(ContentServiceError::BadRequest(
                "name ≤ 1024 bytes, ≤ 64 tags of ≤ 128 bytes".into(),
            ));
        }
        // Groups are named by id in the manifest; apps may use local names.
        let mut meta = meta;
        if let Some(r) = meta.rights.as_mut() {
            for g in r.allowed_groups.iter_mut() {
                match self.groups().resolve(g) {
                    Ok(id) => *g = id.to_string(),
                    Err(_) if g.parse::<p2pvm_security::GroupId>().is_ok() => {}
                    Err(e) => return Err(ContentServiceError::BadRequest(e.to_string())),
                }
            }
        }
        // The DRM checker sees the manifest before any byte is read: rights
        // already expired, or a certification policy this node fails, refuse
        // the publish outright.
        let chain = self.inner.rights.chain().to_vec();
        let draft = Manifest {
            publisher: self.inner.node.peer_id().to_base58(),
            tags: meta.tags.clone(),
            rights: meta.rights.clone(),
            publisher_certificates: chain.clone(),
            ..Default::default()
        };
        self.drm_publish(&draft)?;
        let store = self.inner.store.clone();
        let key = self.inner.key.clone();
        let pin = meta.pin;
        // The signatures this import is scanned by, to cache its verdict under.
        let fingerprint = match &self.inner.verdicts {
            Some(v) => v.fingerprint(&self.inner.virus).await,
            None => None,
        };
        // The bytes go to clamd as they are imported; the verdict decides, before
        // the item becomes visible, whether it is committed.
        let scanner = Arc::new(Mutex::new(Some(self.inner.virus.scanner())));
        let verdict: Arc<Mutex<Option<Result<Verdict, p2pvm_security::VirusError>>>> =
            Arc::new(Mutex::new(None));
        // Read in large pieces, so clamd gets few large chunks.
        let data = std::io::BufReader::with_capacity(
            1 << 20,
            ScanningReader {
                inner: data,
                scanner: scanner.clone(),
            },
        );
        let rt = tokio::runtime::Handle::current();
        let seen = verdict.clone();
        let (info, signed) = tokio::task::spawn_blocking(move || {
            let mut signed = Vec::new();
            let info = store.import(data, |id, size| {
                let scan = scanner.lock().expect("lock").take();
                let v = match scan {
                    Some(s) => s.blocking_finish(&rt),
                    None => Ok(Verdict::Clean),
                };
                let declined = match &v {
                    Ok(Verdict::Clean) => None,
                    Ok(Verdict::Infected(sig)) => Some(format!("malware: {sig}")),
                    Err(e) => Some(e.to_string()),
                };
                *seen.lock().expect("lock") = Some(v);
                if let Some(why) = declined {
                    return Err(StoreError::Declined(why));
                }
                let mime = if meta.mime_type.is_empty() {
                    guess_mime(&meta.name)
                } else {
                    meta.mime_type.clone()
                };
                let m = Manifest {
                    content_id: id.0.to_vec(),
                    name: meta.name.clone(),
                    mime_type: mime,
                    size,
                    publisher: String::new(),
                    created_unix: now_unix(),
                    tags: meta.tags.clone(),
                    rights: meta.rights.clone(),
                    publisher_certificates: chain.clone(),
                };
                signed = m.sign(&key)?.encode_to_vec();
                Ok(signed.clone())
            })?;
            if pin {
                store.set_pinned(&info.id, true)?;
            }
            // The item may have existed already; report the manifest stored with it.
            let stored = store.manifest(&info.id)?.unwrap_or(signed);
            Ok::<_, StoreError>((info, stored))
        })
        .await
        .map_err(ContentServiceError::task)?
        .map_err(|e| match (e, verdict.lock().expect("lock").take()) {
            (StoreError::Declined(_), Some(Ok(Verdict::Infected(sig)))) => {
                warn!(signature = %sig, "refused a local publish: malware");
                self.emit(NodeEvent::MalwareDetected {
                    id: ContentId([0; 32]),
                    signature: sig.clone(),
                    peers: Vec::new(),
                });
                ContentServiceError::malware(sig)
            }
            (StoreError::Declined(_), Some(Err(v))) => v.into(),
            (e, _) => e.into(),
        })?;
        let manifest = VerifiedManifest::parse(&signed)?;
        info!(id = %info.id, size = info.size, name = %manifest.manifest.name, "published");
        // Scanned clean as it was imported (else it would not be stored).
        self.remember_clean(&info.id, fingerprint).await;
        self.announce(&manifest).await;
        self.gc().await;
        Ok(ContentInfo {
            manifest,
            local: Some(info),
            providers: vec![self.inner.node.peer_id()],
        })
    }

    /// Publishes a file the node can read (host mode).
    pub async fn publish_path(
        &self,
        path: &Path,
        mut meta: PublishMeta,
    ) -> Result<ContentInfo, ContentServiceError> {
        if !self.inner.config.allow_path_publish {
            return Err(ContentServiceError::Denied(
                "publishing by path is disabled on this node; send the bytes instead".into(),
            ));
        }
        let path = path.to_owned();
        let (real, file) = self
            .blocking(move |svc| {
                let real = std::fs::canonicalize(&path).map_err(|e| {
                    ContentServiceError::BadRequest(format!("{}: {e}", path.display()))
                })?;
                let data_dir = std::fs::canonicalize(&svc.inner.data_dir)
                    .unwrap_or(svc.inner.data_dir.clone());
                // The node's own key and tokens live there; never let an app publish them.
                if real.starts_with(&data_dir) {
                    return Err(ContentServiceError::Denied(
                        "files inside the node's data directory cannot be published".into(),
                    ));
                }
                let file = std::fs::File::open(&real).map_err(|e| {
                    ContentServiceError::BadRequest(format!("{}: {e}", real.display()))
                })?;
                Ok((real, file))
            })
            .await??;
        if meta.name.is_empty() {
            meta.name = real
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        self.publish(file, meta).await
    }

    async fn gc(&self) {
        let quota = self.inner.config.quota_bytes;
        if quota == 0 {
            return;
        }
        let store = self.inner.store.clone();
        match tokio::task::spawn_blocking(move || store.gc(quota)).await {
            Ok(Ok(removed)) if !removed.is_empty() => {
                info!(
                    count = removed.len(),
                    "garbage-collected unpinned items over the quota"
                );
                for id in removed {
                    self.inner.rights.forget(&id);
                    let _ = self
                        .inner
                        .node
                        .send(crate::node::Command::StopProviding(content_key(&id)))
                        .await;
                }
            }
            Ok(Err(e)) => warn!(error = %e, "garbage collection failed"),
            _ => {}
        }
    }

    /// Items in the local store.
    pub async fn list(&self) -> Result<Vec<ContentInfo>, ContentServiceError> {
        self.blocking(|svc| {
            let me = svc.inner.node.peer_id();
            let mut out = Vec::new();
            for item in svc.inner.store.list()? {
                if let Some(m) = svc.local_manifest_blocking(&item.id)? {
                    out.push(ContentInfo {
                        manifest: m,
                        local: Some(item),
                        providers: vec![me],
                    });
                }
            }
            out.sort_by(|a, b| a.manifest.manifest.name.cmp(&b.manifest.manifest.name));
            Ok(out)
        })
        .await?
    }

    /// The verified manifest of a stored item (reads the index: call it on a
    /// blocking thread).
    pub(crate) fn local_manifest_blocking(
        &self,
        id: &ContentId,
    ) -> Result<Option<VerifiedManifest>, ContentServiceError> {
        match self.inner.store.manifest(id)? {
            Some(bytes) => Ok(Some(VerifiedManifest::parse(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Pins or unpins a stored item.
    pub async fn pin(&self, id: &ContentId, pinned: bool) -> Result<(), ContentServiceError> {
        let id = *id;
        self.blocking(move |svc| svc.inner.store.set_pinned(&id, pinned))
            .await??;
        Ok(())
    }

    /// Deletes a stored item and stops providing it.
    pub async fn delete(&self, id: &ContentId) -> Result<(), ContentServiceError> {
        let item = *id;
        self.blocking(move |svc| svc.inner.store.delete(&item))
            .await??;
        self.inner.rights.forget(id);
        let _ = self
            .inner
            .node
            .send(crate::node::Command::StopProviding(content_key(id)))
            .await;
        Ok(())
    }

    /// Everything known about an item: local first, else from providers.
    pub async fn stat(&self, id: &ContentId) -> Result<ContentInfo, ContentServiceError> {
        self.stat_from(id, &[]).await
    }

    /// [`Self::stat`], asking `sources` (peers known to hold the item, such
    /// as the requester of a compute job for its inputs) before the DHT,
    /// whose records of an item published a moment ago may not have spread.
    pub async fn stat_from(
        &self,
        id: &ContentId,
        sources: &[PeerId],
    ) -> Result<ContentInfo, ContentServiceError> {
        let item = *id;
        let local = self
            .blocking(move |svc| {
                let Some(m) = svc.local_manifest_blocking(&item)? else {
                    return Ok(None);
                };
                Ok::<_, ContentServiceError>(Some((m, svc.inner.store.get(&item)?)))
            })
            .await??;
        if let Some((manifest, local)) = local {
            return Ok(ContentInfo {
                manifest,
                local,
                providers: vec![self.inner.node.peer_id()],
            });
        }
        let sources: Vec<PeerId> = sources
            .iter()
            .filter(|p| self.standing(p) < Standing::Refused)
            .copied()
            .collect();
        if !sources.is_empty()
            && let Ok(proven) = fetch::manifest_from(self, id, &sources).await
        {
            return Ok(ContentInfo {
                manifest: proven.manifest,
                local: None,
                providers: sources,
            });
        }
        let providers = fetch::first_providers(self, id, 4).await;
        let manifest = fetch::manifest_from(self, id, &providers).await?.manifest;
        Ok(ContentInfo {
            manifest,
            local: None,
            providers,
        })
    }

    /// What the credit policy says about a peer.
    pub(crate) fn standing(&self, peer: &PeerId) -> Standing {
        self.inner.ledger.standing(peer)
    }

    /// Providers of `id`, usable ones only, best credit forecast first and
    /// in random order among equals: downloaders that know nothing of the
    /// providers yet spread over all of them instead of all asking the few
    /// the DHT happens to name first.
    pub(crate) async fn find_providers(&self, id: &ContentId, limit: usize) -> Vec<PeerId> {
        let mut found = self.find_providers_raw(id, limit).await;
        rand::seq::SliceRandom::shuffle(found.as_mut_slice(), &mut rand::thread_rng());
        let ledger = &self.inner.ledger;
        let mut ranked: Vec<(PeerId, p2pvm_security::PeerCredit)> = found
            .drain(..)
            .map(|p| (p, ledger.credit(&p)))
            .filter(|(_, c)| c.standing < Standing::Refused)
            .collect();
        ranked.sort_by(|a, b| {
            a.1.standing
                .cmp(&b.1.standing)
                .then(b.1.score.cmp(&a.1.score))
                .then(b.1.expected_bps.total_cmp(&a.1.expected_bps))
        });
        ranked.into_iter().map(|(p, _)| p).take(limit).collect()
    }

    async fn find_providers_raw(&self, id: &ContentId, limit: usize) -> Vec<PeerId> {
        let key = content_key(id);
        let me = self.inner.node.peer_id();
        let found = self
            .inner
            .node
            .call_timeout(std::time::Duration::from_secs(10), |reply| {
                crate::node::Command::FindProviders { key, limit, reply }
            })
            .await
            .unwrap_or_default();
        found.into_iter().filter(|p| *p != me).collect()
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
