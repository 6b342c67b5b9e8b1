//! The provider side of `/p2pvm/content/2`: answers block, manifest, have and
//! search requests from stored items and from downloads in progress.

use futures::{AsyncWriteExt, FutureExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use p2pvm_content::transfer::{self, Status, TransferRequest, TransferResponse};
use p2pvm_security::{EventKind, GroupId, Standing};
use prost::Message;
use tracing::debug;

use super::ContentService;
use super::wire::{PayloadWrite, write_msg};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::compat::FuturesAsyncReadCompatExt;

mod answers;
mod fast_path;

pub(crate) use fast_path::spawn as spawn_fast_path;

use super::limits::STREAMS_PER_PEER;
use crate::report::chain;
use answers::{answer, failed};

pub(crate) fn spawn(svc: ContentService) {
    let server = svc.clone();
    svc.inner.ctx.serve_protocol(
        StreamProtocol::new(transfer::PROTOCOL),
        move |peer, stream| {
            let (rd, wr) = futures::AsyncReadExt::split(stream);
            serve_stream(server.clone(), peer, None, rd, wr)
        },
    );
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
        svc.inner.ctx.shutdown.cancelled().await;
        return;
    }
    let delay = std::time::Duration::from_secs(svc.inner.config.test_answer_delay_secs);
    if !delay.is_zero() {
        // Fault injection: a provider that answers, late.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = svc.inner.ctx.shutdown.cancelled() => return,
        }
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
                    limiter_svc.inner.ctx.ledger.record(
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
                    debug!(%peer, error = %chain(&e), "content stream write failed");
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
                debug!(%peer, error = %chain(&e), "content stream write failed");
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
            svc.inner.ctx.ledger.record(peer, EventKind::Violation);
        }
        debug!(%peer, error = %chain(e), "content stream ended");
    };
    'serve: loop {
        let next = tokio::select! {
            next = tokio::time::timeout(IDLE, requests.next()) => next,
            _ = svc.inner.ctx.shutdown.cancelled() => break,
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
            _ = svc.inner.ctx.shutdown.cancelled() => break,
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
            _ = svc.inner.ctx.shutdown.cancelled() => false,
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
            svc.inner.ctx.ledger.record(peer, EventKind::RequestFailed);
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer stopped reading its answers",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pvm_content::transfer::Op;

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
}
