//! One connection's pipeline: requests kept in flight to the depth the
//! provider's measured rate allows, answers read and verified as they come,
//! blocks handed to the download, and the connection wound down when the
//! provider has nothing more we want or no upload slot for us.

use super::super::download::{Download, Outcome, WriteJob};
use super::lane::{ANSWER_TIMEOUT, Ending, Lane, SPREAD_ABOVE, on_have};
use crate::content::budget::Lease;
use crate::content::error::ProviderError;
use crate::content::wire::{PayloadRead, PayloadWrite, read_msg, read_payload_bytes, write_msg};
use crate::content::{ContentService, ContentServiceError};
use bytes::Bytes;
use futures::AsyncWriteExt;
use libp2p::PeerId;
use p2pvm_content::transfer::{self, BlockRequest, Op, Status, TransferRequest, TransferResponse};
use p2pvm_content::{BLOCK_BYTES, block_count, block_range};
use p2pvm_security::{EventKind, Standing};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::debug;

/// How often an idle worker re-asks a partial provider what it holds.
const HAVE_REFRESH: Duration = Duration::from_millis(500);

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
    let accepting = svc.clone();
    let writer = dl.writer(&svc.inner.ctx.tasks, move |dl, job| {
        // A failed write has failed the download; the worker sees it cancelled.
        let _ = accept(&accepting, dl, job);
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
                svc.inner.ctx.ledger.record(
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
pub(super) async fn pipeline<R: PayloadRead, W: PayloadWrite>(
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
    let ran: Result<(), ProviderError> = async { loop {
        if dl.cancel.is_cancelled() || matches!(*dl.outcome.borrow(), Outcome::Complete) {
            return Ok(());
        }
        // Winding down: the worker is, or another connection took over.
        let leaving = ending.is_set() || lane.handed_over();
        if leaving && inflight.is_empty() {
            if lane.handed_over() {
                // Closed, not reset: the provider sees a clean end.
                let _ = wr.close().await;
            }
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
        let asks_have = lane.asks_have();
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
                            return Err(super::super::peer::forbidden(header.message));
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
            _ = lane.taken_over(), if !leaving => {}
        }
    } }
    .await;
    // A connection that failed after another took over: what it had asked
    // goes back to the pool now, not when the whole worker ends.
    if ran.is_err() && lane.handed_over() {
        for asked in inflight.drain(..) {
            if let Pending::Block(k) = asked.pending {
                dl.release(peer, k);
            }
        }
    }
    ran
}
