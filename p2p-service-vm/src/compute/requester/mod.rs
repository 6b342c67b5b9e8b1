//! The requester side: one task per submitted job. It finds providers in the
//! service registry, ranks them by the credit ledger, runs the job on
//! `replicas` of them, compares their results and pays the majority.
//!
//! ```text
//!  finding ─► running (replicas at once) ─► all back? ─┬─ majority of ≥ 2 agree ─► pay them,
//!                 ▲                                    │   not the others ─► fetch result ─► done
//!                 └── one more provider (tie-breaker) ◄┤   no majority yet
//!                                                      └─ every provider refused the module
//!                                                          for the same reason ─► failed (typed)
//! ```
//!
//! Results are compared by content id *and* work units: fuel is
//! deterministic, so a provider that overstates its work disagrees just as
//! one that returns a wrong answer. The budget is split into `replicas + 1`
//! equal caps, one per paid run, so a tie-breaker can always be paid too.
//!
//! A run that uses all the fuel it was given is paid for that fuel when the
//! job's runs agree it needs more: every run ran out (at least two, or the
//! one of a single replica), each with at least half the fuel of the
//! largest. A requester cannot get work for free by sizing its budget so
//! that runs end out of fuel. A run that ran out while others agreed on a
//! result is not paid: its offer bought too little fuel for the job, and a
//! provider could claim so without running anything (a high price buys
//! little fuel for the same credits); one that claims to have run out with
//! as much fuel as the agreed result took disagrees. What is paid never
//! exceeds the budget.

use std::collections::HashMap;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use p2pvm_compute::{ReceiptBody, SignedReceipt};
use p2pvm_content::ContentId;
use p2pvm_proto::pb;
use p2pvm_security::EventKind;
use prost::Message;
use tracing::{info, warn};

use super::wire::{self, Ask, Request, Response};
use super::{ComputeService, ComputeServiceError, Job};
use crate::content::wire::{read_msg, write_msg};

mod runs;
pub(super) use runs::Spec;
use runs::{Candidate, MAX_RUN_WAIT, Outcome, candidates, run_on};

/// How long a provider may take to take the verdict.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a job ended without a result: an API error code name and why.
type Failure = (String, String);

/// A result, with the provider's half of the receipt; its stream waits for
/// the verdict.
struct Returned {
    c: Candidate,
    body: ReceiptBody,
    signed: SignedReceipt,
    stream: libp2p::Stream,
    /// From the request to the result.
    took: Duration,
}

/// Codes that say the provider could not or would not run it (another
/// provider may): everything else is the job's own fault, the same anywhere.
fn provider_fault(code: &str) -> bool {
    matches!(
        code,
        "UNAVAILABLE"
            | "LIMIT_EXCEEDED"
            | "PERMISSION_DENIED"
            | "INTERNAL"
            | "TIMEOUT"
            | "PROTOCOL_VIOLATION"
            | "BAD_REQUEST"
            | "RESOURCE_EXHAUSTED"
    )
}

pub(super) async fn run(svc: ComputeService, spec: Spec, job: std::sync::Arc<Job>) {
    let outcome = tokio::select! {
        r = drive(&svc, &spec, &job) => r,
        _ = job.cancel.cancelled() => Err(("COMPUTE_CANCELLED".into(), "cancelled".into())),
    };
    match outcome {
        Ok(result) => {
            info!(job = %spec.id, %result, "compute job done");
            job.update(|s| {
                s.state = "done".into();
                s.result_id = result.to_string();
            });
        }
        Err((code, message)) => {
            info!(job = %spec.id, %code, %message, "compute job ended without a result");
            job.update(|s| {
                s.state = if code == "COMPUTE_CANCELLED" {
                    "cancelled"
                } else {
                    "failed"
                }
                .into();
                for r in s.runs.iter_mut() {
                    if r.state == "running" {
                        r.state = "cancelled".into();
                    }
                }
                s.error_code = code;
                s.error = message;
            });
        }
    }
    let (state, spent) = {
        let s = job.status.lock().expect("lock");
        (s.state.clone(), s.credits_spent)
    };
    let outcome = match state.as_str() {
        "done" => "done",
        "cancelled" => "cancelled",
        _ => "failed",
    };
    svc.inner.ctx.metrics.compute_job_ended(outcome, spent);
}

async fn drive(svc: &ComputeService, spec: &Spec, job: &Job) -> Result<ContentId, Failure> {
    let cap = spec.budget / (spec.replicas as u64 + 1);
    let (candidates, too_long) = candidates(svc, cap).await;
    if candidates.len() < spec.replicas as usize && too_long > 0 {
        // Refused up front: such a run could still be going when this node
        // stops waiting for it, and would be abandoned unpaid.
        return Err((
            "COMPUTE_WALL_LIMIT_TOO_LONG".into(),
            format!(
                "{} provider(s) fit; {too_long} more allow runs longer than this node waits for one \
                 ({} s with fetching); {} needed",
                candidates.len(),
                MAX_RUN_WAIT.as_secs(),
                spec.replicas
            ),
        ));
    }
    if candidates.len() < spec.replicas as usize {
        return Err((
            "COMPUTE_NO_PROVIDERS".into(),
            format!(
                "{} provider(s) offer compute that a budget of {} credits ({} per run) buys; {} needed",
                candidates.len(),
                spec.budget,
                cap,
                spec.replicas
            ),
        ));
    }
    job.update(|s| s.state = "running".into());
    let mut next = candidates.into_iter();
    let mut pending = FuturesUnordered::new();
    let mut results: Vec<Returned> = Vec::new();
    let mut ran_out: Vec<Returned> = Vec::new();
    let mut faults: Vec<(String, String)> = Vec::new();
    let replicas = spec.replicas as usize;
    loop {
        let settled = results.len() + faults.len();
        let want = if settled < replicas {
            replicas - settled
        } else {
            usize::from(pending.is_empty())
        };
        while pending.len() < want {
            let Some(c) = next.next() else { break };
            let index = job.status.lock().expect("lock").runs.len();
            job.update(|s| {
                s.runs.push(pb::ComputeRun {
                    provider: c.peer.to_base58(),
                    state: "running".into(),
                    ..Default::default()
                })
            });
            pending.push(run_on(svc, spec, c, index));
        }
        let Some((c, index, outcome, took)) = pending.next().await else {
            let failure = no_quorum(&results, &faults);
            reject(results, "no majority").await;
            reject(ran_out, "no majority").await;
            return Err(failure);
        };
        job.update(|s| s.runs[index].wall_ms = took.as_millis() as u64);
        match outcome {
            Outcome::Done(done) => {
                let (body, signed, stream, took) = *done;
                job.update(|s| {
                    let r = &mut s.runs[index];
                    r.state = "returned".into();
                    r.result_id = body.result_id.clone();
                    r.work_units = body.work_units;
                });
                results.push(Returned {
                    c,
                    body,
                    signed,
                    stream,
                    took,
                });
            }
            Outcome::RanOut(done) => {
                let (body, signed, stream, took) = *done;
                let (code, message) = (
                    "COMPUTE_OUT_OF_FUEL".to_string(),
                    format!("used all of its {} fuel", body.work_units),
                );
                job.update(|s| {
                    let r = &mut s.runs[index];
                    r.state = "failed".into();
                    r.error_code = code.clone();
                    r.error = message.clone();
                    r.work_units = body.work_units;
                });
                faults.push((code, message));
                ran_out.push(Returned {
                    c,
                    body,
                    signed,
                    stream,
                    took,
                });
            }
            Outcome::Failed { code, message } => {
                job.update(|s| {
                    let r = &mut s.runs[index];
                    r.state = "failed".into();
                    r.error_code = code.clone();
                    r.error = message.clone();
                });
                if !provider_fault(&code) {
                    faults.push((code, message));
                }
            }
        }
        if !pending.is_empty() {
            continue;
        }
        if let Some(key) = majority(&results, replicas) {
            job.update(|s| s.state = "validating".into());
            return settle(svc, spec, job, results, ran_out, key).await;
        }
        if results.is_empty() && faults.len() >= replicas {
            // Every provider that ran it failed it: the module's own fault
            // (providers could differ in limits, so the most common reason).
            let mut by_code: HashMap<&str, usize> = HashMap::new();
            for (c, _) in &faults {
                *by_code.entry(c).or_default() += 1;
            }
            let (code, _) = by_code
                .into_iter()
                .max_by_key(|(c, n)| (*n, *c))
                .expect("faults");
            let message = faults
                .iter()
                .find(|(c, _)| c == code)
                .map(|(_, m)| m.clone())
                .unwrap_or_default();
            let failure = (code.to_string(), message);
            // Runs that agree the job needs more fuel are paid for theirs:
            // those that had at least half the fuel of the largest. One with
            // far less (its price bought little) proves nothing the others
            // do not, and may not have run at all.
            let agreed = failure.0 == "COMPUTE_OUT_OF_FUEL"
                && ran_out.len() >= replicas.min(2)
                && 2 * ran_out.len() > faults.len();
            if agreed {
                let most = ran_out.iter().map(|r| r.body.work_units).max().unwrap_or(0);
                let mut spent = 0;
                for r in ran_out {
                    let verdict = if r.body.work_units.saturating_mul(2) >= most {
                        Verdict::Pay
                    } else {
                        Verdict::Unpaid("its offer bought far less fuel than the other runs had")
                    };
                    conclude(svc, spec, job, r, verdict, &mut spent).await;
                }
            } else {
                reject(
                    ran_out,
                    "the runs do not agree that the job ran out of fuel",
                )
                .await;
            }
            return Err(failure);
        }
        if results.len() > replicas {
            // The budget pays replicas + 1 runs, no more.
            let failure = no_quorum(&results, &faults);
            reject(results, "no majority").await;
            reject(ran_out, "no majority").await;
            return Err(failure);
        }
    }
}

fn no_quorum(results: &[Returned], faults: &[(String, String)]) -> Failure {
    if results.is_empty()
        && let Some((code, message)) = faults.first()
    {
        return (code.clone(), message.clone());
    }
    let distinct: std::collections::HashSet<(&str, u64)> = results
        .iter()
        .map(|r| (r.body.result_id.as_str(), r.body.work_units))
        .collect();
    (
        "COMPUTE_NO_QUORUM".into(),
        format!(
            "{} result(s), {} distinct, and no more providers to break the tie",
            results.len(),
            distinct.len()
        ),
    )
}

/// The (result id, work) that a majority of at least two (or all of a
/// single replica) agree on.
fn majority(results: &[Returned], replicas: usize) -> Option<(String, u64)> {
    let mut counts: HashMap<(&str, u64), usize> = HashMap::new();
    for r in results {
        *counts
            .entry((r.body.result_id.as_str(), r.body.work_units))
            .or_default() += 1;
    }
    let ((id, work), n) = counts.into_iter().max_by_key(|(k, n)| (*n, *k))?;
    (n >= replicas.min(2) && 2 * n > results.len()).then(|| (id.to_string(), work))
}

/// Pays the runs that agree with the majority, tells the others why not
/// (runs that ran out of fuel are not paid: see the module doc), records
/// them in the ledger and fetches the result into the store.
async fn settle(
    svc: &ComputeService,
    spec: &Spec,
    job: &Job,
    results: Vec<Returned>,
    ran_out: Vec<Returned>,
    (result_id, work): (String, u64),
) -> Result<ContentId, Failure> {
    // The providers that returned the agreed result hold it.
    let holders: Vec<PeerId> = results
        .iter()
        .filter(|r| r.body.result_id == result_id && r.body.work_units == work)
        .map(|r| r.c.peer)
        .collect();
    let mut spent = 0;
    for r in results {
        let verdict = if r.body.result_id == result_id && r.body.work_units == work {
            Verdict::Pay
        } else {
            Verdict::Disagreed("the result disagrees with the majority")
        };
        conclude(svc, spec, job, r, verdict, &mut spent).await;
    }
    for r in ran_out {
        // Fuel is deterministic: a run with less fuel than the agreed work
        // must run out (not paid: its offer bought too little for this
        // job); one with as much or more must not.
        let verdict = if r.body.work_units < work {
            Verdict::Unpaid(
                "it ran out of fuel where other runs finished: its offer buys too little for this job",
            )
        } else {
            Verdict::Disagreed("it ran out of fuel with more than the agreed result took")
        };
        conclude(svc, spec, job, r, verdict, &mut spent).await;
    }
    let id: ContentId = result_id
        .parse()
        .map_err(|_| ("INTERNAL".to_string(), "bad result id".to_string()))?;
    // The result comes in like any content: verified against its id, scanned.
    svc.inner
        .content
        .download_from(&id, &holders)
        .await
        .map_err(|e| {
            let api = crate::api::ApiError::from(e);
            (api.code.as_str_name().to_string(), api.message)
        })?;
    info!(job = %spec.id, %id, "compute result agreed and fetched");
    Ok(id)
}

/// What the requester decided about one run.
enum Verdict {
    /// It agrees with the job's outcome: pay it, if the budget still allows.
    Pay,
    /// Not paid, for this reason, and not held against the provider.
    Unpaid(&'static str),
    /// It disagrees: not paid, for this reason, and a mark in the ledger.
    Disagreed(&'static str),
}

/// Tells a run's provider the verdict: countersigns its receipt when paid
/// (and `spent` plus its credits stays within the budget), records the run in
/// the ledger and in the job's status.
async fn conclude(
    svc: &ComputeService,
    spec: &Spec,
    job: &Job,
    r: Returned,
    verdict: Verdict,
    spent: &mut u64,
) {
    let Returned {
        c,
        body,
        signed,
        mut stream,
        took,
    } = r;
    let ledger = &svc.inner.ctx.ledger;
    let out_of_fuel = body.result_id.is_empty();
    let (receipt, reason) = match verdict {
        Verdict::Pay if spent.saturating_add(body.credits) <= spec.budget => {
            match pay(svc, signed).await {
                Ok(receipt) => {
                    *spent += body.credits;
                    // A run that ran out is no measure of the provider's
                    // speed (it may have stopped at once): paid, not scored.
                    if !out_of_fuel {
                        ledger.record(
                            c.peer,
                            EventKind::ComputeAgreed {
                                fuel: body.work_units,
                                secs: took.as_secs_f64(),
                            },
                        );
                    }
                    (receipt, String::new())
                }
                Err(e) => {
                    let why = crate::report::chain(&e);
                    warn!(peer = %c.peer, error = %why, "cannot countersign a receipt");
                    (
                        Vec::new(),
                        format!("the requester could not countersign: {why}"),
                    )
                }
            }
        }
        Verdict::Pay => (Vec::new(), "the job's budget is spent".to_string()),
        Verdict::Unpaid(why) => (Vec::new(), why.to_string()),
        Verdict::Disagreed(why) => {
            ledger.record(c.peer, EventKind::ComputeDisagreed);
            (Vec::new(), why.to_string())
        }
    };
    let paid = !receipt.is_empty();
    let disagreed = matches!(verdict, Verdict::Disagreed(_));
    let provider = c.peer.to_base58();
    job.update(|s| {
        if let Some(run) = s.runs.iter_mut().find(|run| run.provider == provider) {
            if !out_of_fuel {
                run.state = if disagreed { "disagreed" } else { "agreed" }.into();
            }
            run.credits = if paid { body.credits } else { 0 };
        }
        if paid {
            s.credits_spent += body.credits;
        }
    });
    let verdict = wire::Verdict { receipt, reason };
    let _ = tokio::time::timeout(ACK_TIMEOUT, tell(&mut stream, verdict)).await;
}

/// Countersigns and stores a receipt; returns its encoding.
async fn pay(svc: &ComputeService, signed: SignedReceipt) -> Result<Vec<u8>, ComputeServiceError> {
    let receipt = signed
        .countersign(&svc.inner.ctx.key)
        .map_err(ComputeServiceError::Countersign)?;
    let receipts = svc.inner.receipts.clone();
    let r = receipt.clone();
    tokio::task::spawn_blocking(move || receipts.add(&r))
        .await
        .map_err(|e| ComputeServiceError::Io {
            what: "storing a receipt".into(),
            source: std::io::Error::other(e),
        })??;
    Ok(receipt.signed.encode_to_vec())
}

async fn reject(results: Vec<Returned>, why: &str) {
    for Returned { mut stream, .. } in results {
        let verdict = wire::Verdict {
            receipt: Vec::new(),
            reason: why.into(),
        };
        let _ = tokio::time::timeout(ACK_TIMEOUT, tell(&mut stream, verdict)).await;
    }
}

async fn tell(stream: &mut libp2p::Stream, verdict: wire::Verdict) -> std::io::Result<()> {
    let req = Request {
        ask: Some(Ask::Verdict(verdict)),
    };
    write_msg(stream, &req).await?;
    stream.flush().await?;
    let _ = read_msg::<Response>(stream).await?;
    stream.close().await
}
