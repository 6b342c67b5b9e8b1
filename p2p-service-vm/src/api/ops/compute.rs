//! The compute leasing operations: offer, withdraw, submit, status, cancel,
//! balance, receipts. Offering the machine is an operator's decision
//! (admin); any app may submit jobs and read their state.

use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use crate::api::apps::Principal;
use crate::api::{ApiError, ApiService};
use crate::compute::wire;

/// Most receipts one answer lists.
const MAX_RECEIPTS: usize = 1000;

fn offer_pb(o: Option<wire::Offer>) -> pb::ComputeOffer {
    match o {
        Some(o) => pb::ComputeOffer {
            offering: true,
            max_memory_bytes: o.max_memory_bytes,
            max_wall_ms: o.max_wall_ms,
            max_fuel: o.max_fuel,
            price_per_mfuel: o.price_per_mfuel,
            max_jobs: o.max_jobs,
        },
        None => pb::ComputeOffer::default(),
    }
}

pub(in crate::api) async fn run(svc: &ApiService, who: &Principal, op: Op) -> Result<R, ApiError> {
    let c = svc.compute();
    match op {
        Op::ComputeOffer(r) => {
            who.require_admin()?;
            let o = r.offer.unwrap_or_default();
            let set = c
                .set_offer(wire::Offer {
                    max_memory_bytes: o.max_memory_bytes,
                    max_wall_ms: o.max_wall_ms,
                    max_fuel: o.max_fuel,
                    price_per_mfuel: o.price_per_mfuel,
                    max_jobs: o.max_jobs,
                    running: 0,
                })
                .await?;
            Ok(R::ComputeOffer(offer_pb(Some(set))))
        }
        Op::ComputeWithdraw(_) => {
            who.require_admin()?;
            c.withdraw().await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::ComputeSubmit(r) => Ok(R::ComputeJob(c.submit(
            &r.module_id,
            &r.input_id,
            r.budget,
            r.replicas,
        )?)),
        Op::ComputeStatus(r) => {
            let job = (!r.job_id.is_empty()).then_some(r.job_id.as_str());
            Ok(R::ComputeJobs(pb::ComputeJobList {
                jobs: c.status(job)?,
            }))
        }
        Op::ComputeCancel(r) => {
            c.cancel(&r.job_id)?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::ComputeBalance(_) => Ok(R::ComputeBalance(c.balance().await)),
        Op::ComputeReceipts(r) => {
            let limit = match r.limit {
                0 => 100,
                n => (n as usize).min(MAX_RECEIPTS),
            };
            Ok(R::ComputeReceipts(pb::ComputeReceiptList {
                receipts: c.receipts(limit),
            }))
        }
        _ => Err(ApiError::new(
            pb::ErrorCode::Internal,
            "operation routed wrongly",
        )),
    }
}
