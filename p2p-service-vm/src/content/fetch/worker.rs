//! One worker per provider: it learns what the provider holds (`Have`),
//! keeps a pipeline of block requests in flight on each of its connections
//! (the libp2p stream, or several fast-path connections), verifies what
//! arrives and hands it to the download. The schedule decides which block
//! each freed slot asks for, so faster providers take more blocks.
//!
//! However the worker ends, what it had in flight goes back to the pool, and
//! its error — typed — is charged to the provider once, by
//! [`ProviderError::evidence`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::AsyncWriteExt;
use libp2p::PeerId;
use p2pvm_content::transfer::{self, BlockRequest, Op, Status, TransferRequest, TransferResponse};
use p2pvm_content::{BLOCK_BYTES, block_count, block_range};
use p2pvm_security::{EventKind, GroupId, Standing};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::download::{Download, Outcome, WriteJob};
use super::peer::{group_session, open_stream, request, response};
use super::sched::Have;
use crate::content::budget::Lease;
use crate::content::error::ProviderError;
use crate::content::sealed::{SealedReader, SealedWriter};
use crate::content::wire::{
    PayloadRead, PayloadWrite, read_msg, read_payload, read_payload_bytes, write_msg,
};
use crate::content::{ContentService, ContentServiceError};
use crate::node::NodeEvent;

/// How often an idle worker re-asks a partial provider what it holds.
const HAVE_REFRESH: Duration = Duration::from_millis(500);
/// How long a provider may leave requests unanswered before it is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Blocks a provider may refuse as not held, one after another with none
/// served between, before it leaves the download for a pause (a swarm
/// peer's `Have` can run a moment ahead of what it can serve; a provider
/// that claims the whole item and serves nothing should not hold a slot).
const NOT_HELD_IN_A_ROW: u32 = 16;
/// A partial provider that has had nothing we still need for this long, while
/// the download still needs something, makes room for another provider (the
/// driver may come back to it once it holds more).
const NOTHING_WANTED_FOR: Duration = Duration::from_secs(4);
/// A provider whose upload slots are all taken is asked again after this.
const BUSY_PAUSE: Duration = Duration::from_millis(500);
/// How long a provider may keep us waiting for an upload slot before its
/// worker makes room for another provider (the driver may come back to it).
const BUSY_GIVE_UP: Duration = Duration::from_secs(3);
/// How long a low-credit provider waits before its first request.
const THROTTLED_HEAD_START: Duration = Duration::from_secs(1);
/// How long a provider's queue of our requests should take to drain. Deeper
/// queues add latency (a capped uploader answers late, the end game duplicates
/// requests); shallower ones leave a fast link idle between answers.
const TARGET_QUEUE: Duration = Duration::from_millis(250);

/// Why a worker is winding down, once one of its connections has decided
/// that it should (nothing wanted, no upload slot): its connections stop
/// asking and end once their answers are in, so blocks already on their way
/// are not thrown away with the connection.
#[derive(Default)]
struct Ending(std::sync::Mutex<Option<ProviderError>>);

impl Ending {
    fn set(&self, e: ProviderError) {
        let mut why = self.0.lock().unwrap_or_else(|p| p.into_inner());
        why.get_or_insert(e);
    }

    fn is_set(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The worker's result once all its connections have ended cleanly.
    fn result(self) -> Result<(), ProviderError> {
        match self.0.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One request a connection has on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Block(u64),
    Have,
}

/// A request on the wire, with the memory budget its answer will use.
#[derive(Debug)]
struct Inflight {
    pending: Pending,
    lease: Option<Lease>,
}

/// Fetches from `peer` until the download ends or the provider fails.
pub(super) async fn worker(svc: ContentService, dl: Arc<Download>, peer: PeerId) {
    let r = run(&svc, &dl, peer).await;
    {
        let mut st = dl.state();
        let seed = st.sched.is_complete(&peer);
        let abandoned = st.sched.retire_peer(&peer);
        tracing::trace!(%peer, seed, abandoned, "worker ended");
        st.tally.abandoned += abandoned;
        let why = r.as_ref().map_or_else(|e| e.kind(), |()| "done");
        *st.tally.ended.entry(why).or_default() += 1;
    }
    dl.changed.notify_waiters();
    if let Err(e) = r {
        charge(&svc, &dl, peer, &e);
        debug!(id = %dl.id, %peer, error = %crate::content::error::chain(&e), "provider dropped");
    }
}

/// What a provider's failure costs it: the ledger's evidence; for corrupt
/// data, exclusion from this download and an event; for not holding the
/// item, a pause before it is asked again.
fn charge(svc: &ContentService, dl: &Download, peer: PeerId, e: &ProviderError) {
    // A peer that does not hold the item (often an honest one that is still
    // fetching it, or behind a stale DHT record) pauses and is asked again;
    // it is charged once per download, not at every provider lookup until
    // its credit is gone.
    let charged = match e {
        ProviderError::NotProviding(_) => dl.state().sched.back_off(peer, Instant::now()),
        // Only "not on another stream now": a short pause, never charged,
        // and no strike toward the pauses of a provider without the item.
        ProviderError::StreamsFull(_) => {
            dl.state().sched.pause(peer, Instant::now());
            false
        }
        _ => true,
    };
    if charged && let Some(evidence) = e.evidence() {
        svc.inner.ledger.record(peer, evidence);
    }
    if let ProviderError::Corrupt { block, .. } = e {
        warn!(id = %dl.id, %peer, block, "corrupt block from provider; dropping it and the provider");
        dl.state().sched.mark_bad(peer);
        svc.emit(NodeEvent::CorruptData {
            peer,
            id: dl.id,
            block: *block,
        });
    }
}

async fn run(svc: &ContentService, dl: &Arc<Download>, peer: PeerId) -> Result<(), ProviderError> {
    let mut stream = open_stream(svc, peer).await?;
    // The first Have goes alone: its answer says what the provider holds and
    // whether blocks can take the fast path. A provider that never answers
    // frees its worker slot like one that stops answering later.
    let Some((header, payload)) = first_have(dl, &mut stream).await? else {
        return Ok(());
    };
    // Over the provider's per-peer stream cap: before anything else (a group
    // item's refusal would otherwise be read as a missing fast path).
    if header.status == Status::TooManyStreams as i32 {
        return Err(ProviderError::StreamsFull(header.message));
    }
    // A group item: refused on this stream; everything goes over group
    // sessions (the refusal names the port where they open).
    let groups = svc.memberships_for(&dl.manifest.manifest);
    if !groups.is_empty() {
        return run_in_group(svc, dl, peer, &groups, &header).await;
    }
    let complete = on_have(svc, dl, peer, &header, &payload)?;
    let port = header.fast_path_port;
    if let Some(first) = fast_path(svc, peer, port).await {
        debug!(id = %dl.id, %peer, "blocks take the fast path");
        // Nothing more goes over the libp2p stream: close it rather than
        // hold one of the provider's per-peer streams for the whole download.
        let _ = futures::AsyncWriteExt::close(&mut stream).await;
        drop(stream);
        return lanes(svc, dl, peer, first, complete, || {
            fast_path(svc, peer, port)
        })
        .await;
    }
    let conn = futures::AsyncReadExt::split(stream);
    let ending = Ending::default();
    pipeline(
        svc,
        dl,
        peer,
        conn,
        complete,
        &ending,
        Lane::First(&Spread::default()),
    )
    .await?;
    ending.result()
}

/// Connections per provider beyond the first are dialled once the first
/// carries more than this: only then is one connection's decryption and
/// hashing, on one core at a time, what limits the transfer (on loopback a
/// second connection gives 13 % more). A home line never gets there, and on
/// 60 home lines the second connection's handshake and `Have` polls cost a
/// quarter of the downloaders' CPU time for nothing.
const SPREAD_ABOVE: f64 = 40.0 * 1024.0 * 1024.0;

/// Which of a worker's connections a pipeline runs on: the first asks the
/// provider what it holds for all of them and says when the link is fast
/// enough to spread over more.
#[derive(Clone, Copy)]
enum Lane<'a> {
    First(&'a Spread),
    Extra,
}

/// Between a worker's first connection and the dialling of more.
#[derive(Default)]
struct Spread {
    fast: tokio::sync::Notify,
    ended: tokio::sync::Notify,
}

impl Spread {
    /// Whether more connections are wanted: the first one said its link is
    /// fast before it ended.
    async fn wanted(&self) -> bool {
        // An ended first connection wins a tie: its worker is done.
        tokio::select! {
            biased;
            _ = self.ended.notified() => false,
            _ = self.fast.notified() => true,
        }
    }
}

/// Fetches over `first` and, once it proves fast, more connections made by
/// `dial` (up to `fast_path_connections`), each with a pipeline of its own.
async fn lanes<F, Fut>(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    first: (SealedReader, SealedWriter),
    complete: bool,
    dial: F,
) -> Result<(), ProviderError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<(SealedReader, SealedWriter)>>,
{
    let ending = Ending::default();
    let spread = Spread::default();
    let first = async {
        let r = pipeline(
            svc,
            dl,
            peer,
            first,
            complete,
            &ending,
            Lane::First(&spread),
        )
        .await;
        // Stored as a permit if nobody waits yet: `wanted` cannot miss it.
        spread.ended.notify_one();
        r
    };
    let more = async {
        if !spread.wanted().await {
            return Ok(());
        }
        debug!(id = %dl.id, %peer, "a fast link: more connections");
        let conns = more_connections(svc, dl, peer, dial).await;
        futures::future::try_join_all(
            conns
                .into_iter()
                .map(|c| pipeline(svc, dl, peer, c, complete, &ending, Lane::Extra)),
        )
        .await
        .map(|_| ())
    };
    futures::future::try_join(first, more).await?;
    ending.result()
}

/// A group item from `peer`: over group sessions of the first of `groups`
/// that opens one.
async fn run_in_group(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    groups: &[GroupId],
    refusal: &TransferResponse,
) -> Result<(), ProviderError> {
    let mut opened = Err(super::peer::forbidden(refusal.message.clone()));
    for g in groups {
        opened = group_session(svc, peer, *g, refusal.fast_path_port)
            .await
            .map(|s| (*g, s));
        if opened.is_ok() {
            break;
        }
    }
    let (group, mut session) = opened?;
    let Some((header, payload)) = first_have(dl, &mut session).await? else {
        return Ok(());
    };
    let complete = on_have(svc, dl, peer, &header, &payload)?;
    debug!(id = %dl.id, %peer, %group, "blocks take group sessions");
    let port = refusal.fast_path_port;
    let dial = || async move {
        group_session(svc, peer, group, port)
            .await
            .ok()
            .map(|s| (s.0, s.1))
    };
    lanes(svc, dl, peer, (session.0, session.1), complete, dial).await
}

/// The first `Have` and its answer (`None`: the download was cancelled).
async fn first_have(
    dl: &Download,
    stream: &mut (impl futures::AsyncRead + futures::AsyncWrite + Unpin),
) -> Result<Option<(TransferResponse, Vec<u8>)>, ProviderError> {
    let first = async {
        request(stream, Op::Have(dl.id.0.to_vec())).await?;
        let header = response(stream).await?;
        let payload = if header.status == Status::Ok as i32 {
            let max = block_count(dl.partial.size()).div_ceil(8);
            read_payload(stream, header.payload_len, max).await?
        } else {
            Vec::new()
        };
        Ok::<_, std::io::Error>((header, payload))
    };
    tokio::select! {
        r = tokio::time::timeout(ANSWER_TIMEOUT, first) => Ok(Some(r.map_err(|_| ProviderError::NoAnswer)??)),
        _ = dl.cancel.cancelled() => Ok(None),
    }
}

/// More connections to `peer` (made by `dial`), each with a pipeline of its
/// own, for a peer we trust with more than one request at a time.
async fn more_connections<F, Fut>(
    svc: &ContentService,
    dl: &Download,
    peer: PeerId,
    dial: F,
) -> Vec<(SealedReader, SealedWriter)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<(SealedReader, SealedWriter)>>,
{
    let extra = if svc.standing(&peer) == Standing::Throttled {
        0
    } else {
        svc.inner.config.fast_path_connections - 1
    };
    let dials = (0..extra).map(|_| dial());
    tokio::select! {
        all = futures::future::join_all(dials) => all.into_iter().flatten().collect(),
        _ = dl.cancel.cancelled() => Vec::new(),
    }
}

/// A fast-path connection to `peer` if it offers one (`port`) and it can be
/// reached at the address our libp2p connection uses; `None` otherwise.
async fn fast_path(
    svc: &ContentService,
    peer: PeerId,
    port: u32,
) -> Option<(SealedReader, SealedWriter)> {
    let fast = svc.inner.fast_path.as_ref()?;
    let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
    let ip = super::peer::remote_ip(svc, peer).await?;
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
    dl: &Download,
    peer: PeerId,
    header: &TransferResponse,
    payload: &[u8],
) -> Result<bool, ProviderError> {
    let (have, complete) = match Status::try_from(header.status) {
        Ok(Status::Complete) => (Have::All, true),
        Ok(Status::Ok) => (Have::Some(have_bits(payload, dl.partial.blocks())?), false),
        Ok(Status::Forbidden) => return Err(super::peer::forbidden(header.message.clone())),
        Ok(Status::TooManyStreams) => {
            return Err(ProviderError::StreamsFull(header.message.clone()));
        }
        _ => return Err(ProviderError::NotProviding(header.message.clone())),
    };
    svc.inner.ledger.record(peer, EventKind::RequestOk);
    dl.state().sched.set_have(peer, have);
    dl.changed.notify_waiters();
    Ok(complete)
}

/// A `Have` bitfield (least significant bit first) as one flag per block of
/// an item of `blocks` blocks; bits past the last block are ignored, a
/// bitfield too short for the item is refused.
pub(crate) fn have_bits(payload: &[u8], blocks: u64) -> Result<Vec<bool>, ProviderError> {
    if (payload.len() as u64) < blocks.div_ceil(8) {
        return Err(ProviderError::ShortBitfield);
    }
    Ok((0..blocks)
        .map(|k| {
            payload
                .get((k / 8) as usize)
                .is_some_and(|b| b & (1 << (k % 8)) != 0)
        })
        .collect())
}

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
            // Until measured, two blocks: a fast link fills within the first
            // measurement (200 ms), and a slow or busy provider does not get
            // a queue of seconds from each of a crowd's first requests.
            None => 2.min(self.max),
            // One block per connection at least: on a slow line a second
            // queued block waits seconds, outlives the upload turn it was
            // asked in and comes back `Busy`.
            Some(r) => {
                let blocks = (r * TARGET_QUEUE.as_secs_f64() / BLOCK_BYTES as f64).ceil() as usize;
                blocks.clamp(1, self.max.max(1))
            }
        }
    }
}

/// One answer as the reading half of a connection delivers it.
struct Answer {
    pending: Pending,
    header: TransferResponse,
    payload: Bytes,
}

/// Reads answers in request order; `kinds` says what each one answers, so the
/// payload bound is known before any of it is read. `kinds` is bounded by the
/// pipeline depth: the writer never has more requests out than that.
async fn read_answers<R: PayloadRead>(
    mut rd: R,
    mut kinds: mpsc::Receiver<Pending>,
    out: mpsc::Sender<std::io::Result<Answer>>,
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
            Ok(Answer {
                pending,
                header,
                payload,
            })
        }
        .await;
        let failed = got.is_err();
        if out.send(got).await.is_err() || failed {
            return;
        }
    }
}

/// Verifies a block on the worker's task and hands it over: into memory for
/// a download that keeps nothing, to the download's writer thread for one
/// that keeps the item. A block that fails verification is dropped (and the
/// provider with it).
async fn verify_block(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    (k, wire, lease): (u64, Bytes, Lease),
    secs: f64,
) -> Result<(), ProviderError> {
    if dl.holds(k) {
        // A duplicate from the end game; the other copy won.
        let mut st = dl.state();
        st.sched.release(peer, k);
        st.tally.duplicates += 1;
        let seed = st.sched.is_complete(&peer);
        tracing::trace!(%peer, block = k, seed, fresh = false, "block held");
        return Ok(());
    }
    let at = match dl.partial.verify(k, &wire) {
        Ok(at) => at,
        Err(source) => {
            dl.release(peer, k);
            return Err(ProviderError::Corrupt { block: k, source });
        }
    };
    // The block's bytes are a slice of the buffer they arrived in.
    let job = WriteJob {
        peer,
        k,
        block: wire.slice(at..),
        lease,
        secs,
    };
    if !dl.keep() {
        return accept(svc, dl, job);
    }
    let writer = dl.writer(svc, |svc, dl, job| {
        // A failed write has failed the download; the worker sees it cancelled.
        let _ = accept(svc, dl, job);
    });
    if writer.send(job).await.is_err() {
        return Err(ProviderError::Local(
            dl.failure().unwrap_or(ContentServiceError::Cancelled),
        ));
    }
    Ok(())
}

/// Takes a verified block (memory or disk, see [`Download::hold`]) and
/// credits the provider; a local write error fails the download.
fn accept(svc: &ContentService, dl: &Download, job: WriteJob) -> Result<(), ProviderError> {
    let WriteJob {
        peer,
        k,
        block,
        lease,
        secs,
    } = job;
    match dl.hold(peer, k, block, lease) {
        Ok(fresh) => {
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
        Err(e) => {
            // Our disk, not the peer: the whole transfer cannot go on.
            let error = dl.write_failed(k, e);
            dl.fail(error.clone());
            Err(ProviderError::Local(error))
        }
    }
}

/// Aborts the answer reader when its pipeline ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps block requests in flight to `peer` on one connection until the
/// download ends, the provider fails, or the worker winds down (`ending`:
/// then it asks for nothing more and ends once its answers are in). Blocks
/// it asked for and did not settle are released when the worker ends.
async fn pipeline<R: PayloadRead, W: PayloadWrite>(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    (rd, mut wr): (R, W),
    mut complete_peer: bool,
    ending: &Ending,
    lane: Lane<'_>,
) -> Result<(), ProviderError> {
    let id = dl.id;
    let mut said_fast = false;
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
        dl.state().sched.set_throttled(peer);
        // Give better peers a head start, so their holdings are known before
        // this one is asked for anything.
        tokio::select! {
            _ = tokio::time::sleep(THROTTLED_HEAD_START) => {}
            _ = dl.cancel.cancelled() => return Ok(()),
        }
    }
    let mut rate = RateMeter::new(max_depth);
    // Requests on the wire, oldest first; at most `max_depth` blocks and one Have.
    let mut inflight: VecDeque<Inflight> = VecDeque::new();
    // A lease got by waiting, for the next request.
    let mut spare: Option<Lease> = None;
    // Room for every request the pipeline may have out: `depth` blocks (at
    // least two) and one Have.
    let room = max_depth.max(2) + 1;
    let (kinds_tx, kinds_rx) = mpsc::channel(room);
    let (answers_tx, mut answers) = mpsc::channel(room);
    let _reader = AbortOnDrop(tokio::spawn(read_answers(
        rd,
        kinds_rx,
        answers_tx,
        dl.partial.size(),
    )));

    async fn send<W: futures::AsyncWrite + Unpin>(
        wr: &mut W,
        kinds: &mpsc::Sender<Pending>,
        inflight: &mut VecDeque<Inflight>,
        op: Op,
        (pending, lease): (Pending, Option<Lease>),
    ) -> Result<(), ProviderError> {
        inflight.push_back(Inflight { pending, lease });
        // Room is certain: the reader's queue holds as many as we keep out.
        kinds
            .try_send(pending)
            .map_err(|_| std::io::Error::other("answer reader gone"))?;
        write_msg(wr, &TransferRequest { op: Some(op) }).await?;
        Ok(())
    }
    let mut last_have = Instant::now();
    let mut flush_needed = false;
    // Payload bytes after which this pipeline ends and its connection is
    // dialled again (fresh keys on the fast path).
    let rotate_after = svc.inner.config.fast_path_rotate_bytes;
    let mut carried = 0u64;
    // Blocks refused as not held since the last one served: a provider
    // that claims blocks and serves none must not keep its worker slot.
    let mut refused_in_a_row = 0u32;
    // Since when, and until when, the provider has had no upload slot for us.
    let mut waiting_since: Option<Instant> = None;
    let mut busy_until = Instant::now();
    // Since when this partial provider has had nothing we need.
    let mut useless_since: Option<Instant> = None;
    loop {
        if dl.cancel.is_cancelled() || matches!(*dl.outcome.borrow(), Outcome::Complete) {
            return Ok(());
        }
        let leaving = ending.is_set();
        if leaving && inflight.is_empty() {
            return Ok(());
        }
        if carried >= rotate_after && inflight.is_empty() {
            // Well before a fast-path key runs out: end cleanly, and the
            // driver starts a fresh worker (new connections, new keys) for
            // this provider, which is no fault of its.
            debug!(%id, %peer, "connection carried {carried} bytes; dialling afresh");
            return Ok(());
        }
        // Fill the pipeline (requests on the wire),
        // a quarter of it at a time once it runs: requests then travel
        // several to a packet instead of one per answered block.
        let depth = rate.depth();
        let busy = inflight.len();
        let batch = if busy == 0 { 1 } else { (depth / 4).max(1) };
        let was_idle = busy == 0;
        let mut starved = false;
        let in_line = Instant::now() < busy_until;
        while !leaving
            && !in_line
            && carried < rotate_after
            && busy + batch <= depth
            && inflight.len() < depth
        {
            // The answer's memory is reserved before the request goes out.
            let Some(lease) = spare.take().or_else(|| dl.borrower.try_take()) else {
                starved = true;
                break;
            };
            let next = dl.state().sched.pick(&peer, Instant::now(), !throttled);
            let Some(k) = next else {
                let st = dl.state();
                let owed = !st.sched.satisfied();
                drop(st);
                if owed && !complete_peer && inflight.is_empty() {
                    let since = *useless_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= NOTHING_WANTED_FOR {
                        ending.set(ProviderError::NothingWanted);
                        return Ok(());
                    }
                }
                break;
            };
            useless_since = None;
            let op = Op::Block(BlockRequest {
                content_id: id.0.to_vec(),
                block: k,
            });
            let request = (Pending::Block(k), Some(lease));
            send(&mut wr, &kinds_tx, &mut inflight, op, request).await?;
            flush_needed = true;
        }
        let idle = inflight.is_empty();
        let stale = last_have.elapsed() >= if idle { HAVE_REFRESH } else { 2 * HAVE_REFRESH };
        let have_out = inflight.iter().any(|i| i.pending == Pending::Have);
        let asks_have = matches!(lane, Lane::First(_));
        if asks_have && !leaving && !complete_peer && stale && !have_out {
            // A partial provider gains blocks as it downloads: ask what it holds now.
            let op = Op::Have(id.0.to_vec());
            send(&mut wr, &kinds_tx, &mut inflight, op, (Pending::Have, None)).await?;
            last_have = Instant::now();
            flush_needed = true;
        }
        if flush_needed {
            wr.flush().await?;
            flush_needed = false;
        }
        // The answer clock starts with the first request after a pause:
        // time with nothing asked is not the provider's silence.
        if was_idle && !inflight.is_empty() {
            last_answer = Instant::now();
        }
        // Biased: an answer that is in counts before the answer timeout, so
        // time this task spent on its own work (a slow disk) is never taken
        // for the provider's silence.
        tokio::select! {
            biased;
            _ = dl.cancel.cancelled() => return Ok(()),
            answer = answers.recv(), if !inflight.is_empty() => {
                // The provider vanished or broke the stream with requests pending.
                let answer = answer
                    .ok_or_else(|| std::io::Error::other("answer reader gone"))??;
                let secs = last_answer.elapsed().as_secs_f64();
                last_answer = Instant::now();
                let lease = inflight.pop_front().and_then(|i| {
                    debug_assert_eq!(i.pending, answer.pending);
                    i.lease
                });
                let Answer { pending, header, payload } = answer;
                match pending {
                    Pending::Have => {
                        complete_peer |= on_have(svc, dl, peer, &header, &payload)?;
                    }
                    Pending::Block(k) => match Status::try_from(header.status) {
                        Ok(Status::Ok) => {
                            dl.state().tally.received += 1;
                            refused_in_a_row = 0;
                            waiting_since = None;
                            rate.received(payload.len() as u64);
                            if let (Lane::First(spread), false) = (lane, said_fast)
                                && rate.rate.is_some_and(|r| r > SPREAD_ABOVE)
                            {
                                spread.fast.notify_one();
                                said_fast = true;
                            }
                            carried += payload.len() as u64;
                            // Every block request went out with a lease.
                            let lease = lease.ok_or_else(|| std::io::Error::other("a block answered without a lease"))?;
                            verify_block(svc, dl, peer, (k, payload, lease), secs).await?;
                        }
                        Ok(Status::NotHeld) => {
                            dl.state().sched.not_held(peer, k);
                            refused_in_a_row += 1;
                            if refused_in_a_row >= NOT_HELD_IN_A_ROW {
                                ending.set(ProviderError::NotProviding(format!(
                                    "{refused_in_a_row} blocks in a row refused as not held"
                                )));
                            }
                        }
                        Ok(Status::Forbidden) => {
                            dl.release(peer, k);
                            return Err(super::peer::forbidden(header.message));
                        }
                        Ok(Status::TooManyStreams) => {
                            // A fast-path connection over the provider's cap.
                            dl.release(peer, k);
                            return Err(ProviderError::StreamsFull(header.message));
                        }
                        Ok(Status::Busy) => {
                            // Not refused, only not yet: the block goes back
                            // to the pool for the providers that serve us now.
                            let now = Instant::now();
                            {
                                let mut st = dl.state();
                                st.sched.release(peer, k);
                                st.sched.in_line(now);
                                st.tally.busy += 1;
                            }
                            busy_until = now + BUSY_PAUSE;
                            let since = *waiting_since.get_or_insert(now);
                            if now - since >= BUSY_GIVE_UP {
                                ending.set(ProviderError::NoSlot(now - since));
                            }
                        }
                        _ => {
                            dl.release(peer, k);
                            return Err(ProviderError::Refused { block: k, message: header.message });
                        }
                    },
                }
            }
            _ = tokio::time::sleep_until((last_answer + ANSWER_TIMEOUT).into()), if !inflight.is_empty() => {
                // Accepts requests but does not answer: free its blocks for others.
                return Err(ProviderError::StoppedAnswering);
            }
            lease = dl.borrower.take(&dl.cancel), if starved && inflight.is_empty() => {
                // Out of memory budget with nothing in flight: wait for a share.
                spare = lease;
            }
            _ = dl.changed.notified(), if inflight.is_empty() => {}
            _ = tokio::time::sleep(HAVE_REFRESH), if inflight.is_empty() => {}
        }
    }
}
