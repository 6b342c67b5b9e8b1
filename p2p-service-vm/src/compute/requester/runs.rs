//! One run on one provider: finding the candidates (the service registry,
//! ranked by the credit ledger's forecasts), asking their offers, running the
//! job, and checking the receipt that comes back.

use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::{PeerId, StreamProtocol};
use p2pvm_compute::{JobId, ReceiptBody, SignedReceipt, credits_for};
use p2pvm_content::ContentId;
use p2pvm_security::{EventKind, Standing};
use prost::Message;
use tracing::warn;

use crate::compute::wire::{self, Answer, Ask, Request, Response};
use crate::compute::{ComputeService, ReceiptCheckError};
use crate::content::wire::{read_msg, write_msg};
use crate::node::{Command, service_key};

/// Providers asked for their offer, at most.
pub(super) const MAX_CANDIDATES: usize = 20;

/// What was submitted.
pub(in crate::compute) struct Spec {
    pub id: JobId,
    pub module: ContentId,
    pub input: Option<ContentId>,
    pub budget: u64,
    pub replicas: u32,
}

/// A provider and its terms.
#[derive(Clone)]
pub(super) struct Candidate {
    pub(super) peer: PeerId,
    pub(super) offer: wire::Offer,
    /// Fuel this run may use: what the per-run cap buys at its price.
    pub(super) fuel: u64,
}

/// A provider's half of a receipt, its stream (waiting for the verdict) and
/// how long the run took.
pub(super) type Answered = Box<(ReceiptBody, SignedReceipt, libp2p::Stream, Duration)>;

/// A run's answer.
pub(super) enum Outcome {
    /// A result (its candidate is filled in by the caller).
    Done(Answered),
    /// It used all its fuel; the receipt charges that fuel.
    RanOut(Answered),
    /// No result.
    Failed { code: String, message: String },
}

/// How long an offer query may take.
pub(super) const OFFER_TIMEOUT: Duration = Duration::from_secs(5);

/// Time for a provider to fetch the module and input, beyond its wall limit.
pub(super) const FETCH_ALLOWANCE: Duration = Duration::from_secs(300);

/// The longest run this node waits for, whatever wall limit an offer names:
/// a provider advertising no limit and then saying nothing must not hold a
/// job until its user cancels it.
pub(super) const MAX_RUN_WAIT: Duration = Duration::from_secs(3600);

/// A run worth starting gets at least this much fuel.
pub(super) const MIN_FUEL: u64 = 10_000;

/// Providers in the service registry, with offers this budget buys, best
/// first by the credit ledger's forecasts: standing, then reliability (in
/// steps of 0.05, so noise does not outrank the rest), then compute speed,
/// then price. Also how many offers were left out because their wall limit
/// is longer than this node waits for a run ([`waits_for`]).
pub(super) async fn candidates(svc: &ComputeService, cap: u64) -> (Vec<Candidate>, usize) {
    let node = &svc.inner.ctx.node;
    let me = node.peer_id();
    let found = node
        .call_timeout(Duration::from_secs(10), |reply| Command::FindProviders {
            key: service_key(wire::SERVICE),
            limit: MAX_CANDIDATES,
            reply,
        })
        .await
        .unwrap_or_default();
    let ledger = &svc.inner.ctx.ledger;
    let usable: Vec<PeerId> = found
        .into_iter()
        .filter(|p| *p != me && ledger.standing(p) < Standing::Refused)
        .take(MAX_CANDIDATES)
        .collect();
    let offers = futures::future::join_all(usable.into_iter().map(|peer| async move {
        let offer = tokio::time::timeout(OFFER_TIMEOUT, ask_offer(svc, peer)).await;
        (peer, offer.ok().flatten())
    }))
    .await;
    let (offers, too_long): (Vec<_>, Vec<_>) = offers
        .into_iter()
        .filter_map(|(peer, offer)| Some((peer, offer?)))
        .partition(|(_, offer)| waits_for(offer.max_wall_ms));
    let mut out: Vec<(Candidate, p2pvm_security::PeerCredit)> = offers
        .into_iter()
        .filter_map(|(peer, offer)| {
            let fuel = if offer.price_per_mfuel == 0 {
                offer.max_fuel
            } else {
                let affordable = (cap as u128 * 1_000_000 / offer.price_per_mfuel as u128)
                    .min(u64::MAX as u128) as u64;
                affordable.min(offer.max_fuel)
            };
            (fuel >= MIN_FUEL).then(|| (Candidate { peer, offer, fuel }, ledger.credit(&peer)))
        })
        .collect();
    let step = |r: f64| (r * 20.0).round() as i64;
    out.sort_by(|(a, ca), (b, cb)| {
        ca.standing
            .cmp(&cb.standing)
            .then(step(cb.reliability).cmp(&step(ca.reliability)))
            .then(
                cb.expected_fuel_per_sec
                    .total_cmp(&ca.expected_fuel_per_sec),
            )
            .then(a.offer.price_per_mfuel.cmp(&b.offer.price_per_mfuel))
    });
    (out.into_iter().map(|(c, _)| c).collect(), too_long.len())
}

/// Whether this node waits long enough for a run that may take
/// `max_wall_ms`, with the provider's fetching on top.
pub(super) fn waits_for(max_wall_ms: u64) -> bool {
    Duration::from_millis(max_wall_ms).saturating_add(FETCH_ALLOWANCE) <= MAX_RUN_WAIT
}

pub(super) async fn ask_offer(svc: &ComputeService, peer: PeerId) -> Option<wire::Offer> {
    let mut stream = svc
        .inner
        .content
        .open_protocol(peer, StreamProtocol::new(wire::PROTOCOL))
        .await
        .ok()?;
    let req = Request {
        ask: Some(Ask::GetOffer(wire::Offer::default())),
    };
    write_msg(&mut stream, &req).await.ok()?;
    stream.flush().await.ok()?;
    match read_msg::<Response>(&mut stream).await.ok()?? {
        Response {
            answer: Some(Answer::Offer(o)),
        } => Some(o),
        _ => None,
    }
}

/// How long to wait for a run on a provider whose offer allows
/// `max_wall_ms` of it.
pub(super) fn run_wait(max_wall_ms: u64) -> Duration {
    (Duration::from_millis(max_wall_ms) + FETCH_ALLOWANCE).min(MAX_RUN_WAIT)
}

/// Runs the job on one provider and checks what comes back.
pub(super) async fn run_on(
    svc: &ComputeService,
    spec: &Spec,
    c: Candidate,
    index: usize,
) -> (Candidate, usize, Outcome, Duration) {
    let failed = |code: &str, message: String| Outcome::Failed {
        code: code.into(),
        message,
    };
    let limit = run_wait(c.offer.max_wall_ms);
    let asked = std::time::Instant::now();
    let outcome = match tokio::time::timeout(limit, ask_run(svc, spec, &c)).await {
        Err(_) => failed("TIMEOUT", "the provider did not answer in time".into()),
        Ok(Err(e)) => {
            svc.inner
                .ctx
                .ledger
                .record(c.peer, EventKind::RequestFailed);
            failed("UNAVAILABLE", e.to_string())
        }
        Ok(Ok((Response { answer }, stream))) => {
            // A receipt that does not check is a protocol violation.
            let violation = |why: ReceiptCheckError| {
                warn!(peer = %c.peer, %why, "a provider's receipt does not check");
                svc.inner.ctx.ledger.record(c.peer, EventKind::Violation);
                failed("PROTOCOL_VIOLATION", why.to_string())
            };
            match answer {
                Some(Answer::Done(bytes)) => match check(svc, spec, &c, &bytes) {
                    Ok((body, signed)) => {
                        Outcome::Done(Box::new((body, signed, stream, asked.elapsed())))
                    }
                    Err(why) => violation(why),
                },
                Some(Answer::OutOfFuel(bytes)) => match check_ran_out(svc, spec, &c, &bytes) {
                    Ok((body, signed)) => {
                        Outcome::RanOut(Box::new((body, signed, stream, asked.elapsed())))
                    }
                    Err(why) => violation(why),
                },
                Some(Answer::Failed(f)) => failed(&f.code, f.message),
                _ => failed("PROTOCOL_VIOLATION", "an answer out of turn".into()),
            }
        }
    };
    (c, index, outcome, asked.elapsed())
}

pub(super) async fn ask_run(
    svc: &ComputeService,
    spec: &Spec,
    c: &Candidate,
) -> std::io::Result<(Response, libp2p::Stream)> {
    let mut stream = svc
        .inner
        .content
        .open_protocol(c.peer, StreamProtocol::new(wire::PROTOCOL))
        .await
        .map_err(std::io::Error::other)?;
    let run = wire::Run {
        job_id: spec.id.0.to_vec(),
        module_id: spec.module.to_string(),
        input_id: spec.input.map(|i| i.to_string()).unwrap_or_default(),
        max_fuel: c.fuel,
        price_per_mfuel: c.offer.price_per_mfuel,
        requester_key: svc.inner.ctx.key.public().encode_protobuf(),
    };
    write_msg(
        &mut stream,
        &Request {
            ask: Some(Ask::Run(run)),
        },
    )
    .await?;
    stream.flush().await?;
    let answer = read_msg::<Response>(&mut stream)
        .await?
        .ok_or_else(|| std::io::Error::other("the provider closed the stream"))?;
    Ok((answer, stream))
}

/// A provider's receipt for a run that ran out of fuel: as [`check`]'s, but
/// naming no result and charging exactly the fuel it was given.
pub(super) fn check_ran_out(
    svc: &ComputeService,
    spec: &Spec,
    c: &Candidate,
    bytes: &[u8],
) -> Result<(ReceiptBody, SignedReceipt), ReceiptCheckError> {
    let (body, signed) = check_parties(svc, spec, c, bytes)?;
    if !body.result_id.is_empty() || body.work_units != c.fuel {
        return Err(ReceiptCheckError::BadOutOfFuel {
            given: c.fuel,
            charged: body.work_units,
        });
    }
    Ok((body, signed))
}

/// A provider's receipt must be for this job, signed by that provider, name
/// this node, and charge what its offer and the fuel it was given allow.
pub(super) fn check(
    svc: &ComputeService,
    spec: &Spec,
    c: &Candidate,
    bytes: &[u8],
) -> Result<(ReceiptBody, SignedReceipt), ReceiptCheckError> {
    let (body, signed) = check_parties(svc, spec, c, bytes)?;
    body.result_id
        .parse::<ContentId>()
        .map_err(|_| ReceiptCheckError::BadResultId)?;
    Ok((body, signed))
}

/// What every receipt of this run must say: this job, that provider's
/// signature, this node, and a charge its offer and fuel allow.
pub(super) fn check_parties(
    svc: &ComputeService,
    spec: &Spec,
    c: &Candidate,
    bytes: &[u8],
) -> Result<(ReceiptBody, SignedReceipt), ReceiptCheckError> {
    let signed = SignedReceipt::decode(bytes)?;
    let body = signed.provider_signed()?;
    let provider =
        libp2p::identity::PublicKey::try_decode_protobuf(&body.provider_key)?.to_peer_id();
    let expect_input = spec.input.map(|i| i.to_string()).unwrap_or_default();
    if provider != c.peer
        || body.job_id != spec.id.0
        || body.module_id != spec.module.to_string()
        || body.input_id != expect_input
        || body.requester_key != svc.inner.ctx.key.public().encode_protobuf()
    {
        return Err(ReceiptCheckError::OtherParty);
    }
    if body.work_units > c.fuel
        || body.credits != credits_for(body.work_units, c.offer.price_per_mfuel)
    {
        return Err(ReceiptCheckError::Overcharged {
            credits: body.credits,
            fuel: body.work_units,
            given: c.fuel,
            price: c.offer.price_per_mfuel,
        });
    }
    Ok((body, signed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_waited_for_its_wall_limit_plus_fetching_but_never_without_end() {
        assert_eq!(run_wait(60_000), Duration::from_secs(60) + FETCH_ALLOWANCE);
        assert_eq!(run_wait(u64::MAX), MAX_RUN_WAIT);
        assert_eq!(run_wait(0), FETCH_ALLOWANCE);
    }

    #[test]
    fn offers_longer_than_the_wait_are_not_taken() {
        let longest = (MAX_RUN_WAIT - FETCH_ALLOWANCE).as_millis() as u64;
        assert!(waits_for(60_000));
        assert!(waits_for(longest));
        assert!(!waits_for(longest + 1));
        assert!(!waits_for(u64::MAX));
    }
}
