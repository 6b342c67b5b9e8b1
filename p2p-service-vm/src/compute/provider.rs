//! The provider side of `/p2pvm/compute/1`: answers offer queries and runs
//! jobs within the offer, then keeps the receipt the requester countersigns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::identity::PublicKey;
use libp2p::{PeerId, StreamProtocol};
use p2pvm_compute::{JobId, Limits, Receipt, ReceiptBody, SignedReceipt, credits_for};
use p2pvm_content::ContentId;
use p2pvm_security::Standing;
use prost::Message;
use tracing::{debug, info};

use super::wire::{self, Answer, Ask, Request, Response};
use super::{ComputeService, ReceiptCheckError};
use crate::clock::now_unix;
use crate::content::wire::{read_msg, write_msg};
use crate::content::{ContentService, PublishMeta};

/// How long a requester may take to ask.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a provider waits for the verdict on its result: the requester may
/// be waiting for slower replicas or a tie-breaker.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A run that produced no result: an API error code name and why.
type Refusal = (&'static str, String);

/// A run that used fuel, with the provider's half of its receipt.
enum Ran {
    /// It finished: the receipt names the result.
    Done(SignedReceipt),
    /// It used all its fuel: the receipt charges that fuel and names no
    /// result.
    OutOfFuel(SignedReceipt),
}

pub(super) fn spawn(svc: ComputeService) {
    let ctx = svc.inner.ctx.clone();
    ctx.serve_protocol(StreamProtocol::new(wire::PROTOCOL), move |peer, stream| {
        let (rd, wr) = futures::AsyncReadExt::split(stream);
        serve(svc.clone(), peer, rd, wr)
    });
}

async fn serve(
    svc: ComputeService,
    peer: PeerId,
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
) {
    let ask = match tokio::time::timeout(ASK_TIMEOUT, read_msg::<Request>(&mut rd)).await {
        Ok(Ok(Some(r))) => r.ask,
        _ => return,
    };
    let answer = match ask {
        Some(Ask::GetOffer(_)) => match svc.offer() {
            Some(o) => Response {
                answer: Some(Answer::Offer(o)),
            },
            None => Response::failed("UNAVAILABLE", "this node offers no compute"),
        },
        Some(Ask::Run(run)) => return run_job(svc, peer, run, rd, wr).await,
        _ => {
            svc.inner
                .ctx
                .ledger
                .record(peer, p2pvm_security::EventKind::Violation);
            Response::failed("PROTOCOL_VIOLATION", "a stream starts with GetOffer or Run")
        }
    };
    let _ = send(&mut wr, &answer).await;
}

async fn send(wr: &mut (impl AsyncWrite + Unpin), r: &Response) -> std::io::Result<()> {
    write_msg(wr, r).await?;
    wr.flush().await
}

/// Counts a running job against the offer's `max_jobs` until dropped.
struct Slot(Arc<super::Inner>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_job(
    svc: ComputeService,
    peer: PeerId,
    run: wire::Run,
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
) {
    let cancel = Arc::new(AtomicBool::new(false));
    let work = execute(&svc, peer, &run, cancel.clone());
    tokio::pin!(work);
    // The requester says nothing until the result: anything it sends, or its
    // closing the stream, means it gave up, and the run stops.
    let outcome = tokio::select! {
        r = &mut work => r,
        _ = read_msg::<Request>(&mut rd) => {
            cancel.store(true, Ordering::Relaxed);
            let _ = work.await;
            debug!(%peer, "compute run cancelled by the requester");
            svc.inner.ctx.metrics.compute_ran("cancelled", 0);
            return;
        }
        _ = svc.inner.ctx.shutdown.cancelled() => {
            cancel.store(true, Ordering::Relaxed);
            let _ = work.await;
            return;
        }
    };
    let (signed, answer) = match outcome {
        Ok(Ran::Done(s)) => {
            let a = Answer::Done(s.encode_to_vec());
            (s, a)
        }
        Ok(Ran::OutOfFuel(s)) => {
            let a = Answer::OutOfFuel(s.encode_to_vec());
            (s, a)
        }
        Err((code, message)) => {
            info!(%peer, code, %message, "compute run failed");
            svc.inner.ctx.metrics.compute_ran("failed", 0);
            let _ = send(&mut wr, &Response::failed(code, message)).await;
            return;
        }
    };
    let done = Response {
        answer: Some(answer),
    };
    if send(&mut wr, &done).await.is_err() {
        return;
    }
    let verdict = match tokio::time::timeout(VERDICT_TIMEOUT, read_msg::<Request>(&mut rd)).await {
        Ok(Ok(Some(Request {
            ask: Some(Ask::Verdict(v)),
        }))) => v,
        _ => {
            info!(%peer, "no verdict on a compute result: not paid");
            return;
        }
    };
    let ack = match settle(&svc, peer, &signed, &verdict).await {
        Ok(()) => Response {
            answer: Some(Answer::Ack(wire::Failed::default())),
        },
        Err(why) => Response::failed("BAD_REQUEST", why.to_string()),
    };
    let _ = send(&mut wr, &ack).await;
}

/// Keeps the countersigned receipt, if the requester paid.
async fn settle(
    svc: &ComputeService,
    peer: PeerId,
    ours: &SignedReceipt,
    verdict: &wire::Verdict,
) -> Result<(), ReceiptCheckError> {
    if verdict.receipt.is_empty() {
        info!(%peer, reason = %verdict.reason, "compute result not paid");
        return Ok(());
    }
    let receipt = Receipt::decode(&verdict.receipt)?;
    if receipt.signed.body != ours.body || receipt.requester != peer {
        return Err(ReceiptCheckError::NotOurs);
    }
    let receipts = svc.inner.receipts.clone();
    let r = receipt.clone();
    let added = tokio::task::spawn_blocking(move || receipts.add(&r)).await??;
    info!(%peer, credits = receipt.body.credits, added, "compute receipt stored");
    Ok(())
}

/// Checks the request against the offer, runs the job and signs the
/// provider's half of the receipt (for the result, or for the fuel burnt by
/// a run that ran out of it).
async fn execute(
    svc: &ComputeService,
    peer: PeerId,
    run: &wire::Run,
    cancel: Arc<AtomicBool>,
) -> Result<Ran, Refusal> {
    let bad = |m: String| ("BAD_REQUEST", m);
    let job = JobId::try_from(run.job_id.as_slice()).map_err(|e| bad(e.to_string()))?;
    let module: ContentId = run
        .module_id
        .parse()
        .map_err(|_| bad("bad module id".into()))?;
    let input: Option<ContentId> = if run.input_id.is_empty() {
        None
    } else {
        Some(
            run.input_id
                .parse()
                .map_err(|_| bad("bad input id".into()))?,
        )
    };
    let requester =
        PublicKey::try_decode_protobuf(&run.requester_key).map_err(|e| bad(e.to_string()))?;
    if requester.to_peer_id() != peer {
        return Err(bad("the requester key is not the key of this peer".into()));
    }
    let Some(offer) = svc.offer() else {
        return Err(("UNAVAILABLE", "this node offers no compute".into()));
    };
    if run.price_per_mfuel < offer.price_per_mfuel {
        return Err((
            "UNAVAILABLE",
            format!(
                "the price is now {} per million fuel",
                offer.price_per_mfuel
            ),
        ));
    }
    let content = &svc.inner.content;
    if content.standing(&peer) >= Standing::Refused {
        return Err((
            "PERMISSION_DENIED",
            "this node refuses your jobs (credit)".into(),
        ));
    }
    let running = svc.inner.running.fetch_add(1, Ordering::Relaxed);
    let _slot = Slot(svc.inner.clone());
    if running >= offer.max_jobs {
        return Err((
            "LIMIT_EXCEEDED",
            format!("busy: {} jobs running", offer.max_jobs),
        ));
    }
    let fuel = run.max_fuel.min(offer.max_fuel);
    if fuel == 0 {
        return Err(bad("no fuel".into()));
    }
    // The requester holds the module and the input it asks us to run.
    let module_bytes = fetch(
        content,
        &module,
        peer,
        p2pvm_compute::MAX_MODULE_BYTES,
        "COMPUTE_INVALID_MODULE",
    )
    .await?;
    // The input must fit in the memory the job may have.
    let input_bytes = match &input {
        Some(id) => {
            fetch(
                content,
                id,
                peer,
                offer.max_memory_bytes,
                "COMPUTE_MEMORY_LIMIT",
            )
            .await?
        }
        None => Vec::new(),
    };
    let limits = Limits {
        memory_bytes: offer.max_memory_bytes,
        fuel,
        wall: Duration::from_millis(offer.max_wall_ms),
        ..Limits::default()
    };
    let sandbox = svc.inner.sandbox.clone();
    let ran = content
        .spawn_blocking(move || {
            let program = sandbox.compile(&module_bytes)?;
            sandbox.run(&program, Arc::new(input_bytes), &limits, cancel)
        })
        .await
        .map_err(|e| ("INTERNAL", e.to_string()))?;
    let body = |work_units: u64, result_id: String| ReceiptBody {
        job_id: job.0.to_vec(),
        module_id: module.to_string(),
        input_id: input.map(|i| i.to_string()).unwrap_or_default(),
        requester_key: run.requester_key.clone(),
        provider_key: svc.inner.ctx.key.public().encode_protobuf(),
        work_units,
        credits: credits_for(work_units, offer.price_per_mfuel),
        result_id,
        completed_unix: now_unix(),
    };
    let out = match ran {
        Ok(out) => out,
        Err(p2pvm_compute::ComputeError::OutOfFuel { limit }) => {
            // Every operator of it was metered and burnt: charged like a
            // result, paid if the requester's other runs agree.
            info!(%peer, %job, fuel = limit, "compute job ran out of fuel");
            svc.inner.ctx.metrics.compute_ran("out_of_fuel", limit);
            return body(limit, String::new())
                .sign_as_provider(&svc.inner.ctx.key)
                .map(Ran::OutOfFuel)
                .map_err(|e| ("INTERNAL", e.to_string()));
        }
        Err(e) => return Err((e.code(), e.to_string())),
    };
    let mut output = out.output;
    if svc.inner.wrong_results {
        output.extend_from_slice(b" (wrong)");
    }
    let meta = PublishMeta {
        name: format!("compute-{job}.out"),
        mime_type: "application/octet-stream".into(),
        tags: Vec::new(),
        rights: None,
        pin: false,
    };
    let result = content
        .publish(std::io::Cursor::new(output), meta)
        .await
        .map_err(|e| ("INTERNAL", format!("publishing the result: {e}")))?;
    info!(%peer, %job, fuel = out.fuel_used, wall_ms = out.wall.as_millis() as u64, "compute job ran");
    svc.inner.ctx.metrics.compute_ran("done", out.fuel_used);
    body(out.fuel_used, result.manifest.id.to_string())
        .sign_as_provider(&svc.inner.ctx.key)
        .map(Ran::Done)
        .map_err(|e| ("INTERNAL", e.to_string()))
}

/// Fetches an item into the store (verified and scanned like any content),
/// from `source` first, and reads it, refusing one larger than `max` bytes
/// before fetching it with the code `too_big`.
async fn fetch(
    content: &ContentService,
    id: &ContentId,
    source: PeerId,
    max: u64,
    too_big: &'static str,
) -> Result<Vec<u8>, Refusal> {
    let refused = |e: crate::content::ContentServiceError| {
        let api = crate::api::ApiError::from(e);
        (api.code.as_str_name(), api.message)
    };
    // The manifest names the size: a requester cannot make this node fetch
    // gigabytes for a job it will refuse.
    let size = content
        .stat_from(id, &[source])
        .await
        .map_err(refused)?
        .manifest
        .manifest
        .size;
    if size > max {
        return Err((
            too_big,
            format!("{id} has {size} bytes; this provider takes at most {max}"),
        ));
    }
    content
        .download_from(id, &[source])
        .await
        .map_err(refused)?;
    let id = *id;
    content
        .blocking(move |c| -> std::io::Result<Vec<u8>> {
            use std::io::Read;
            let mut f = c.store().open_data(&id).map_err(std::io::Error::other)?;
            let mut buf = Vec::with_capacity(size as usize);
            f.read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(|e| ("INTERNAL", e.to_string()))?
        .map_err(|e| ("INTERNAL", e.to_string()))
}
