//! Fetching from many providers at once.
//!
//! One [`Download`] exists per item being fetched; every reader of that item
//! (an app stream, the gateway, a bulk download) shares it. A driver task finds
//! providers in the DHT and runs one worker per provider; each worker keeps
//! up to `pipeline_depth` block requests in flight on a stream (on each of
//! `fast_path_connections` fast-path connections, where the provider offers
//! them) and asks the shared scheduler for the next block whenever a slot
//! frees up, so faster providers take more blocks.
//!
//! The scheduler hands out, in order of preference:
//! 1. missing blocks inside a reader's playback window (its next
//!    `streaming_window_blocks`), lowest first, so the first bytes and the bytes
//!    after a seek arrive fast;
//! 2. other wanted blocks, rarest among known providers first (random among
//!    equals), so a swarm spreads the publisher's upload instead of asking it
//!    for the same block N times;
//! 3. in the end game, a block another provider has had in flight for too
//!    long, so one slow or vanished provider cannot hold up the finish.
//!
//! A block that fails verification is dropped, the peer is excluded from this
//! download and reported ([`NodeEvent::CorruptData`]), and the block is fetched
//! from someone else. A provider that disappears returns its blocks to the pool.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{AsyncWriteExt, Stream};
use libp2p::{PeerId, StreamProtocol};
use p2pvm_content::transfer::{self, BlockRequest, Op, Status, TransferRequest, TransferResponse};
use p2pvm_content::{BLOCK_BYTES, ContentId, Partial, block_count, block_range};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::wire::{
    PayloadRead, PayloadWrite, read_msg, read_payload, read_payload_bytes, write_msg,
};
use super::{ContentInfo, ContentService, ContentServiceError, VerifiedManifest};
use crate::node::{Command, NodeEvent};
use p2pvm_security::{EventKind, Standing, Verdict, VirusError};

/// How long a block may be in flight before an idle provider may duplicate it.
const ENDGAME_AFTER: Duration = Duration::from_millis(400);
/// How often an idle worker re-asks a partial provider what it holds.
const HAVE_REFRESH: Duration = Duration::from_millis(500);
/// Time allowed to open a stream (including finding and dialling the peer).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a provider may leave requests unanswered before it is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a low-credit provider waits before its first request.
const THROTTLED_HEAD_START: Duration = Duration::from_secs(1);
/// Blocks a download that keeps nothing fetches ahead of each reader: they
/// wait in memory, so this bounds its memory (16 MiB per reader).
const RAM_AHEAD: u64 = 64;
/// How long a failed provider is left alone before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// How a transfer ended, as readers see it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Running,
    Complete,
    Failed(ContentServiceError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Missing,
    /// In flight at this many providers.
    Pending(u8),
    Held,
}

#[derive(Debug)]
enum Have {
    Unknown,
    All,
    Some(Vec<bool>),
}

impl Have {
    fn has(&self, k: u64) -> bool {
        match self {
            Have::Unknown => false,
            Have::All => true,
            Have::Some(v) => v.get(k as usize).copied().unwrap_or(false),
        }
    }
}

#[derive(Debug)]
struct Reader {
    id: u64,
    next: u64,
    end: u64,
}

#[derive(Debug)]
struct Sched {
    slots: Vec<Slot>,
    since: Vec<Option<Instant>>,
    rarity: Vec<u16>,
    readers: Vec<Reader>,
    next_reader: u64,
    window: u64,
    peers: HashMap<PeerId, Have>,
    /// Peers in the throttled credit band: used only for blocks that no
    /// better peer holds.
    throttled: HashSet<PeerId>,
    bad: HashSet<PeerId>,
    rng: u64,
    last_progress: Instant,
    held: u64,
}

impl Sched {
    fn new(blocks: u64, window: u64) -> Self {
        let n = blocks as usize;
        Self {
            slots: vec![Slot::Missing; n],
            since: vec![None; n],
            rarity: vec![0; n],
            readers: Vec::new(),
            next_reader: 1,
            window,
            peers: HashMap::new(),
            throttled: HashSet::new(),
            bad: HashSet::new(),
            rng: 0x9E37_79B9_7F4A_7C15
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1),
            last_progress: Instant::now(),
            held: 0,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift: only used to break ties between equally rare blocks.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn set_have(&mut self, peer: PeerId, have: Have) {
        let old = self.peers.insert(peer, Have::Unknown);
        for k in 0..self.slots.len() as u64 {
            let before = old.as_ref().is_some_and(|h| h.has(k));
            let after = have.has(k);
            let r = &mut self.rarity[k as usize];
            match (before, after) {
                (false, true) => *r = r.saturating_add(1),
                (true, false) => *r = r.saturating_sub(1),
                _ => {}
            }
        }
        self.peers.insert(peer, have);
    }

    fn forget_peer(&mut self, peer: &PeerId) {
        self.set_have(*peer, Have::Unknown);
        self.peers.remove(peer);
        self.throttled.remove(peer);
    }

    /// Whether block `k` is worth fetching: every block for a download that
    /// keeps the item, else only those a reader will soon read (what is
    /// fetched waits in memory until then).
    fn wanted(&self, k: u64, keep: bool) -> bool {
        keep || self.in_window(k)
    }

    /// Whether `k` is within some reader's memory window.
    fn in_window(&self, k: u64) -> bool {
        self.readers
            .iter()
            .any(|r| r.next <= k && k < r.end.min(r.next + RAM_AHEAD))
    }

    fn take(&mut self, k: u64) -> u64 {
        let i = k as usize;
        self.slots[i] = match self.slots[i] {
            Slot::Missing => Slot::Pending(1),
            Slot::Pending(n) => Slot::Pending(n + 1),
            Slot::Held => Slot::Held,
        };
        if self.since[i].is_none() {
            self.since[i] = Some(Instant::now());
        }
        k
    }

    /// The next block to ask `peer` for, or `None`.
    fn pick(
        &mut self,
        peer: &PeerId,
        keep: bool,
        mine: &HashSet<u64>,
        urgent: bool,
    ) -> Option<u64> {
        let n = self.slots.len() as u64;
        let start = if n == 0 { 0 } else { self.random() % n };
        let have = self.peers.get(peer)?;
        let low_credit = self.throttled.contains(peer);
        let better_has = |k: u64| {
            low_credit
                && self
                    .peers
                    .iter()
                    .any(|(p, h)| !self.throttled.contains(p) && h.has(k))
        };
        // 1. Playback windows, the most urgent reader first.
        let mut windows: Vec<(u64, u64)> = self
            .readers
            .iter()
            .map(|r| (r.next, (r.next + self.window).min(r.end)))
            .collect();
        windows.sort_unstable();
        for (from, to) in windows.iter().filter(|_| urgent) {
            for k in *from..*to {
                if self.slots[k as usize] == Slot::Missing && have.has(k) {
                    return Some(self.take(k));
                }
            }
        }
        // Where wanted blocks can be: anywhere for a download that keeps the
        // item (from a random place, to break ties), else only in the readers'
        // memory windows (a scan of the whole item per request cost 2 % of
        // a stream's CPU).
        let candidates = || -> Box<dyn Iterator<Item = u64> + '_> {
            if keep {
                Box::new((0..n).map(move |i| (start + i) % n))
            } else {
                Box::new(
                    self.readers
                        .iter()
                        .flat_map(|r| r.next..r.end.min(r.next + RAM_AHEAD)),
                )
            }
        };
        // 2. Rarest wanted block.
        let mut best: Option<(u16, u64)> = None;
        for k in candidates() {
            if self.slots[k as usize] == Slot::Missing
                && have.has(k)
                && self.wanted(k, keep)
                && !better_has(k)
                && best.is_none_or(|(r, _)| self.rarity[k as usize] < r)
            {
                best = Some((self.rarity[k as usize], k));
                if self.rarity[k as usize] <= 1 {
                    break;
                }
            }
        }
        if let Some((_, k)) = best {
            return Some(self.take(k));
        }
        // 3. End game: duplicate the longest-waiting block held up elsewhere.
        let now = Instant::now();
        let mut oldest: Option<(Instant, u64)> = None;
        for k in candidates() {
            let i = k as usize;
            if self.slots[i] == Slot::Pending(1)
                && have.has(k)
                && !better_has(k)
                && self.wanted(k, keep)
                && !mine.contains(&k)
                && let Some(t) = self.since[i]
                && now.duration_since(t) > ENDGAME_AFTER
                && oldest.is_none_or(|(o, _)| t < o)
            {
                oldest = Some((t, k));
            }
        }
        oldest.map(|(_, k)| self.take(k))
    }

    fn release(&mut self, k: u64) {
        let i = k as usize;
        self.slots[i] = match self.slots[i] {
            Slot::Pending(n) if n > 1 => Slot::Pending(n - 1),
            Slot::Pending(_) => {
                self.since[i] = None;
                Slot::Missing
            }
            other => other,
        };
    }

    fn held(&mut self, k: u64) -> bool {
        let i = k as usize;
        if self.slots[i] == Slot::Held {
            return false;
        }
        self.slots[i] = Slot::Held;
        self.since[i] = None;
        self.held += 1;
        self.last_progress = Instant::now();
        true
    }

    /// Whether every block wanted now is held: the whole item for a keeping
    /// download, else each reader's memory window (a paused reader owes
    /// nothing more until it reads on).
    fn satisfied(&self, keep: bool) -> bool {
        if keep {
            return self.held == self.slots.len() as u64;
        }
        self.readers.iter().all(|r| {
            (r.next..r.end.min(r.next + RAM_AHEAD)).all(|k| self.slots[k as usize] == Slot::Held)
        })
    }
}

/// An item being fetched, shared by all its readers.
pub(crate) struct Download {
    pub id: ContentId,
    pub manifest: VerifiedManifest,
    pub partial: Arc<Partial>,
    sched: Mutex<Sched>,
    /// Wakes idle workers and the driver.
    changed: Notify,
    /// Bumped whenever a block lands; readers wait on it.
    progress: watch::Sender<u64>,
    outcome: watch::Sender<Outcome>,
    keep: AtomicBool,
    cancel: CancellationToken,
    hints: Mutex<Vec<PeerId>>,
    /// A local failure that ended the transfer.
    fatal: Mutex<Option<ContentServiceError>>,
    /// Peers that delivered verified blocks (isolated together if it is malware).
    contributors: Mutex<HashSet<PeerId>>,
    /// The whole-item virus scan's verdict, once known.
    verdict: watch::Sender<Option<Result<Verdict, VirusError>>>,
    /// Malware was handled (peers isolated) already.
    malware: AtomicBool,
    /// The signature that was found, for readers stopped by another scan.
    malware_signature: Mutex<Option<String>>,
    /// The whole-item scan is running.
    scanning: AtomicBool,
    /// Verified blocks of a download that keeps nothing: they go from the
    /// network to the readers without touching the disk, and are dropped once
    /// every reader has passed them. Written to the file if the download is
    /// asked to keep the item after all.
    ram: Mutex<std::collections::BTreeMap<u64, Bytes>>,
}

impl Download {
    /// Ends the transfer for everyone with `error` (a local failure).
    fn fail(&self, error: ContentServiceError) {
        self.fatal.lock().expect("lock").get_or_insert(error);
        self.cancel.cancel();
    }

    fn keep(&self) -> bool {
        self.keep.load(Ordering::Acquire)
    }

    /// Whether verified bytes of block `k` are at hand (on disk or in memory).
    fn holds(&self, k: u64) -> bool {
        self.partial.has(k) || self.ram.lock().expect("lock").contains_key(&k)
    }

    /// Takes a verified block: into memory while the download keeps nothing
    /// (unless no reader wants it any more: then it is dropped), else into
    /// the file. True when the block is newly held.
    fn hold(&self, k: u64, block: Bytes) -> Result<bool, p2pvm_content::ContentError> {
        {
            // The same lock order as eviction (schedule, then memory), so a
            // block is never held in the schedule yet missing from memory.
            let mut s = self.sched.lock().expect("lock");
            let mut ram = self.ram.lock().expect("lock");
            if !self.keep() {
                if !s.in_window(k) {
                    s.release(k);
                    return Ok(false);
                }
                ram.insert(k, block);
                return Ok(s.held(k));
            }
        }
        self.partial.store_verified(k, &block)?;
        Ok(self.sched.lock().expect("lock").held(k))
    }

    /// From now on the download keeps the item: what waits in memory goes to
    /// the file (off the async threads), and nothing more is dropped.
    fn set_keep(self: &Arc<Self>) {
        if self.keep.swap(true, Ordering::AcqRel) {
            return;
        }
        let dl = self.clone();
        tokio::task::spawn_blocking(move || {
            // Readers look in memory, then in the file: the lock keeps a
            // block visible in one of them throughout.
            let mut ram = dl.ram.lock().expect("lock");
            while let Some((k, b)) = ram.pop_first() {
                if let Err(e) = dl.partial.store_verified(k, &b) {
                    dl.fail(ContentServiceError::Store(format!(
                        "writing block {k}: {e}"
                    )));
                    return;
                }
            }
            drop(ram);
            dl.progress.send_modify(|_| {});
            dl.changed.notify_waiters();
        });
    }

    /// Drops in-memory blocks outside every reader's window (passed, or far
    /// ahead of a slow reader another reader has left behind); they become
    /// missing again, for whoever reaches them later. So memory stays within
    /// a window per reader however the readers spread out.
    fn evict_passed(&self) {
        if self.keep() {
            return;
        }
        let mut s = self.sched.lock().expect("lock");
        let mut ram = self.ram.lock().expect("lock");
        let gone: Vec<u64> = ram.keys().copied().filter(|k| !s.in_window(*k)).collect();
        for k in gone {
            ram.remove(&k);
            if s.slots[k as usize] == Slot::Held {
                s.slots[k as usize] = Slot::Missing;
                s.held -= 1;
            }
        }
    }

    fn add_reader(&self, blocks: Range<u64>) -> u64 {
        let mut s = self.sched.lock().expect("lock");
        let id = s.next_reader;
        s.next_reader += 1;
        s.readers.push(Reader {
            id,
            next: blocks.start,
            end: blocks.end,
        });
        // New demand: the stall clock starts now, not at the last block.
        s.last_progress = Instant::now();
        drop(s);
        self.changed.notify_waiters();
        id
    }

    fn advance(&self, reader: u64, next: u64) {
        let mut s = self.sched.lock().expect("lock");
        if let Some(r) = s.readers.iter_mut().find(|r| r.id == reader) {
            r.next = next;
        }
        drop(s);
        self.evict_passed();
        self.changed.notify_waiters();
    }

    fn remove_reader(&self, reader: u64) {
        let mut s = self.sched.lock().expect("lock");
        s.readers.retain(|r| r.id != reader);
        let idle = s.readers.is_empty();
        drop(s);
        if idle && !self.keep() {
            self.cancel.cancel();
        }
        self.changed.notify_waiters();
    }
}

/// One request a worker has in flight.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Block(u64),
    Have,
}

impl Pending {
    fn block(&self) -> Option<u64> {
        match self {
            Pending::Block(k) => Some(*k),
            Pending::Have => None,
        }
    }
}

fn protocol() -> StreamProtocol {
    StreamProtocol::new(transfer::PROTOCOL)
}

/// Opens a content stream to `peer`, finding and dialling it through the DHT
/// when no connection exists yet.
pub(crate) async fn open_stream(
    svc: &ContentService,
    peer: PeerId,
) -> Result<libp2p::Stream, String> {
    let mut control = svc.inner.node.stream_control();
    let first = tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, protocol())).await;
    match first {
        Ok(Ok(s)) => return Ok(s),
        Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
            return Err("peer does not speak the content protocol".into());
        }
        _ => {}
    }
    let node = &svc.inner.node;
    let found = node
        .call_timeout(OPEN_TIMEOUT, |reply| Command::FindPeer(peer, reply))
        .await
        .map_err(|e| format!("cannot find {peer}: {e}"))?;
    node.call_timeout(OPEN_TIMEOUT, |reply| Command::Connect {
        peer: Some(peer),
        addrs: found.addrs,
        reply,
    })
    .await
    .map_err(|e| format!("cannot connect to {peer}: {e}"))?;
    tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, protocol()))
        .await
        .map_err(|_| "opening the stream timed out".to_string())?
        .map_err(|e| e.to_string())
}

async fn request(stream: &mut libp2p::Stream, op: Op) -> std::io::Result<()> {
    write_msg(stream, &TransferRequest { op: Some(op) }).await?;
    stream.flush().await
}

async fn response(stream: &mut libp2p::Stream) -> std::io::Result<TransferResponse> {
    read_msg(stream)
        .await?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "stream closed"))
}

/// Asks providers for the manifest of `id` until one verifies. A provider
/// that failed in transport (a connection closing under a simultaneous dial,
/// say) is asked once more after a pause before the lookup gives up.
pub(crate) async fn manifest_from(
    svc: &ContentService,
    id: &ContentId,
    providers: &[PeerId],
) -> Result<VerifiedManifest, ContentServiceError> {
    let mut last = ContentServiceError::NotFound(id.to_string());
    let mut again = Vec::new();
    for peer in providers.iter().take(8) {
        match manifest_once(svc, id, *peer).await {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e @ ContentServiceError::Unavailable(_)) => {
                again.push(*peer);
                last = e;
            }
            Err(e) => last = e,
        }
    }
    if !again.is_empty() {
        tokio::time::sleep(TRANSPORT_RETRY_PAUSE).await;
        for peer in again {
            match manifest_once(svc, id, peer).await {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

/// Pause before asking a provider again after a transport failure.
const TRANSPORT_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// One provider's answer: its verified manifest, `None` if it does not hold
/// the item, or why it could not be used.
async fn manifest_once(
    svc: &ContentService,
    id: &ContentId,
    peer: PeerId,
) -> Result<Option<VerifiedManifest>, ContentServiceError> {
    let mut stream = open_stream(svc, peer)
        .await
        .map_err(ContentServiceError::Unavailable)?;
    let got = async {
        request(&mut stream, Op::Manifest(id.0.to_vec())).await?;
        let header = response(&mut stream).await?;
        if header.status != Status::Ok as i32 {
            return Ok(None);
        }
        read_payload(
            &mut stream,
            header.payload_len,
            transfer::MAX_HEADER_BYTES as u64,
        )
        .await
        .map(Some)
    }
    .await
    .map_err(|e| ContentServiceError::Unavailable(e.to_string()))?;
    let Some(bytes) = got else {
        return Ok(None);
    };
    match VerifiedManifest::parse(&bytes) {
        Ok(m) if m.id == *id => match prove_size(svc, peer, &mut stream, &m).await {
            Ok(()) => Ok(Some(m)),
            Err(e) => {
                warn!(%peer, %id, error = %e, "manifest size not proven; ignoring it");
                Err(ContentServiceError::Verification(e))
            }
        },
        Ok(_) => {
            warn!(%peer, %id, "peer sent a manifest for another item");
            Err(ContentServiceError::Verification(
                "manifest for another item".into(),
            ))
        }
        Err(e) => {
            warn!(%peer, %id, error = %e, "peer sent a manifest that does not verify");
            Err(ContentServiceError::Verification(e.to_string()))
        }
    }
}

/// Anyone can sign a manifest for any id, so its size is checked before it
/// sizes anything: within the configured bound, and proven by the item's last
/// block, whose proof commits to the length (BLAKE3's tree shape depends on it).
async fn prove_size(
    svc: &ContentService,
    stream_peer: PeerId,
    stream: &mut libp2p::Stream,
    m: &VerifiedManifest,
) -> Result<(), String> {
    let size = m.manifest.size;
    if size > svc.inner.config.max_item_bytes {
        return Err(format!(
            "claimed size {size} is above content.max_item_bytes ({})",
            svc.inner.config.max_item_bytes
        ));
    }
    if size == 0 {
        return if m.id == ContentId::from(blake3::hash(b"")) {
            Ok(())
        } else {
            Err("claimed size 0 for a non-empty id".into())
        };
    }
    let last = block_count(size) - 1;
    let io = |e: std::io::Error| e.to_string();
    request(
        stream,
        Op::Block(BlockRequest {
            content_id: m.id.0.to_vec(),
            block: last,
        }),
    )
    .await
    .map_err(io)?;
    let header = response(stream).await.map_err(io)?;
    if header.status != Status::Ok as i32 {
        return Err(format!("last block refused: {}", header.message));
    }
    let wire = read_payload(stream, header.payload_len, transfer::block_wire(size, last))
        .await
        .map_err(io)?;
    let id = m.id;
    let verified = tokio::task::spawn_blocking(move || {
        p2pvm_content::block::verify(id, size, last, &wire, |_, _| {})
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Err(e) = verified {
        // The peer sent data that does not verify: that is on its record.
        let peer = stream_peer;
        svc.inner.ledger.record(peer, EventKind::CorruptBlock);
        svc.emit(NodeEvent::CorruptData {
            peer,
            id,
            block: last,
        });
        return Err(format!("last block does not verify: {e}"));
    }
    Ok(())
}

/// Returns the running download of `id`, starting one if needed.
async fn download_for(
    svc: &ContentService,
    id: &ContentId,
    keep: bool,
) -> Result<Arc<Download>, ContentServiceError> {
    let running = svc
        .inner
        .downloads
        .lock()
        .expect("lock")
        .get(id)
        .filter(|d| !d.cancel.is_cancelled())
        .cloned();
    if let Some(dl) = running {
        if keep {
            dl.sched.lock().expect("lock").last_progress = Instant::now();
            dl.set_keep();
            start_whole_scan(svc, &dl);
        }
        return Ok(dl);
    }
    // One provider is enough to start (the driver looks for more at once);
    // if it cannot give a valid manifest, ask more widely.
    let mut providers = svc.find_providers(id, 1).await;
    if providers.is_empty() {
        return Err(ContentServiceError::NotFound(id.to_string()));
    }
    let manifest = match manifest_from(svc, id, &providers).await {
        Ok(m) => m,
        Err(first) => {
            let tried = providers.clone();
            providers = svc.find_providers(id, 8).await;
            providers.retain(|p| !tried.contains(p));
            if providers.is_empty() {
                return Err(first);
            }
            manifest_from(svc, id, &providers).await?
        }
    };
    let size = manifest.manifest.size;
    let path = svc.inner.store.tmp_path("part");
    let partial = Partial::create(&path, *id, size)
        .map_err(|e| ContentServiceError::Store(format!("{}: {e}", path.display())))?;
    let fresh = Arc::new(Download {
        id: *id,
        manifest,
        partial: Arc::new(partial),
        sched: Mutex::new(Sched::new(
            block_count(size),
            svc.inner.config.streaming_window_blocks as u64,
        )),
        changed: Notify::new(),
        progress: watch::Sender::new(0),
        outcome: watch::Sender::new(Outcome::Running),
        keep: AtomicBool::new(keep),
        cancel: svc.inner.shutdown.child_token(),
        hints: Mutex::new(providers),
        fatal: Mutex::new(None),
        contributors: Mutex::new(HashSet::new()),
        verdict: watch::Sender::new(None),
        malware: AtomicBool::new(false),
        malware_signature: Mutex::new(None),
        scanning: AtomicBool::new(false),
        ram: Mutex::new(std::collections::BTreeMap::new()),
    });
    // Another request may have started it while we looked for the manifest.
    let raced = {
        let mut downloads = svc.inner.downloads.lock().expect("lock");
        // One that is winding down (cancelled) is replaced, not joined.
        match downloads
            .get(id)
            .filter(|d| !d.cancel.is_cancelled())
            .cloned()
        {
            Some(existing) => Some(existing),
            None => {
                downloads.insert(*id, fresh.clone());
                None
            }
        }
    };
    if let Some(dl) = raced {
        if keep {
            dl.set_keep();
            start_whole_scan(svc, &dl);
        }
        return Ok(dl);
    }
    let dl = fresh;
    if keep {
        // Downloaders serve what they hold, so announce at once: peers fetching
        // the same item find us while we are still fetching it.
        let _ = svc
            .inner
            .node
            .send(Command::Announce(super::content_key(id)))
            .await;
    }
    tokio::spawn(drive(svc.clone(), dl.clone()));
    if keep {
        start_whole_scan(svc, &dl);
    }
    Ok(dl)
}

/// Resolves a download's outcome and unregisters it however the driver ends,
/// a panic included, so no reader waits forever.
struct DriveGuard {
    svc: ContentService,
    dl: Arc<Download>,
}

impl Drop for DriveGuard {
    fn drop(&mut self) {
        let running = matches!(*self.dl.outcome.borrow(), Outcome::Running);
        if running {
            self.dl
                .outcome
                .send_replace(Outcome::Failed(ContentServiceError::Store(
                    "the transfer ended unexpectedly".into(),
                )));
        }
        let mut downloads = self
            .svc
            .inner
            .downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if downloads
            .get(&self.dl.id)
            .is_some_and(|d| Arc::ptr_eq(d, &self.dl))
        {
            downloads.remove(&self.dl.id);
        }
    }
}

async fn drive(svc: ContentService, dl: Arc<Download>) {
    let _guard = DriveGuard {
        svc: svc.clone(),
        dl: dl.clone(),
    };
    let id = dl.id;
    let cfg = &svc.inner.config;
    let stall = Duration::from_secs(cfg.stall_timeout_secs.max(1));
    let mut workers: HashMap<PeerId, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut retry: HashMap<PeerId, Instant> = HashMap::new();
    let mut next_lookup = Instant::now();
    let mut last_event = Instant::now();
    let started = Instant::now();
    let me = svc.inner.node.peer_id();
    let result = loop {
        let (satisfied, stalled, held) = {
            let mut s = dl.sched.lock().expect("lock");
            let satisfied = s.satisfied(dl.keep());
            if satisfied {
                // Nothing is owed (readers paused with full windows): the
                // stall clock starts when they read on.
                s.last_progress = Instant::now();
            }
            (
                satisfied,
                !satisfied && s.last_progress.elapsed() > stall,
                s.held,
            )
        };
        if dl.keep() && satisfied {
            break finish(&svc, &dl).await;
        }
        if dl.cancel.is_cancelled() {
            let why = dl.fatal.lock().expect("lock").take();
            break Outcome::Failed(
                why.unwrap_or_else(|| ContentServiceError::Unavailable("cancelled".into())),
            );
        }
        if stalled {
            break Outcome::Failed(ContentServiceError::Unavailable(format!(
                "no verified data for {}s from {} provider(s)",
                stall.as_secs(),
                workers.len()
            )));
        }
        workers.retain(|peer, h| {
            let done = h.is_finished();
            if done {
                retry.insert(*peer, Instant::now() + RETRY_AFTER);
            }
            !done
        });
        let want_more = workers.len() < cfg.max_providers as usize;
        if want_more && (Instant::now() >= next_lookup || workers.is_empty()) {
            let mut candidates: Vec<PeerId> = dl.hints.lock().expect("lock").drain(..).collect();
            if Instant::now() >= next_lookup {
                candidates.extend(
                    svc.find_providers(&id, cfg.max_providers as usize * 2)
                        .await,
                );
                // Peers fetching the same item announce themselves as they
                // start; look often early on so a swarm finds itself quickly.
                next_lookup = Instant::now()
                    + if workers.is_empty() {
                        Duration::from_millis(500)
                    } else if started.elapsed() < Duration::from_secs(10) {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_secs(5)
                    };
            }
            let bad = dl.sched.lock().expect("lock").bad.clone();
            // Best credit forecast first, so a limited number of worker slots
            // goes to the peers most likely to deliver.
            let ledger = &svc.inner.ledger;
            candidates.sort_by_cached_key(|p| {
                let c = ledger.credit(p);
                (c.standing, std::cmp::Reverse(c.score))
            });
            candidates.dedup();
            for peer in candidates {
                if peer == me
                    || bad.contains(&peer)
                    || workers.contains_key(&peer)
                    || retry.get(&peer).is_some_and(|t| Instant::now() < *t)
                    || workers.len() >= cfg.max_providers as usize
                {
                    continue;
                }
                debug!(%id, %peer, "fetching from provider");
                workers.insert(peer, tokio::spawn(worker(svc.clone(), dl.clone(), peer)));
            }
        }
        if last_event.elapsed() >= Duration::from_millis(500) {
            last_event = Instant::now();
            svc.emit(NodeEvent::ContentProgress {
                id,
                held_bytes: (held * BLOCK_BYTES).min(dl.partial.size()),
                size: dl.partial.size(),
                providers: workers.len() as u32,
            });
        }
        tokio::select! {
            _ = dl.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = dl.cancel.cancelled() => {}
        }
    };
    for (_, w) in workers {
        w.abort();
    }
    {
        let mut downloads = svc.inner.downloads.lock().expect("lock");
        if downloads.get(&id).is_some_and(|d| Arc::ptr_eq(d, &dl)) {
            downloads.remove(&id);
        }
    }
    match &result {
        Outcome::Complete => {
            let size = dl.partial.size();
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            info!(%id, size, mib_per_s = size as f64 / secs / 1048576.0, "download complete");
            svc.emit(NodeEvent::ContentProgress {
                id,
                held_bytes: size,
                size,
                providers: 0,
            });
        }
        Outcome::Failed(e) => {
            if dl.keep() {
                warn!(%id, error = %e, "download failed");
            }
            if dl.keep() {
                let _ = svc
                    .inner
                    .node
                    .send(Command::StopProviding(super::content_key(&id)))
                    .await;
            }
        }
        Outcome::Running => {}
    }
    dl.outcome.send_replace(result);
    dl.changed.notify_waiters();
}

/// Starts the whole-item scan of a download that will be kept (once).
fn start_whole_scan(svc: &ContentService, dl: &Arc<Download>) {
    if svc.inner.virus.enabled() && !dl.scanning.swap(true, Ordering::AcqRel) {
        tokio::spawn(scan_whole(svc.clone(), dl.clone()));
    }
}

/// Items up to this size (clamd's `StreamMaxLength` in scripts/clamd.sh) are
/// scanned as one clamd stream, so whole-file hash signatures apply; larger ones
/// in overlapping segments. (Segments scanned in parallel were measured slower
/// for bulk downloads: rarest-first order makes the prefix contiguous late, and
/// clamd's scan threads then compete with the transfer for the CPU.)
const WHOLE_SCAN_MAX: u64 = 4000 << 20;
/// Segment size for large items.
const WHOLE_SCAN_SEGMENT: u64 = 16 << 20;

/// Scans the item as its blocks arrive (in order), so the verdict is ready
/// soon after the last block lands; no second pass over the finished file.
async fn scan_whole(svc: ContentService, dl: Arc<Download>) {
    let size = dl.partial.size();
    let segment_max = if size <= WHOLE_SCAN_MAX {
        u64::MAX
    } else {
        WHOLE_SCAN_SEGMENT
    };
    let mut progress = dl.progress.subscribe();
    let blocks = dl.partial.blocks();
    if segment_max == u64::MAX {
        // One clamd stream, fed block by block as the prefix becomes contiguous.
        let mut scanner = svc.inner.virus.scanner();
        let mut k = 0;
        let verdict = loop {
            if k == blocks {
                break scanner.finish().await;
            }
            match next_block(&dl, &mut progress, k).await {
                None => return,
                Some(Ok(bytes)) => scanner.feed(bytes).await,
                Some(Err(e)) => break Err(e),
            }
            k += 1;
        };
        if let Ok(Verdict::Infected(sig)) = &verdict {
            malware_found(&svc, &dl, sig);
        }
        dl.verdict.send_replace(Some(verdict));
        return;
    }
    let mut scans = SegmentScans::new(svc.inner.virus.clone());
    let mut segment: Vec<Bytes> = Vec::new();
    let mut segment_len = 0u64;
    let mut k = 0;
    let verdict = 'scan: loop {
        if segment_len >= segment_max || (k == blocks && !segment.is_empty()) {
            if scans.full() {
                match scans.next().await.1 {
                    Ok(Verdict::Clean) => {}
                    other => break 'scan other,
                }
            }
            scans.submit(std::mem::take(&mut segment));
            segment_len = 0;
            continue;
        }
        if k == blocks {
            if scans.is_empty() {
                break Ok(Verdict::Clean);
            }
            match scans.next().await.1 {
                Ok(Verdict::Clean) => continue,
                other => break 'scan other,
            }
        }
        match next_block(&dl, &mut progress, k).await {
            None => return,
            Some(Ok(bytes)) => {
                segment_len += bytes.len() as u64;
                segment.push(bytes);
            }
            Some(Err(e)) => break Err(e),
        }
        k += 1;
    };
    if let Ok(Verdict::Infected(sig)) = &verdict {
        malware_found(&svc, &dl, sig);
    }
    dl.verdict.send_replace(Some(verdict));
}

/// The item is malware: every peer that sent part of it is disconnected,
/// banned (persistently) and slashed, an event goes out, and the transfer
/// ends for all its readers. Nothing of it is stored.
fn malware_found(svc: &ContentService, dl: &Arc<Download>, signature: &str) {
    dl.malware_signature
        .lock()
        .expect("lock")
        .get_or_insert_with(|| signature.to_owned());
    if dl.malware.swap(true, Ordering::AcqRel) {
        return;
    }
    let peers: Vec<PeerId> = dl
        .contributors
        .lock()
        .expect("lock")
        .iter()
        .copied()
        .collect();
    warn!(id = %dl.id, signature, ?peers, "malware detected; isolating the peers that sent it");
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
        + svc.inner.ban_secs;
    for p in &peers {
        let ledger = &svc.inner.ledger;
        ledger.record(
            *p,
            EventKind::Malware {
                signature: signature.into(),
            },
        );
        if let Err(e) = ledger.ban(*p, until as u64, &format!("malware: {signature}")) {
            warn!(peer = %p, error = %e, "cannot persist a ban");
        }
        let (node, peer) = (svc.inner.node.clone(), *p);
        tokio::spawn(async move {
            let _ = node.call(|r| Command::Disconnect(peer, r)).await;
        });
    }
    svc.emit(NodeEvent::MalwareDetected {
        id: dl.id,
        signature: signature.into(),
        peers,
    });
    dl.fail(ContentServiceError::Malware(signature.into()));
}

/// Waits until block `k` is held and reads it for the scan; `None` when the
/// download is cancelled first.
async fn next_block(
    dl: &Arc<Download>,
    progress: &mut watch::Receiver<u64>,
    k: u64,
) -> Option<Result<Bytes, VirusError>> {
    while !dl.partial.has(k) {
        tokio::select! {
            _ = progress.changed() => {}
            _ = dl.cancel.cancelled() => return None,
        }
    }
    Some(
        read_span(dl, block_range(dl.partial.size(), k))
            .await
            .map_err(|e| VirusError::BadReply(format!("reading block {k} for the scan: {e}"))),
    )
}

/// Verified bytes of a held span within one block: from memory when the
/// download keeps nothing (no copy), else from the partial file.
async fn read_span(dl: &Arc<Download>, range: Range<u64>) -> std::io::Result<Bytes> {
    let k = range.start / BLOCK_BYTES;
    if let Some(b) = dl.ram.lock().expect("lock").get(&k) {
        let base = k * BLOCK_BYTES;
        return Ok(b.slice((range.start - base) as usize..(range.end - base) as usize));
    }
    let partial = dl.partial.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        partial
            .read_at(&mut buf, range.start)
            .map(|()| Bytes::from(buf))
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

async fn finish(svc: &ContentService, dl: &Arc<Download>) -> Outcome {
    if svc.inner.virus.enabled() {
        // Nothing is stored or announced before clamd has seen all of it.
        let mut verdict = dl.verdict.subscribe();
        let v = loop {
            let now = verdict.borrow_and_update().clone();
            if let Some(v) = now {
                break v;
            }
            tokio::select! {
                r = verdict.changed() => if r.is_err() {
                    break Err(VirusError::BadReply("the scan ended without a verdict".into()));
                },
                _ = dl.cancel.cancelled() => break Err(VirusError::BadReply("cancelled".into())),
            }
        };
        match v {
            Ok(Verdict::Clean) => {}
            Ok(Verdict::Infected(sig)) => {
                malware_found(svc, dl, &sig);
                return Outcome::Failed(ContentServiceError::Malware(sig));
            }
            Err(e) => return Outcome::Failed(e.into()),
        }
    }
    let store = svc.inner.store.clone();
    let partial = dl.partial.clone();
    let signed = dl.manifest.signed.clone();
    let r = tokio::task::spawn_blocking(move || store.commit_partial(&partial, &signed)).await;
    match r {
        Ok(Ok(_)) => {
            svc.announce(&dl.manifest).await;
            svc.gc().await;
            Outcome::Complete
        }
        Ok(Err(e)) => Outcome::Failed(e.into()),
        Err(e) => Outcome::Failed(ContentServiceError::Store(e.to_string())),
    }
}

async fn worker(svc: ContentService, dl: Arc<Download>, peer: PeerId) {
    let mut inflight: VecDeque<Pending> = VecDeque::new();
    let r = run_worker(&svc, &dl, peer, &mut inflight).await;
    let mut s = dl.sched.lock().expect("lock");
    for p in inflight {
        if let Pending::Block(k) = p {
            s.release(k);
        }
    }
    s.forget_peer(&peer);
    drop(s);
    dl.changed.notify_waiters();
    if let Err(e) = r {
        debug!(id = %dl.id, %peer, error = %e, "provider dropped");
    }
}

/// How long a provider's queue of our requests should take to drain. Deeper
/// queues add latency (a capped uploader answers late, the end game duplicates
/// requests); shallower ones leave a fast link idle between answers.
const TARGET_QUEUE: Duration = Duration::from_millis(250);

/// Measures a provider's delivery rate and sizes the request pipeline to it.
struct RateMeter {
    max: usize,
    since: Instant,
    bytes: u64,
    /// Bytes per second, smoothed; `None` until the first measurement.
    rate: Option<f64>,
}

impl RateMeter {
    fn new(max: usize) -> Self {
        Self {
            max,
            since: Instant::now(),
            bytes: 0,
            rate: None,
        }
    }

    fn received(&mut self, bytes: u64) {
        self.bytes += bytes;
        let dt = self.since.elapsed();
        if dt >= Duration::from_millis(200) {
            let now = self.bytes as f64 / dt.as_secs_f64();
            self.rate = Some(match self.rate {
                Some(r) => 0.7 * r + 0.3 * now,
                None => now,
            });
            self.since = Instant::now();
            self.bytes = 0;
        }
    }

    fn depth(&self) -> usize {
        match self.rate {
            // Until measured, half the maximum: enough to fill a fast link soon.
            None => (self.max / 2).max(2),
            Some(r) => {
                let blocks = (r * TARGET_QUEUE.as_secs_f64() / BLOCK_BYTES as f64).ceil() as usize;
                blocks.clamp(2, self.max.max(2))
            }
        }
    }
}

/// One answer as the reading half of a worker's stream delivers it.
struct Answer {
    pending: Pending,
    header: TransferResponse,
    payload: Bytes,
}

/// Reads answers in request order; `kinds` says what each one answers, so the
/// payload bound is known before any of it is read.
async fn read_answers<R: PayloadRead>(
    mut rd: R,
    mut kinds: mpsc::UnboundedReceiver<Pending>,
    out: mpsc::Sender<Result<Answer, String>>,
    size: u64,
) {
    while let Some(pending) = kinds.recv().await {
        let got = async {
            let header: TransferResponse = read_msg(&mut rd).await?.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "stream closed")
            })?;
            let max = match pending {
                Pending::Have => block_count(size).div_ceil(8),
                Pending::Block(k) => transfer::block_wire(size, k),
            };
            let payload = if header.status == Status::Ok as i32 {
                // A payload larger than any honest answer is never read.
                read_payload_bytes(&mut rd, header.payload_len, max).await?
            } else {
                Bytes::new()
            };
            Ok::<_, std::io::Error>(Answer {
                pending,
                header,
                payload,
            })
        }
        .await
        .map_err(|e| e.to_string());
        let failed = got.is_err();
        if out.send(got).await.is_err() || failed {
            return;
        }
    }
}

/// Verifies a block and hands it over (memory or disk), or drops it and the
/// provider; updates the schedule either way.
fn settle(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    k: u64,
    wire: Bytes,
    secs: f64,
) -> Result<(), String> {
    if dl.holds(k) {
        // A duplicate from the end game; the other copy won.
        dl.sched.lock().expect("lock").release(k);
        return Ok(());
    }
    match dl
        .partial
        .verify(k, &wire)
        // The block's bytes are a slice of the buffer they arrived in.
        .and_then(|at| dl.hold(k, wire.slice(at..)))
    {
        Ok(fresh) => {
            dl.contributors.lock().expect("lock").insert(peer);
            if fresh {
                // Credited once: two connections to one peer may race the
                // same block in the end game.
                let r = block_range(dl.partial.size(), k);
                svc.inner.ledger.record(
                    peer,
                    EventKind::Received {
                        bytes: r.end - r.start,
                        secs,
                    },
                );
                dl.progress.send_modify(|n| *n += 1);
            }
            dl.changed.notify_waiters();
            Ok(())
        }
        Err(p2pvm_content::ContentError::Write(e)) => {
            // Our disk, not the peer: the whole transfer cannot go on.
            dl.sched.lock().expect("lock").release(k);
            let full = e.kind() == std::io::ErrorKind::StorageFull;
            let msg = format!("writing block {k}: {e}");
            dl.fail(if full {
                ContentServiceError::Full(msg.clone())
            } else {
                ContentServiceError::Store(msg.clone())
            });
            Err(msg)
        }
        Err(e) => {
            warn!(id = %dl.id, %peer, block = k, error = %e, "corrupt block from provider; dropping it and the provider");
            {
                let mut s = dl.sched.lock().expect("lock");
                s.release(k);
                s.bad.insert(peer);
            }
            svc.inner.ledger.record(peer, EventKind::CorruptBlock);
            svc.emit(NodeEvent::CorruptData {
                peer,
                id: dl.id,
                block: k,
            });
            dl.changed.notify_waiters();
            Err(format!("block {k} failed verification"))
        }
    }
}

/// Settles a block: on the worker's own task when it stays in memory (only
/// hashing, no hand-off), on a blocking thread when it goes to disk.
fn verify_block(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    k: u64,
    wire: Bytes,
    secs: f64,
) -> Result<Option<tokio::task::JoinHandle<Result<(), String>>>, String> {
    if !dl.keep() {
        return settle(svc, dl, peer, k, wire, secs).map(|()| None);
    }
    let (svc, dl) = (svc.clone(), dl.clone());
    Ok(Some(tokio::task::spawn_blocking(move || {
        settle(&svc, &dl, peer, k, wire, secs)
    })))
}

async fn run_worker(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    inflight: &mut VecDeque<Pending>,
) -> Result<(), String> {
    let mut stream = open_stream(svc, peer).await?;
    // The first Have goes alone: its answer says what the provider holds and
    // whether blocks can take the fast path. A provider that never answers
    // frees its worker slot like one that stops answering later.
    let id = dl.id;
    let io = |e: std::io::Error| e.to_string();
    let first = async {
        request(&mut stream, Op::Have(id.0.to_vec())).await?;
        let header = response(&mut stream).await?;
        let payload = if header.status == Status::Ok as i32 {
            let max = block_count(dl.partial.size()).div_ceil(8);
            read_payload(&mut stream, header.payload_len, max).await?
        } else {
            Vec::new()
        };
        Ok::<_, std::io::Error>((header, payload))
    };
    let (header, payload) = tokio::select! {
        r = tokio::time::timeout(ANSWER_TIMEOUT, first) => match r {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                svc.inner.ledger.record(peer, EventKind::RequestFailed);
                return Err(io(e));
            }
            Err(_) => {
                svc.inner.ledger.record(peer, EventKind::RequestFailed);
                return Err("the provider did not answer".into());
            }
        },
        _ = dl.cancel.cancelled() => return Ok(()),
    };
    let complete = on_have(svc, dl, peer, &header, &payload)?;
    let asked = Mutex::new(HashSet::new());
    if let Some((rd, wr)) = fast_path(svc, peer, header.fast_path_port).await {
        debug!(%id, %peer, "blocks take the fast path");
        // More connections, each with a pipeline of its own, for a peer we
        // trust with more than one request at a time.
        let extra = if svc.standing(&peer) == Standing::Throttled {
            0
        } else {
            svc.inner.config.fast_path_connections - 1
        };
        let dials = (0..extra).map(|_| fast_path(svc, peer, header.fast_path_port));
        let more: Vec<_> = tokio::select! {
            all = futures::future::join_all(dials) => all.into_iter().flatten().collect(),
            _ = dl.cancel.cancelled() => return Ok(()),
        };
        let mut pending: Vec<VecDeque<Pending>> = more.iter().map(|_| VecDeque::new()).collect();
        let r = futures::future::try_join(
            pipeline(svc, dl, peer, &asked, inflight, (rd, wr), complete),
            futures::future::try_join_all(
                more.into_iter()
                    .zip(pending.iter_mut())
                    .map(|(conn, p)| pipeline(svc, dl, peer, &asked, p, conn, complete)),
            ),
        )
        .await;
        // The caller releases what was in flight on any of them.
        inflight.extend(pending.into_iter().flatten());
        return r.map(|_| ());
    }
    let (rd, wr) = futures::AsyncReadExt::split(stream);
    pipeline(svc, dl, peer, &asked, inflight, (rd, wr), complete).await
}

/// A fast-path connection to `peer` if it offers one (`port`) and it can be
/// reached at the address our libp2p connection uses; `None` otherwise.
async fn fast_path(
    svc: &ContentService,
    peer: PeerId,
    port: u32,
) -> Option<(super::sealed::SealedReader, super::sealed::SealedWriter)> {
    let fast = svc.inner.fast_path.as_ref()?;
    let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
    let remote = svc
        .inner
        .node
        .call(|reply| Command::RemoteAddr(peer, reply))
        .await
        .ok()
        .flatten()?;
    let ip = super::fastpath::ip_of(&remote)?;
    match fast.dial(peer, std::net::SocketAddr::new(ip, port)).await {
        Ok(s) => Some(s),
        Err(e) => {
            debug!(%peer, %ip, port, error = %e, "fast path unreachable; staying on libp2p");
            None
        }
    }
}

/// Takes a provider's answer to `Have`; true when it holds the whole item.
fn on_have(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    header: &TransferResponse,
    payload: &[u8],
) -> Result<bool, String> {
    let (have, complete) = match Status::try_from(header.status) {
        Ok(Status::Complete) => (Have::All, true),
        Ok(Status::Ok) => {
            let blocks = dl.partial.blocks();
            if (payload.len() as u64) < blocks.div_ceil(8) {
                return Err("short bitfield".into());
            }
            let bits = (0..blocks)
                .map(|k| payload[(k / 8) as usize] & (1 << (k % 8)) != 0)
                .collect();
            (Have::Some(bits), false)
        }
        _ => {
            // It was announced as a provider: a lie, or a stale record.
            svc.inner.ledger.record(peer, EventKind::RequestFailed);
            return Err(format!("peer does not have the item: {}", header.message));
        }
    };
    svc.inner.ledger.record(peer, EventKind::RequestOk);
    dl.sched.lock().expect("lock").set_have(peer, have);
    dl.changed.notify_waiters();
    Ok(complete)
}

/// Keeps block requests in flight to `peer` on `stream` until the download
/// ends or the provider fails.
async fn pipeline<R: PayloadRead, W: PayloadWrite>(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    // Blocks this worker has asked of the peer on any of its connections:
    // the end game never asks the same peer twice for one block.
    asked: &Mutex<HashSet<u64>>,
    inflight: &mut VecDeque<Pending>,
    (rd, mut wr): (R, W),
    mut complete_peer: bool,
) -> Result<(), String> {
    use futures::StreamExt;
    let id = dl.id;
    // A throttled peer (low credit) gets one request at a time and never the
    // urgent playback blocks: it only helps when nobody better has the data.
    let throttled = svc.standing(&peer) == Standing::Throttled;
    let max_depth = if throttled {
        1
    } else {
        svc.inner.config.pipeline_depth as usize
    };
    let mut last_answer = Instant::now();
    if throttled {
        dl.sched.lock().expect("lock").throttled.insert(peer);
        // Give better peers a head start, so their holdings are known before
        // this one is asked for anything.
        tokio::select! {
            _ = tokio::time::sleep(THROTTLED_HEAD_START) => {}
            _ = dl.cancel.cancelled() => return Ok(()),
        }
    }
    let mut rate = RateMeter::new(max_depth);
    let io = |e: std::io::Error| e.to_string();
    let (kinds_tx, kinds_rx) = mpsc::unbounded_channel();
    let (answers_tx, mut answers) = mpsc::channel(max_depth + 1);
    let reader = tokio::spawn(read_answers(rd, kinds_rx, answers_tx, dl.partial.size()));
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _reader = AbortOnDrop(reader);
    let mut verifying = futures::stream::FuturesOrdered::new();

    async fn send<W: futures::AsyncWrite + Unpin>(
        wr: &mut W,
        kinds: &mpsc::UnboundedSender<Pending>,
        inflight: &mut VecDeque<Pending>,
        op: Op,
        pending: Pending,
    ) -> Result<(), String> {
        // Tracked before the write, so a failed write still releases the block.
        inflight.push_back(pending);
        kinds.send(pending).map_err(|_| "reader gone".to_string())?;
        write_msg(wr, &TransferRequest { op: Some(op) })
            .await
            .map_err(|e| e.to_string())
    }
    let mut last_have = Instant::now();
    let mut flush_needed = false;
    // Payload bytes after which this pipeline ends and its connection is
    // dialled again (fresh keys on the fast path).
    let rotate_after = svc.inner.config.fast_path_rotate_bytes;
    let mut carried = 0u64;
    loop {
        if dl.cancel.is_cancelled() || matches!(*dl.outcome.borrow(), Outcome::Complete) {
            return Ok(());
        }
        if carried >= rotate_after && inflight.is_empty() && verifying.is_empty() {
            // Well before a fast-path key runs out: end cleanly, and the
            // driver starts a fresh worker (new connections, new keys) for
            // this provider, which is no fault of its.
            debug!(%id, %peer, "connection carried {carried} bytes; dialling afresh");
            return Ok(());
        }
        // Fill the pipeline (requests on the wire plus blocks being verified),
        // a quarter of it at a time once it runs: requests then travel
        // several to a packet instead of one per answered block.
        let depth = rate.depth();
        let busy = inflight.len() + verifying.len();
        let batch = if busy == 0 { 1 } else { (depth / 4).max(1) };
        while carried < rotate_after
            && busy + batch <= depth
            && inflight.len() + verifying.len() < depth
        {
            let next = {
                let mut mine = asked.lock().expect("lock");
                let k = dl
                    .sched
                    .lock()
                    .expect("lock")
                    .pick(&peer, dl.keep(), &mine, !throttled);
                k.inspect(|k| {
                    mine.insert(*k);
                })
            };
            let Some(k) = next else { break };
            let op = Op::Block(BlockRequest {
                content_id: id.0.to_vec(),
                block: k,
            });
            send(&mut wr, &kinds_tx, inflight, op, Pending::Block(k)).await?;
            flush_needed = true;
        }
        let idle = inflight.is_empty() && verifying.is_empty();
        let stale = last_have.elapsed() >= if idle { HAVE_REFRESH } else { 2 * HAVE_REFRESH };
        if !complete_peer && stale && !inflight.iter().any(|p| matches!(p, Pending::Have)) {
            // A partial provider gains blocks as it downloads: ask what it holds now.
            send(
                &mut wr,
                &kinds_tx,
                inflight,
                Op::Have(id.0.to_vec()),
                Pending::Have,
            )
            .await?;
            last_have = Instant::now();
            flush_needed = true;
        }
        if flush_needed {
            wr.flush().await.map_err(io)?;
            flush_needed = false;
        }
        tokio::select! {
            Some(done) = verifying.next(), if !verifying.is_empty() => {
                let done: Result<Result<(), String>, tokio::task::JoinError> = done;
                done.map_err(|e| e.to_string())??;
            }
            answer = answers.recv(), if !inflight.is_empty() => {
                let answer = match answer.ok_or_else(|| "reader gone".to_string()).and_then(|a| a) {
                    Ok(a) => a,
                    Err(e) => {
                        // The provider vanished or broke the stream with requests pending.
                        svc.inner.ledger.record(peer, EventKind::RequestFailed);
                        return Err(e);
                    }
                };
                let secs = last_answer.elapsed().as_secs_f64();
                last_answer = Instant::now();
                let expected = inflight.pop_front().expect("not empty");
                if let Pending::Block(k) = expected {
                    asked.lock().expect("lock").remove(&k);
                }
                debug_assert!(matches!((expected, answer.pending), (Pending::Have, Pending::Have)) || expected.block() == answer.pending.block());
                let Answer { pending, header, payload } = answer;
                match pending {
                    Pending::Have => {
                        complete_peer |= on_have(svc, dl, peer, &header, &payload)?;
                    }
                    Pending::Block(k) => match Status::try_from(header.status) {
                        Ok(Status::Ok) => {
                            rate.received(payload.len() as u64);
                            carried += payload.len() as u64;
                            if let Some(v) = verify_block(svc, dl, peer, k, payload, secs)? {
                                verifying.push_back(v);
                            }
                        }
                        Ok(Status::NotHeld) => {
                            let mut s = dl.sched.lock().expect("lock");
                            s.release(k);
                            let cleared = if let Some(Have::Some(v)) = s.peers.get_mut(&peer)
                                && let Some(b) = v.get_mut(k as usize)
                                && *b
                            {
                                *b = false;
                                true
                            } else {
                                false
                            };
                            if cleared {
                                let r = &mut s.rarity[k as usize];
                                *r = r.saturating_sub(1);
                            }
                        }
                        _ => {
                            dl.sched.lock().expect("lock").release(k);
                            svc.inner.ledger.record(peer, EventKind::RequestFailed);
                            return Err(format!("block {k} refused: {}", header.message));
                        }
                    },
                }
            }
            _ = tokio::time::sleep_until((last_answer + ANSWER_TIMEOUT).into()), if !inflight.is_empty() => {
                // Accepts requests but does not answer: free its blocks for others.
                svc.inner.ledger.record(peer, EventKind::RequestFailed);
                return Err("the provider stopped answering".into());
            }
            _ = dl.changed.notified(), if inflight.is_empty() && verifying.is_empty() => {}
            _ = tokio::time::sleep(HAVE_REFRESH), if inflight.is_empty() && verifying.is_empty() => {}
            _ = dl.cancel.cancelled() => return Ok(()),
        }
    }
}

fn block_span(size: u64, range: &Range<u64>) -> Range<u64> {
    let first = range.start / BLOCK_BYTES;
    let end = if range.end == 0 {
        0
    } else {
        (range.end - 1) / BLOCK_BYTES + 1
    };
    first..end.min(block_count(size))
}

fn to_io(e: ContentServiceError) -> std::io::Error {
    std::io::Error::other(e)
}

/// Starts streaming verified bytes of `id` over `range`.
pub(crate) async fn open_reader(
    svc: &ContentService,
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
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let check = |size: u64| -> Result<Range<u64>, ContentServiceError> {
        let r = range.clone().unwrap_or(0..size);
        if r.start > r.end || r.end > size {
            return Err(ContentServiceError::BadRequest(format!(
                "range {}..{} is outside an item of {size} bytes",
                r.start, r.end
            )));
        }
        Ok(r)
    };
    if let Some(info) = svc.inner.store.get(id)? {
        let manifest = svc
            .local_manifest(id)?
            .ok_or_else(|| ContentServiceError::NotFound(id.to_string()))?;
        let r = check(info.size)?;
        let file = svc.inner.store.open_data(id)?;
        tokio::spawn(read_local(svc.clone(), file, r.clone(), tx));
        let me = svc.inner.node.peer_id();
        return Ok((
            ContentInfo {
                manifest,
                local: Some(info),
                providers: vec![me],
            },
            r,
            stream,
        ));
    }
    let whole = range.is_none();
    let mut dl = download_for(svc, id, keep && whole).await?;
    let r = match check(dl.partial.size()) {
        Ok(r) => r,
        Err(e) => {
            // Started just for this request: do not leave it running reader-less.
            let idle = dl.sched.lock().expect("lock").readers.is_empty();
            if idle && !dl.keep() {
                dl.cancel.cancel();
            }
            return Err(e);
        }
    };
    let mut reader = dl.add_reader(block_span(dl.partial.size(), &r));
    if dl.cancel.is_cancelled() {
        // Joined a download in the instant its last reader left (a player
        // closing one stream and seeking with the next): start a fresh one.
        dl.remove_reader(reader);
        dl = download_for(svc, id, keep && whole).await?;
        reader = dl.add_reader(block_span(dl.partial.size(), &r));
    }
    let info = ContentInfo {
        manifest: dl.manifest.clone(),
        local: None,
        providers: dl
            .sched
            .lock()
            .expect("lock")
            .peers
            .keys()
            .copied()
            .collect(),
    };
    tokio::spawn(read_download(svc.clone(), dl, reader, r.clone(), tx));
    Ok((info, r, stream))
}

/// Chunk handed to readers of a stored item at a time. Large, because each is
/// a hand-off between threads (and those cost more than the copy here).
const LOCAL_CHUNK: u64 = 1 << 20;

/// Reads one chunk of a stored item at the file's position (`seek` first for
/// the first chunk).
fn read_chunk(f: &mut std::fs::File, pos: u64, n: u64, seek: bool) -> std::io::Result<Bytes> {
    use std::io::{Read, Seek, SeekFrom};
    if seek {
        f.seek(SeekFrom::Start(pos))?;
    }
    // Read into spare capacity rather than zero-filling first.
    let mut buf = Vec::with_capacity(n as usize);
    let got = f.take(n).read_to_end(&mut buf)?;
    if got as u64 != n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the stored item ends {got} bytes into a {n}-byte read at {pos}"),
        ));
    }
    Ok(Bytes::from(buf))
}

/// Reads `range` of a stored item sequentially (the kernel's readahead keeps
/// up), at most the channel's capacity ahead of the reader; stops when the
/// reader goes away. On a reader thread of its own while one of the capped
/// few is free, else a chunk per short blocking job.
async fn read_local(
    svc: ContentService,
    mut file: std::fs::File,
    range: Range<u64>,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
) {
    let chunk = move |pos: u64| (range.end - pos).min(LOCAL_CHUNK);
    if let Ok(thread) = svc.inner.local_readers.clone().try_acquire_owned() {
        let _ = tokio::task::spawn_blocking(move || {
            let _thread = thread;
            let mut pos = range.start;
            while pos < range.end {
                let read = read_chunk(&mut file, pos, chunk(pos), pos == range.start);
                let failed = read.is_err();
                if tx.blocking_send(read).is_err() || failed {
                    return;
                }
                pos += chunk(pos);
            }
        })
        .await;
        return;
    }
    let mut file = Some(file);
    let mut pos = range.start;
    while pos < range.end {
        let (n, first) = (chunk(pos), pos == range.start);
        let mut f = file.take().expect("returned by the previous job");
        let job = tokio::task::spawn_blocking(move || {
            let read = read_chunk(&mut f, pos, n, first);
            (f, read)
        });
        let read = match job.await {
            Ok((f, read)) => {
                file = Some(f);
                read
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        let failed = read.is_err();
        if tx.send(read).await.is_err() || failed {
            return;
        }
        pos += n;
    }
}

/// Verified bytes handed to a reader at a time when the virus filter is on:
/// each segment is scanned (with the previous segment's tail, so a signature
/// across the boundary is seen) before any of it is delivered.
const SCAN_SEGMENT: u64 = 4 << 20;
/// Bytes of the previous segment scanned again with the next one.
const SCAN_OVERLAP: usize = 64 * 1024;
/// Segment scans run at once (clamd scans them in parallel threads).
const SCAN_PARALLEL: usize = 3;

type SegmentScan = tokio::task::JoinHandle<(Vec<Bytes>, Result<Verdict, VirusError>)>;

/// Scans an ordered byte sequence in overlapping segments, several at once,
/// and returns them in order with their verdicts.
struct SegmentScans {
    filter: p2pvm_security::VirusFilter,
    inflight: VecDeque<SegmentScan>,
    tail: Bytes,
}

impl SegmentScans {
    fn new(filter: p2pvm_security::VirusFilter) -> Self {
        Self {
            filter,
            inflight: VecDeque::new(),
            tail: Bytes::new(),
        }
    }

    fn submit(&mut self, segment: Vec<Bytes>) {
        let mut parts = Vec::with_capacity(segment.len() + 1);
        parts.push(self.tail.clone());
        parts.extend(segment.iter().cloned());
        let last = segment.last().cloned().unwrap_or_default();
        self.tail = last.slice(last.len().saturating_sub(SCAN_OVERLAP)..);
        let filter = self.filter.clone();
        self.inflight.push_back(tokio::spawn(async move {
            let mut scanner = filter.scanner();
            for p in parts {
                scanner.feed(p).await;
            }
            (segment, scanner.finish().await)
        }));
    }

    fn full(&self) -> bool {
        self.inflight.len() >= SCAN_PARALLEL
    }

    fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// The oldest segment and its verdict.
    async fn next(&mut self) -> (Vec<Bytes>, Result<Verdict, VirusError>) {
        match self.inflight.front_mut() {
            None => (Vec::new(), Ok(Verdict::Clean)),
            Some(h) => {
                let r = h.await.unwrap_or_else(|e| {
                    (
                        Vec::new(),
                        Err(VirusError::BadReply(format!("scan task: {e}"))),
                    )
                });
                self.inflight.pop_front();
                r
            }
        }
    }
}

impl Drop for SegmentScans {
    fn drop(&mut self) {
        for h in &self.inflight {
            h.abort();
        }
    }
}

async fn read_download(
    svc: ContentService,
    dl: Arc<Download>,
    reader: u64,
    range: Range<u64>,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
) {
    struct Guard(Arc<Download>, u64);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.remove_reader(self.1);
        }
    }
    let guard = Guard(dl.clone(), reader);
    let scan = svc.inner.virus.enabled();
    let mut scans = SegmentScans::new(svc.inner.virus.clone());
    let mut progress = dl.progress.subscribe();
    let mut outcome = dl.outcome.subscribe();
    let mut pos = range.start;
    let mut segment: Vec<Bytes> = Vec::new();
    let mut segment_len = 0u64;
    // Delivers a scanned segment, or ends the stream on malware or a scan error.
    let deliver = async |(seg, verdict): (Vec<Bytes>, Result<Verdict, VirusError>),
                         tx: &mpsc::Sender<std::io::Result<Bytes>>|
           -> bool {
        match verdict {
            Ok(Verdict::Clean) => {}
            Ok(Verdict::Infected(sig)) => {
                malware_found(&svc, &dl, &sig);
                let _ = tx.send(Err(to_io(ContentServiceError::Malware(sig)))).await;
                return false;
            }
            Err(e) => {
                let _ = tx.send(Err(to_io(e.into()))).await;
                return false;
            }
        }
        if dl.malware.load(Ordering::Acquire) {
            // Another scan of this item found malware: nothing more goes out.
            let sig = dl.malware_signature.lock().expect("lock").clone();
            let _ = tx
                .send(Err(to_io(ContentServiceError::Malware(format!(
                    "{} (found in another part of this item)",
                    sig.unwrap_or_default()
                )))))
                .await;
            return false;
        }
        for b in seg {
            if tx.send(Ok(b)).await.is_err() {
                return false;
            }
        }
        true
    };
    loop {
        let done_reading = pos >= range.end;
        if done_reading && segment.is_empty() && scans.is_empty() {
            break;
        }
        if !scan && !segment.is_empty() {
            // Unscanned: hand each block over as soon as it is read.
            for b in std::mem::take(&mut segment) {
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
            segment_len = 0;
            continue;
        }
        if segment_len >= SCAN_SEGMENT || (done_reading && !segment.is_empty()) {
            if scans.full() {
                let done = scans.next().await;
                if !deliver(done, &tx).await {
                    return;
                }
            }
            scans.submit(std::mem::take(&mut segment));
            segment_len = 0;
            continue;
        }
        if done_reading {
            let done = scans.next().await;
            if !deliver(done, &tx).await {
                return;
            }
            continue;
        }
        let k = pos / BLOCK_BYTES;
        if !dl.holds(k) {
            let failed = match &*outcome.borrow_and_update() {
                Outcome::Failed(e) => Some(e.clone()),
                _ => None,
            };
            if let Some(e) = failed {
                let _ = tx.send(Err(to_io(e))).await;
                return;
            }
            let busy = !scans.is_empty();
            tokio::select! {
                _ = progress.changed() => {}
                _ = outcome.changed() => {}
                done = scans.next(), if busy => {
                    if !deliver(done, &tx).await {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
            continue;
        }
        let end = block_range(dl.partial.size(), k).end.min(range.end);
        match read_span(&dl, pos..end).await {
            Ok(b) => {
                segment_len += b.len() as u64;
                segment.push(b);
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
        pos = end;
        dl.advance(reader, end.div_ceil(BLOCK_BYTES));
    }
    drop(guard);
}

/// Fetches a whole item into the store.
pub(crate) async fn download(
    svc: &ContentService,
    id: &ContentId,
) -> Result<ContentInfo, ContentServiceError> {
    if svc.inner.store.get(id)?.is_some() {
        return svc.stat(id).await;
    }
    let dl = download_for(svc, id, true).await?;
    let mut outcome = dl.outcome.subscribe();
    loop {
        let now = outcome.borrow_and_update().clone();
        match now {
            Outcome::Complete => break,
            Outcome::Failed(e) => return Err(e),
            Outcome::Running => {}
        }
        if outcome.changed().await.is_err() {
            break;
        }
    }
    svc.stat(id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_game_never_asks_one_peer_twice_for_a_block() {
        let (slow, other) = (PeerId::random(), PeerId::random());
        let mut s = Sched::new(1, 4);
        s.set_have(slow, Have::All);
        s.set_have(other, Have::All);
        assert_eq!(s.pick(&slow, true, &HashSet::new(), true), Some(0));
        // Held up past the end-game delay on one of `slow`'s connections.
        s.since[0] = Some(Instant::now() - 2 * ENDGAME_AFTER);
        let asked_of_slow = HashSet::from([0]);
        assert_eq!(s.pick(&slow, true, &asked_of_slow, true), None);
        // Another peer may take a second copy.
        assert_eq!(s.pick(&other, true, &HashSet::new(), true), Some(0));
    }
}
