//! One worker per provider: it learns what the provider holds (`Have`),
//! keeps a pipeline of block requests in flight on each of its connections
//! (the libp2p stream until the fast path is up, then one or more fast-path
//! connections), verifies what arrives and hands it to the download. The
//! schedule decides which block each freed slot asks for, so faster
//! providers take more blocks.
//!
//! However the worker ends, what it had in flight goes back to the pool, and
//! its error — typed — is charged to the provider once, by
//! [`ProviderError::evidence`].

use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use p2pvm_content::transfer::{Op, Status, TransferResponse};
use p2pvm_content::{BLOCK_BYTES, block_count};
use p2pvm_security::{GroupId, Standing};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::download::Download;
use super::peer::{group_session, open_stream, request, response};
use crate::content::ContentEvent;
use crate::content::ContentService;
use crate::content::error::ProviderError;
use crate::content::wire::{PayloadRead, PayloadWrite, read_payload};
use crate::node::Command;
use p2pvm_security::sealed::{SealedReader, SealedWriter};

mod lane;
mod pipeline;
use crate::report::chain;
pub(crate) use lane::have_bits;
use lane::{ANSWER_TIMEOUT, Ending, Lane, Spread, on_have};
use pipeline::pipeline;

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
        debug!(id = %dl.id, %peer, error = %chain(&e), "provider dropped");
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
        ProviderError::StreamsFull(_) | ProviderError::RelayLimited { .. } => {
            dl.state().sched.pause(peer, Instant::now());
            false
        }
        // Charged by the watch on its stream, once it knows whether the
        // answer was late or never came; until then not asked again (a
        // silent peer would take another worker slot for 15 s each time).
        ProviderError::NoAnswer => {
            let verdict = Instant::now() + super::silence::LATE_GRACE;
            dl.state().sched.hold_off(peer, verdict);
            false
        }
        _ => true,
    };
    if charged && let Some(evidence) = e.evidence() {
        svc.inner.ctx.ledger.record(peer, evidence);
    }
    if let ProviderError::Corrupt { block, .. } = e {
        svc.inner.ctx.metrics.content.corrupt_blocks.inc();
        warn!(id = %dl.id, %peer, block, "corrupt block from provider; dropping it and the provider");
        dl.state().sched.mark_bad(peer);
        svc.emit(ContentEvent::CorruptData {
            peer,
            id: dl.id,
            block: *block,
        });
    }
}

async fn run(svc: &ContentService, dl: &Arc<Download>, peer: PeerId) -> Result<(), ProviderError> {
    let mut stream = open_stream(svc, peer).await?;
    within_relay_limit(svc, dl, peer).await?;
    // The first Have goes alone: its answer says what the provider holds and
    // whether blocks can take the fast path. A provider that never answers
    // frees its worker slot like one that stops answering later.
    let have = match first_have(dl, &mut stream).await {
        Err(ProviderError::NoAnswer) => return Err(judged(svc, peer, stream)),
        have => have?,
    };
    let Some((header, payload)) = have else {
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
    let conn = futures::AsyncReadExt::split(stream);
    let ending = Ending::default();
    let port = header.fast_path_port;
    // A throttled provider gets one request at a time (see `pipeline`): the
    // libp2p stream carries that, and it costs no second handshake.
    let throttled = svc.standing(&peer) == Standing::Throttled;
    if svc.inner.fast_path.is_none() || port == 0 || throttled {
        let spread = Spread::default();
        let lane = Lane::First(&spread);
        pipeline(svc, dl, peer, conn, complete, &ending, lane).await?;
        return ending.result();
    }
    bridged(svc, dl, peer, conn, complete, port, &ending).await?;
    ending.result()
}

/// A provider reached only through a relay is asked only for what one of the
/// relay's circuits carries: re-dialling circuit after circuit to pass a
/// large item through would dodge the limit its operator set.
async fn within_relay_limit(
    svc: &ContentService,
    dl: &Download,
    peer: PeerId,
) -> Result<(), ProviderError> {
    let paths = svc.inner.ctx.node.call(|reply| Command::Paths(peer, reply));
    let Ok(paths) = paths.await else {
        return Ok(());
    };
    let Some(limit) = paths.circuit_bytes.filter(|_| paths.direct == 0) else {
        return Ok(());
    };
    let held = dl.state().sched.held_blocks() * BLOCK_BYTES;
    let missing = dl.partial.size().saturating_sub(held);
    if missing > limit {
        return Err(ProviderError::RelayLimited { limit, missing });
    }
    Ok(())
}

/// Blocks flow on the libp2p stream from the provider's first answer while
/// its fast path is dialled (a TCP connection and a TLS handshake: three
/// round trips, up to a second on a home line, that a viewer would
/// otherwise wait before its first byte). Once the fast path is up, the
/// stream asks for nothing more, ends when its answers are in (closing it,
/// so it does not hold one of the provider's per-peer streams), and the
/// fast path carries the rest. If the fast path cannot be reached, the
/// stream carries everything.
async fn bridged<R: PayloadRead, W: PayloadWrite>(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    conn: (R, W),
    complete: bool,
    port: u32,
    ending: &Ending,
) -> Result<(), ProviderError> {
    let handed_over = CancellationToken::new();
    let stream_ended = CancellationToken::new();
    let on_stream = async {
        let r = pipeline(
            svc,
            dl,
            peer,
            conn,
            complete,
            ending,
            Lane::Bridge(&handed_over),
        )
        .await;
        stream_ended.cancel();
        match r {
            // The stream failing while it drains says nothing about the
            // fast path that took over (its unanswered blocks went back to
            // the pool in `pipeline`).
            Err(e) if handed_over.is_cancelled() && e.transient_on_stream() => {
                debug!(id = %dl.id, %peer, error = %chain(&e), "the stream failed after the fast path took over");
                Ok(())
            }
            r => r,
        }
    };
    let on_fast_path = async {
        let first = tokio::select! {
            c = fast_path(svc, peer, port) => c,
            // The worker is done (or failed) before the fast path was up.
            _ = stream_ended.cancelled() => None,
        };
        let Some(first) = first else {
            return Ok(());
        };
        if ending.is_set() || stream_ended.is_cancelled() {
            return Ok(());
        }
        debug!(id = %dl.id, %peer, "blocks take the fast path");
        handed_over.cancel();
        lanes(svc, dl, peer, first, complete, ending, || {
            fast_path(svc, peer, port)
        })
        .await
    };
    futures::future::try_join(on_stream, on_fast_path).await?;
    Ok(())
}

/// Fetches over `first` and, once it proves fast, more connections made by
/// `dial` (up to `fast_path_connections`), each with a pipeline of its own.
async fn lanes<F, Fut>(
    svc: &ContentService,
    dl: &Arc<Download>,
    peer: PeerId,
    first: (SealedReader, SealedWriter),
    complete: bool,
    ending: &Ending,
    dial: F,
) -> Result<(), ProviderError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<(SealedReader, SealedWriter)>>,
{
    let spread = Spread::default();
    let first = async {
        let r = pipeline(svc, dl, peer, first, complete, ending, Lane::First(&spread)).await;
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
                .map(|c| pipeline(svc, dl, peer, c, complete, ending, Lane::Extra)),
        )
        .await
        .map(|_| ())
    };
    futures::future::try_join(first, more).await?;
    Ok(())
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
    let have = match first_have(dl, &mut session).await {
        Err(ProviderError::NoAnswer) => return Err(judged(svc, peer, session)),
        have => have?,
    };
    let Some((header, payload)) = have else {
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
    let ending = Ending::default();
    lanes(
        svc,
        dl,
        peer,
        (session.0, session.1),
        complete,
        &ending,
        dial,
    )
    .await?;
    ending.result()
}

/// A provider that left the first `Have` unanswered: its stream is watched
/// a while longer for a late answer, which decides what goes on its record
/// ([`NoAnswer`](ProviderError::NoAnswer) is not charged when the worker ends).
fn judged<S>(svc: &ContentService, peer: PeerId, stream: S) -> ProviderError
where
    S: futures::AsyncRead + Unpin + Send + 'static,
{
    super::silence::judge(svc, peer, stream);
    ProviderError::NoAnswer
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
            debug!(%peer, %ip, port, error = %chain(&e), "fast path unreachable; staying on libp2p");
            None
        }
    }
}
