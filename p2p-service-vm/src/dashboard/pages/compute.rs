//! This node's compute offer, its jobs, receipts and balance.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::Response;
use indicatif::{HumanBytes, HumanDuration};
use maud::html;
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::content::ITEM_ROWS;
use super::{Nav, PageError, View, ask, failed, layout, short, when};
use crate::dashboard::Dashboard;
use crate::dashboard::auth::Operator;

/// This node's offer, its jobs, receipts and balance.
pub(in crate::dashboard) async fn compute(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Query(view): Query<View>,
) -> Response {
    let offer = d.api.compute().offer();
    let balance = match ask(&d, Op::ComputeBalance(pb::ComputeBalanceRequest {})).await {
        Ok(R::ComputeBalance(b)) => Ok(b),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    let jobs = match ask(
        &d,
        Op::ComputeStatus(pb::ComputeStatusRequest {
            job_id: String::new(),
        }),
    )
    .await
    {
        Ok(R::ComputeJobs(l)) => Ok(l.jobs),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    let receipts = match ask(
        &d,
        Op::ComputeReceipts(pb::ComputeReceiptsRequest { limit: 50 }),
    )
    .await
    {
        Ok(R::ComputeReceipts(l)) => Ok(l.receipts),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    let main = html! {
        h1 { "Compute" }
        h2 { "Balance" }
        @match &balance {
            Err(e) => (failed("Balance", e)),
            Ok(b) => p #balance {
                (b.balance) " credits (" (b.earned) " earned, " (b.spent) " spent over " (b.receipts)
                " receipts); " (b.available) " available for new jobs, " (b.reserved) " reserved."
            },
        }
        h2 { "Offer" }
        @match &offer {
            None => p #offer { "This node offers no compute." },
            Some(o) => p #offer {
                "Up to " (o.max_jobs) " jobs at once, each up to " (HumanBytes(o.max_memory_bytes)) " of memory, "
                (HumanDuration(Duration::from_millis(o.max_wall_ms))) " and " (o.max_fuel) " fuel; "
                (o.price_per_mfuel) " credits per million fuel."
            },
        }
        h2 { "Jobs" }
        @match &jobs {
            Err(e) => (failed("Jobs", e)),
            Ok(j) if j.is_empty() => p { "No job submitted." },
            Ok(j) => div.scroll { table #jobs {
                thead { tr { th { "Job" } th { "State" } th { "Budget" } th { "Spent" } th { "Runs" } th { "Submitted" } } }
                tbody { @for j in j.iter().take(ITEM_ROWS) { tr {
                    td { code { (short(&j.job_id)) } } td { (j.state) @if !j.error.is_empty() { br; small { (j.error) } } }
                    td { (j.budget) } td { (j.credits_spent) } td { (j.runs.len()) } td { (when(j.submitted_unix)) }
                } } }
            } },
        }
        h2 { "Receipts" }
        @match &receipts {
            Err(e) => (failed("Receipts", e)),
            Ok(r) if r.is_empty() => p { "No receipt yet." },
            Ok(r) => div.scroll { table #receipts {
                thead { tr { th { "Completed" } th { "Requester" } th { "Provider" } th { "Work" } th { "Credits" } } }
                tbody { @for r in r { tr {
                    td { (when(r.completed_unix)) } td { code { (short(&r.requester)) } } td { code { (short(&r.provider)) } }
                    td { (r.work_units) } td { (r.credits) }
                } } }
            } },
        }
    };
    layout(&d, &op, Nav::Compute, &view, main)
}
