//! The provider side of `/p2pvm/content/2`: answers block, manifest, have and
//! search requests from stored items and from downloads in progress.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};

use futures::{AsyncWriteExt, FutureExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use libp2p::{PeerId, StreamProtocol};
use p2pvm_content::transfer::{self, Op, Status, TransferRequest, TransferResponse};
use p2pvm_content::{ContentId, block_count};
use p2pvm_security::{EventKind, GroupId, Standing};
use prost::Message;
use tracing::{debug, warn};

use super::ContentService;
use super::wire::{PayloadWrite, write_msg};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::compat::FuturesAsyncReadCompatExt;

/// Most search hits one provider returns.
const MAX_HITS: usize = 100;

/// The node-wide upload cap, shared by every stream this node serves.
pub(crate) struct Limiter {
    inner: DefaultDirectRateLimiter,
    burst: u32,
}

impl Limiter {
    /// `None` when uncapped.
    pub fn new(bytes_per_sec: u64) -> Option<Self> {
        let rate = NonZeroU32::new(bytes_per_sec.min(u32::MAX as u64) as u32)?;
        // A burst of a quarter second (at least one block with its proof) keeps
        // the cap smooth without refusing a single large answer.
        let burst = (rate.get() / 4).max(p2pvm_content::BLOCK_BYTES as u32 + 64 * 64);
        let quota = Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).expect("positive"));
        Some(Self {
            inner: RateLimiter::direct(quota),
            burst,
        })
    }

    async fn take(&self, mut n: u64) {
        while n > 0 {
            let step = n.min(self.burst as u64) as u32;
            if let Some(step) = NonZeroU32::new(step) {
                // Cannot fail: step never exceeds the burst.
                let _ = self.inner.until_n_ready(step).await;
            }
            n -= step as u64;
        }
    }
}

pub(crate) fn spawn(svc: ContentService) {
    let server = svc.clone();
    accept(
        &svc,
        StreamProtocol::new(transfer::PROTOCOL),
        move |peer, stream| {
            let (rd, wr) = futures::AsyncReadExt::split(stream);
            serve_stream(server.clone(), peer, None, rd, wr)
        },
    );
}

/// Serves `protocol`: each inbound stream goes to `serve`, as a task the
/// service supervises, until shutdown.
pub(crate) fn accept<F, Fut>(svc: &ContentService, protocol: StreamProtocol, serve: F)
where
    F: Fn(PeerId, libp2p::Stream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut incoming = match svc.inner.node.stream_control().accept(protocol.clone()) {
        Ok(i) => i,
        Err(e) => {
            warn!(%protocol, error = %e, "cannot serve the protocol");
            return;
        }
    };
    let tasks = svc.clone();
    let shutdown = svc.inner.shutdown.clone();
    svc.spawn(async move {
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

/// One shared `T` per peer, made on its first stream and gone with its
/// last: what a peer gets must not multiply with the streams it opens.
pub(crate) struct PerPeer<T>(std::sync::Mutex<HashMap<PeerId, Weak<T>>>);

impl<T> Default for PerPeer<T> {
    fn default() -> Self {
        Self(Default::default())
    }
}

impl<T> PerPeer<T> {
    /// `peer`'s `T`, made by `make` if it has none yet.
    fn get_or(&self, peer: PeerId, make: impl FnOnce() -> T) -> Arc<T> {
        let mut all = self.0.lock().expect("lock");
        all.retain(|_, t| t.strong_count() > 0);
        if let Some(t) = all.get(&peer).and_then(Weak::upgrade) {
            return t;
        }
        let t = Arc::new(make());
        all.insert(peer, Arc::downgrade(&t));
        t
    }
}

/// The upload caps of throttled peers, one per peer shared by all of its
/// streams and connections (a cap per stream would multiply a peer's rate by
/// how many it opens).
pub(crate) type PeerThrottles = PerPeer<Limiter>;

impl PerPeer<Limiter> {
    /// `peer`'s cap at `rate` bytes per second.
    pub fn get(&self, peer: PeerId, rate: u64) -> Arc<Limiter> {
        self.get_or(peer, || Limiter::new(rate.max(1)).expect("a positive rate"))
    }
}

/// Content streams (libp2p and fast path alike) served to one peer at
/// once. A downloader uses up to three per item it fetches from us (its
/// worker's stream and two fast-path connections) and one per manifest or
/// search; a stream refused here costs an honest peer a failed request, so
/// the cap is generous. What a peer's streams can hold in memory is bounded
/// node-wide by [`BATCHES_IN_FLIGHT`].
const STREAMS_PER_PEER: usize = 64;
/// Batches of answers computed and not yet sent for one peer, over all its
/// streams: one peer cannot take the node-wide allowance for itself.
const BATCHES_PER_PEER: usize = 8;

/// The answer batches in flight of each peer.
pub(crate) type PeerBatches = PerPeer<tokio::sync::Semaphore>;

impl PerPeer<tokio::sync::Semaphore> {
    /// `peer`'s allowance, shared by all its streams.
    pub fn get(&self, peer: PeerId) -> Arc<tokio::sync::Semaphore> {
        self.get_or(peer, || tokio::sync::Semaphore::new(BATCHES_PER_PEER))
    }
}

/// Batches of answers computed and not yet sent, node-wide (each at most
/// [`BATCH`] blocks, about 2 MiB): a peer that asks on many streams and
/// reads none can hold these for [`WRITE_TIMEOUT`] at most, and pays for
/// each in its credit.
pub(crate) const BATCHES_IN_FLIGHT: usize = 64;

/// The content streams being served, counted per peer.
#[derive(Default)]
pub(crate) struct PeerStreams(std::sync::Mutex<HashMap<PeerId, usize>>);

/// One served stream of a peer; the count goes down when it is dropped.
pub(crate) struct StreamSlot {
    all: Arc<PeerStreams>,
    peer: PeerId,
}

impl PeerStreams {
    /// How many streams of `peer` are served now.
    pub fn count(&self, peer: &PeerId) -> usize {
        self.0.lock().expect("lock").get(peer).copied().unwrap_or(0)
    }

    /// A slot for another stream of `peer`, or `None` at the cap.
    pub fn enter(self: &Arc<Self>, peer: PeerId) -> Option<StreamSlot> {
        let mut all = self.0.lock().expect("lock");
        let n = all.entry(peer).or_default();
        if *n >= STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            all: self.clone(),
            peer,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut all = self.all.0.lock().expect("lock");
        if let Some(n) = all.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                all.remove(&self.peer);
            }
        }
    }
}

/// Searches answered per peer: a burst of [`SEARCH_BURST`], then
/// [`SEARCHES_PER_SEC`]. Each search decodes the stored items under its
/// rarest word (the store's word index), which for a common word is many: a
/// peer asking without pause would keep this node's blocking threads for
/// itself.
const SEARCH_BURST: u32 = 20;
const SEARCHES_PER_SEC: u32 = 2;
/// Peers whose search allowance is tracked before idle ones are dropped.
const SEARCH_PEERS_TRACKED: usize = 10_000;

/// How often, at most, the search allowances of idle peers are dropped: a
/// pass looks at every tracked peer, so it must not run at every search.
const SEARCH_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The search allowance of each peer.
pub(crate) struct SearchLimits {
    limits: governor::DefaultKeyedRateLimiter<PeerId>,
    last_prune: std::sync::Mutex<std::time::Instant>,
}

impl Default for SearchLimits {
    fn default() -> Self {
        let quota = Quota::per_second(NonZeroU32::new(SEARCHES_PER_SEC).expect("positive"))
            .allow_burst(NonZeroU32::new(SEARCH_BURST).expect("positive"));
        Self {
            limits: RateLimiter::keyed(quota),
            last_prune: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl SearchLimits {
    /// Whether `peer` may have another search answered now.
    pub fn allow(&self, peer: &PeerId) -> bool {
        if self.limits.len() > SEARCH_PEERS_TRACKED && self.prune_due() {
            // Peers back at a full allowance need no entry.
            self.limits.retain_recent();
        }
        self.limits.check_key(peer).is_ok()
    }

    /// True at most once per [`SEARCH_PRUNE_EVERY`]; a search that finds
    /// another one pruning goes on without waiting.
    fn prune_due(&self) -> bool {
        let Ok(mut last) = self.last_prune.try_lock() else {
            return false;
        };
        if last.elapsed() < SEARCH_PRUNE_EVERY {
            return false;
        }
        *last = std::time::Instant::now();
        true
    }
}

/// How long one answer (or a flush) may take to leave. A peer that keeps
/// asking and stops reading would otherwise pin what was computed for it,
/// and this stream, for as long as it likes.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a batch waits for one of the node's serving permits before it is
/// answered `Busy` (well inside a downloader's 15 s answer timeout).
const NODE_PERMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Batches of answers computed ahead of the writer: encoding (disk reads,
/// hashing) of the next blocks overlaps with sending the current ones.
const SERVE_AHEAD: usize = 4;
/// Requests answered by one blocking job at most. A pipelined transfer's
/// requests arrive several to a packet; one job per batch spares a thread
/// hand-off per block (on these machines a hand-off costs more than reading
/// the block) without holding a thread while the stream idles.
const BATCH: usize = 8;
/// A stream that sends no request for this long is closed.
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

type Answers = Vec<(TransferResponse, Vec<u8>)>;

/// A stream's requests: length-prefixed, decoded by a framer that keeps
/// partial input (so asking "is another request already here?" loses
/// nothing), none larger than a request header may be.
fn requests_of<R: futures::AsyncRead>(
    rd: R,
) -> FramedRead<tokio_util::compat::Compat<R>, LengthDelimitedCodec> {
    let codec = LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(transfer::MAX_HEADER_BYTES as usize)
        .new_codec();
    FramedRead::new(rd.compat(), codec)
}

/// How long a stream over the per-peer cap waits for the request it is
/// refused with.
const OVER_CAP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers the first request of a stream over the per-peer cap with
/// `TooManyStreams` and ends the stream: a typed "not on this stream" the
/// downloader does not hold against this node, where a silently closed
/// stream looked like a failure (and a `Busy` one, followed by the end of
/// the stream, too).
async fn refuse_over_cap<R, W>(rd: R, mut wr: W)
where
    R: futures::AsyncRead + Unpin,
    W: futures::AsyncWrite + Unpin,
{
    let mut requests = requests_of(rd);
    let answered = async {
        if !matches!(requests.next().await, Some(Ok(_))) {
            return Ok(());
        }
        let busy = TransferResponse::failed(
            Status::TooManyStreams,
            format!(
                "this node already serves {STREAMS_PER_PEER} content streams to you; use those"
            ),
        );
        write_msg(&mut wr, &busy).await?;
        wr.close().await
    };
    let _ = tokio::time::timeout(OVER_CAP_WAIT, answered).await;
}

/// Serves one content stream from `peer`: a libp2p stream, or a fast-path
/// connection (the same protocol either way).
/// `group`: the group of the group session the stream is (none: a plain
/// content stream, which group items are never served on).
pub(crate) async fn serve_stream<R, W>(
    svc: ContentService,
    peer: PeerId,
    group: Option<GroupId>,
    rd: R,
    mut wr: W,
) where
    R: futures::AsyncRead + Unpin + Send + 'static,
    W: PayloadWrite,
{
    let standing = svc.standing(&peer);
    if standing >= Standing::Refused {
        debug!(%peer, ?standing, "refusing a content stream: credit policy");
        return;
    }
    let Some(_slot) = svc.inner.served.enter(peer) else {
        debug!(%peer, "refusing a content stream: {STREAMS_PER_PEER} already served to it");
        refuse_over_cap(rd, wr).await;
        return;
    };
    if svc.inner.config.test_silent_server {
        // Fault injection: hold the stream, answer nothing.
        let _held = (rd, wr);
        svc.inner.shutdown.cancelled().await;
        return;
    }
    let throttle = (standing == Standing::Throttled).then(|| {
        svc.inner
            .throttles
            .get(peer, svc.inner.credit.throttled_rate_bytes_per_sec)
    });
    let mut requests = requests_of(rd);
    type Job = (
        tokio::task::JoinHandle<Answers>,
        (
            tokio::sync::OwnedSemaphorePermit,
            Option<tokio::sync::OwnedSemaphorePermit>,
        ),
    );
    let peer_batches = svc.inner.peer_batches.get(peer);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Job>(SERVE_AHEAD);
    let limiter_svc = svc.clone();
    let writer = svc.spawn(async move {
        // The permit goes when the batch has been written (or the stream
        // ends), with the memory it stands for.
        while let Some((job, _permit)) = rx.recv().await {
            let Ok(answers) = job.await else {
                return;
            };
            for (header, payload) in answers {
                if let Some(limiter) = &limiter_svc.inner.limiter {
                    limiter.take(payload.len() as u64).await;
                }
                if let Some(throttle) = &throttle {
                    throttle.take(payload.len() as u64).await;
                }
                if !payload.is_empty() && header.status == Status::Ok as i32 {
                    limiter_svc.inner.ledger.record(
                        peer,
                        EventKind::Served {
                            bytes: payload.len() as u64,
                        },
                    );
                }
                let bytes = payload.len() as u64;
                let sent = async {
                    write_msg(&mut wr, &header).await?;
                    wr.write_payload(payload).await
                };
                if let Err(e) = bounded(&limiter_svc, peer, sent).await {
                    debug!(%peer, error = %e, "content stream write failed");
                    return;
                }
                tracing::trace!(%peer, status = header.status, bytes, "answered");
                limiter_svc
                    .inner
                    .upload_slots
                    .sent(bytes, std::time::Instant::now());
            }
            // Batch: flush only when no further answer is ready.
            if rx.is_empty()
                && let Err(e) = bounded(&limiter_svc, peer, wr.flush()).await
            {
                debug!(%peer, error = %e, "content stream write failed");
                return;
            }
        }
        let _ = wr.close().await;
    });
    let decode = |frame: bytes::BytesMut| {
        TransferRequest::decode(frame.freeze())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    };
    let violation = |e: &std::io::Error| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            // Undecodable or oversized request: the peer broke the protocol.
            svc.inner.ledger.record(peer, EventKind::Violation);
        }
        debug!(%peer, error = %e, "content stream ended");
    };
    'serve: loop {
        let next = tokio::select! {
            next = tokio::time::timeout(IDLE, requests.next()) => next,
            _ = svc.inner.shutdown.cancelled() => break,
        };
        let first = match next {
            Err(_) => {
                debug!(%peer, "content stream idle; closing it");
                break;
            }
            Ok(None) => break,
            Ok(Some(r)) => r.and_then(decode),
        };
        let mut batch = match first {
            Ok(req) => vec![req],
            Err(e) => {
                violation(&e);
                break;
            }
        };
        let mut ended = false;
        while batch.len() < BATCH {
            match requests.next().now_or_never() {
                Some(Some(r)) => match r.and_then(decode) {
                    Ok(req) => batch.push(req),
                    Err(e) => {
                        violation(&e);
                        ended = true;
                        break;
                    }
                },
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        // The peer's own allowance first, so that a peer at its limit waits
        // without holding any of the node's.
        let permits = (peer_batches.clone(), svc.inner.serve_permits.clone());
        let acquired = async move {
            let own = permits.0.acquire_owned().await?;
            // When others hold the node's permits (peers that ask and do not
            // read, say), answer `Busy` soon rather than sit silent: a
            // silent provider is charged as one that never answers.
            let node = tokio::time::timeout(NODE_PERMIT_WAIT, permits.1.acquire_owned())
                .await
                .ok()
                .transpose()?;
            Ok::<_, tokio::sync::AcquireError>((own, node))
        };
        let permit = tokio::select! {
            p = acquired => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = svc.inner.shutdown.cancelled() => break,
        };
        let answering = svc.clone();
        let busy = permit.1.is_none();
        let job = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|req| {
                    if busy {
                        failed(Status::Busy, "the node is answering too many requests")
                    } else {
                        answer(&answering, &peer, group, req)
                    }
                })
                .collect()
        });
        // The writer ends within WRITE_TIMEOUT if the peer stops reading,
        // and this send with it.
        let sent = tokio::select! {
            sent = tx.send((job, permit)) => sent.is_ok(),
            _ = svc.inner.shutdown.cancelled() => false,
        };
        if !sent || ended {
            break 'serve;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A write to `peer` that must end within [`WRITE_TIMEOUT`]; a peer that
/// does not read its answers in that time failed its requests.
async fn bounded(
    svc: &ContentService,
    peer: PeerId,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => {
            svc.inner.ledger.record(peer, EventKind::RequestFailed);
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer stopped reading its answers",
            ))
        }
    }
}

fn failed(status: Status, msg: impl Into<String>) -> (TransferResponse, Vec<u8>) {
    (TransferResponse::failed(status, msg), Vec::new())
}

fn parse_id(bytes: &[u8]) -> Option<ContentId> {
    Some(ContentId(bytes.try_into().ok()?))
}

/// A block of a stored item or of a download in progress (reads the disk:
/// called on a blocking thread).
fn answer_block(
    svc: &ContentService,
    peer: &PeerId,
    b: &transfer::BlockRequest,
) -> (TransferResponse, Vec<u8>) {
    let store = &svc.inner.store;
    let Some(id) = parse_id(&b.content_id) else {
        return failed(Status::BadRequest, "content id must be 32 bytes");
    };
    let busy = || {
        !svc.inner
            .upload_slots
            .admit(*peer, std::time::Instant::now())
    };
    match store.get(&id) {
        Ok(Some(info)) => {
            if b.block >= block_count(info.size) {
                return failed(Status::BadRequest, "block beyond the end");
            }
            if busy() {
                return failed(Status::Busy, "all upload slots are taken");
            }
            match store.encode_block(&id, b.block, svc.inner.config.verify_on_serve) {
                Ok(wire) => (TransferResponse::ok(wire.len() as u64), wire),
                Err(e) => {
                    warn!(%id, block = b.block, error = %e, "cannot serve a stored block");
                    failed(Status::Unavailable, "local read failed")
                }
            }
        }
        Ok(None) => {
            let dl = svc.inner.downloads.lock().expect("lock").get(&id).cloned();
            let Some(dl) = dl else {
                return failed(Status::NotFound, "unknown content");
            };
            if b.block >= dl.partial.blocks() {
                return failed(Status::BadRequest, "block beyond the end");
            }
            if !dl.partial.has(b.block) {
                return failed(Status::NotHeld, "not downloaded yet");
            }
            if busy() {
                return failed(Status::Busy, "all upload slots are taken");
            }
            match dl.partial.encode_block(b.block) {
                Ok(wire) => (TransferResponse::ok(wire.len() as u64), wire),
                Err(_) => failed(Status::Unavailable, "local read failed"),
            }
        }
        Err(e) => {
            warn!(error = %e, "store lookup failed");
            failed(Status::Unavailable, "local error")
        }
    }
}

/// The proof of an item's size: derived from the last block of a stored
/// item, and for a download the proof it started with (it may not hold the
/// last block yet). Not subject to upload slots: it is a couple of KiB, and a
/// newcomer cannot start without it.
fn answer_size_proof(svc: &ContentService, id: &ContentId) -> (TransferResponse, Vec<u8>) {
    let validate = svc.inner.config.verify_on_serve;
    match svc.inner.store.size_proof(id, validate) {
        Ok(proof) => return (TransferResponse::ok(proof.len() as u64), proof),
        Err(p2pvm_content::StoreError::NotFound(_)) => {}
        Err(e) => {
            warn!(%id, error = %e, "cannot prove a stored item's size");
            return failed(Status::Unavailable, "local read failed");
        }
    }
    let dl = svc.inner.downloads.lock().expect("lock").get(id).cloned();
    match dl {
        Some(dl) => (
            TransferResponse::ok(dl.size_proof.len() as u64),
            dl.size_proof.clone(),
        ),
        None => failed(Status::NotFound, "unknown content"),
    }
}

/// What a neighbour is told about `id`: `Complete` or `Ok` (part of it)
/// if this node holds it and announces it, else nothing.
fn holds(svc: &ContentService, id: &ContentId) -> Option<Status> {
    if let Ok(Some(signed)) = svc.inner.store.manifest(id) {
        let m = crate::content::VerifiedManifest::parse(&signed).ok()?;
        return svc.may_announce(&m.manifest).then_some(Status::Complete);
    }
    let dl = svc.inner.downloads.lock().expect("lock").get(id).cloned()?;
    (dl.keep() && svc.may_announce(&dl.manifest.manifest)).then_some(Status::Ok)
}

/// The item a request is about, if it names one.
fn item_of(op: &Op) -> Option<&[u8]> {
    match op {
        Op::Block(b) => Some(&b.content_id),
        Op::Manifest(id) | Op::Have(id) | Op::Holds(id) | Op::SizeProof(id) => Some(id),
        Op::Search(_) | Op::GroupKey(_) => None,
    }
}

/// One answer (reads the disk and hashes: called on a blocking thread).
fn answer(
    svc: &ContentService,
    peer: &PeerId,
    group: Option<GroupId>,
    req: TransferRequest,
) -> (TransferResponse, Vec<u8>) {
    let (mut header, payload) = answer_op(svc, peer, group, req);
    // A refusal says where a group session can be opened: a member asks
    // again there.
    if header.status == Status::Forbidden as i32 {
        header.fast_path_port = u32::from(svc.fast_path_port().unwrap_or(0));
    }
    (header, payload)
}

fn answer_op(
    svc: &ContentService,
    peer: &PeerId,
    group: Option<GroupId>,
    req: TransferRequest,
) -> (TransferResponse, Vec<u8>) {
    // The DRM checker first: nothing of an item (not even whether we hold
    // it) goes to a peer it may not be served to.
    if let Some(id) = req.op.as_ref().and_then(item_of).and_then(parse_id)
        && let Some(Err(e)) = svc.drm_serve(&id, peer, group)
    {
        debug!(%peer, %id, error = %e, "not serving: DRM");
        return failed(Status::Forbidden, e.to_string());
    }
    let store = &svc.inner.store;
    match req.op {
        Some(Op::Block(b)) => answer_block(svc, peer, &b),
        Some(Op::Manifest(id)) => {
            let Some(id) = parse_id(&id) else {
                return failed(Status::BadRequest, "content id must be 32 bytes");
            };
            let stored = store.manifest(&id).ok().flatten();
            let m = stored.or_else(|| {
                let dl = svc.inner.downloads.lock().expect("lock").get(&id).cloned();
                dl.map(|d| d.manifest.signed.clone())
            });
            match m {
                Some(m) => (TransferResponse::ok(m.len() as u64), m),
                None => failed(Status::NotFound, "unknown content"),
            }
        }
        Some(Op::Have(id)) => {
            let Some(id) = parse_id(&id) else {
                return failed(Status::BadRequest, "content id must be 32 bytes");
            };
            let fast_path_port = u32::from(svc.fast_path_port().unwrap_or(0));
            if matches!(store.get(&id), Ok(Some(_))) {
                let mut r = TransferResponse::failed(Status::Complete, "");
                r.fast_path_port = fast_path_port;
                return (r, Vec::new());
            }
            let dl = svc.inner.downloads.lock().expect("lock").get(&id).cloned();
            match dl {
                Some(d) => {
                    d.asked_by(*peer);
                    let bits = d.partial.bitfield();
                    let mut r = TransferResponse::ok(bits.len() as u64);
                    r.fast_path_port = fast_path_port;
                    (r, bits)
                }
                None => failed(Status::NotFound, "unknown content"),
            }
        }
        Some(Op::SizeProof(id)) => match parse_id(&id) {
            Some(id) => answer_size_proof(svc, &id),
            None => failed(Status::BadRequest, "content id must be 32 bytes"),
        },
        Some(Op::Holds(id)) => {
            let Some(id) = parse_id(&id) else {
                return failed(Status::BadRequest, "content id must be 32 bytes");
            };
            match holds(svc, &id) {
                Some(status) => failed(status, ""),
                None => failed(Status::NotFound, "unknown content"),
            }
        }
        Some(Op::Search(s)) => {
            if !svc.inner.search_limits.allow(peer) {
                return failed(
                    Status::Unavailable,
                    format!("too many searches: {SEARCHES_PER_SEC} a second at most"),
                );
            }
            if s.keywords.len() > 16 || s.keywords.iter().any(|w| w.len() > 64) {
                return failed(Status::BadRequest, "1-16 keywords of at most 64 bytes");
            }
            // Words as a local query has them: lower-cased, two characters
            // or more (an empty or one-letter prefix matches nearly all).
            let words = p2pvm_content::keywords::query_keywords(&s.keywords.join(" "));
            if words.is_empty() || words.len() > 16 {
                return failed(
                    Status::BadRequest,
                    "1-16 keywords of two or more letters or digits",
                );
            }
            let limit = (s.limit as usize).clamp(1, MAX_HITS);
            // The store's word index: only items under the query's longest
            // word are decoded (manifests were verified when stored).
            let found = store
                .search(&words, limit, |_, m| svc.drm_may_list(m, peer, group))
                .unwrap_or_default();
            let mut hits = transfer::SearchHits::default();
            let mut size = 0;
            for (_, signed) in found {
                size += signed.len();
                if size as u64 > transfer::MAX_PAYLOAD_BYTES / 2 {
                    break;
                }
                hits.manifests.push(signed);
            }
            let bytes = hits.encode_to_vec();
            (TransferResponse::ok(bytes.len() as u64), bytes)
        }
        Some(Op::GroupKey(r)) => match svc.answer_group_key(peer, group, &r) {
            Ok(key) => (TransferResponse::ok(key.len() as u64), key),
            Err(why) => failed(Status::Forbidden, why),
        },
        None => failed(Status::BadRequest, "empty request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_throttled_peer_shares_one_cap_over_all_its_streams() {
        let throttles = PeerThrottles::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let one = throttles.get(a, 64 * 1024);
        let two = throttles.get(a, 64 * 1024);
        assert!(
            Arc::ptr_eq(&one, &two),
            "a second stream got a cap of its own"
        );
        assert!(!Arc::ptr_eq(&one, &throttles.get(b, 64 * 1024)));
        // The burst (one block) is spent by the first stream; the second must
        // then wait for the shared bucket to refill.
        one.take(one.burst as u64).await;
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(200), two.take(64 * 1024));
        assert!(
            waited.await.is_err(),
            "the second stream was not held to the shared rate"
        );
        // Gone with its last stream: the map does not grow with every peer seen.
        drop((one, two));
        throttles.get(PeerId::random(), 1);
        assert_eq!(throttles.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_peer_gets_a_bounded_number_of_streams_and_its_slots_come_back() {
        let streams = Arc::new(PeerStreams::default());
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut held: Vec<StreamSlot> = (0..STREAMS_PER_PEER)
            .map(|_| streams.enter(a).expect("under the cap"))
            .collect();
        assert!(streams.enter(a).is_none(), "a stream over the cap");
        // Others are not held to a's count.
        let other = streams.enter(b).expect("another peer");
        held.pop();
        held.push(streams.enter(a).expect("a slot came back"));
        assert!(streams.enter(a).is_none(), "a stream over the cap");
        drop(other);
        assert_eq!(streams.0.lock().unwrap().len(), 1);
        // Gone with the last stream: peers seen once do not stay in the map.
        drop(held);
        assert!(streams.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_stream_over_the_cap_is_answered_with_a_typed_refusal_not_just_closed() {
        let (client, server) = tokio::io::duplex(4096);
        let (srd, swr) = tokio::io::split(server);
        use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
        let refusing = tokio::spawn(refuse_over_cap(srd.compat(), swr.compat_write()));
        let (crd, mut cwr) = tokio::io::split(client);
        let have = TransferRequest {
            op: Some(Op::Have(vec![7; 32])),
        };
        tokio::io::AsyncWriteExt::write_all(&mut cwr, &transfer::frame(&have))
            .await
            .unwrap();
        let mut crd = crd.compat();
        let answer: TransferResponse = super::super::wire::read_msg(&mut crd)
            .await
            .expect("readable")
            .expect("an answer");
        assert_eq!(answer.status, Status::TooManyStreams as i32);
        assert!(
            answer.message.contains("content streams"),
            "{}",
            answer.message
        );
        refusing.await.unwrap();
    }

    #[test]
    fn a_peer_holds_a_bounded_share_of_the_answers_in_flight() {
        let batches = PeerBatches::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let (one, two) = (batches.get(a), batches.get(a));
        assert!(
            Arc::ptr_eq(&one, &two),
            "a second stream got its own allowance"
        );
        let held: Vec<_> = (0..BATCHES_PER_PEER)
            .map(|_| {
                one.clone()
                    .try_acquire_owned()
                    .expect("within the allowance")
            })
            .collect();
        assert!(
            two.clone().try_acquire_owned().is_err(),
            "over the allowance"
        );
        assert!(batches.get(b).try_acquire_owned().is_ok(), "b held to a's");
        drop(held);
        assert!(two.try_acquire_owned().is_ok());
    }

    #[test]
    fn searches_are_answered_in_a_burst_then_at_a_bounded_rate_per_peer() {
        let limits = SearchLimits::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        for i in 0..SEARCH_BURST {
            assert!(limits.allow(&a), "search {i} of the burst refused");
        }
        assert!(!limits.allow(&a), "a search past the burst answered");
        assert!(limits.allow(&b), "another peer held to a's allowance");
        // The allowance comes back at its rate.
        std::thread::sleep(std::time::Duration::from_millis(
            1100 / u64::from(SEARCHES_PER_SEC),
        ));
        assert!(limits.allow(&a));
    }

    #[test]
    fn idle_search_peers_are_pruned_at_most_once_per_interval() {
        let limits = SearchLimits::default();
        assert!(!limits.prune_due(), "a pass right after the start");
        *limits.last_prune.lock().unwrap() -= SEARCH_PRUNE_EVERY;
        assert!(limits.prune_due());
        assert!(!limits.prune_due(), "a second pass in the same interval");
    }
}
