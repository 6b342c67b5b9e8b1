//! Compute leasing: offering this machine to other nodes' jobs (admin),
//! submitting WebAssembly jobs to theirs, following a job until it ends,
//! and the credits the double-signed receipts add up to.
//!
//! A job names its module and input by content id (publish them first); it
//! runs in the background on other nodes, and its agreed result is stored
//! on this node as a content item, fetched like any other.

use std::time::Duration;

use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::error::{Error, Result};

/// How often [`Client::compute_wait`] asks for a job's state.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Whether a job in `state` has ended: `done`, `failed` or `cancelled`
/// (the others, `finding`, `running` and `validating`, are on their way).
pub fn compute_job_ended(state: &str) -> bool {
    matches!(state, "done" | "failed" | "cancelled")
}

impl Client {
    /// Offers this machine to other nodes' jobs with these limits and price
    /// (its `offering` is ignored; zero fields take the node's defaults), or
    /// replaces the offer in force; the answer is the offer now in force
    /// (admin).
    pub async fn compute_offer(&self, offer: pb::ComputeOffer) -> Result<pb::ComputeOffer> {
        let op = Op::ComputeOffer(pb::ComputeOfferRequest { offer: Some(offer) });
        self.call(op, reply!(ComputeOffer)).await
    }

    /// Stops offering this machine to new jobs (admin).
    pub async fn compute_withdraw(&self) -> Result<()> {
        self.ok(Op::ComputeWithdraw(pb::ComputeWithdrawRequest {}))
            .await
    }

    /// Submits a job: module `module_id` run on input `input_id` (content
    /// ids; an empty input means none) by `replicas` providers (0: 2), for
    /// at most `budget` credits in all. Returns at once with the job in state
    /// `finding`; follow it with [`Client::compute_wait`].
    pub async fn compute_submit(
        &self,
        module_id: &str,
        input_id: &str,
        budget: u64,
        replicas: u32,
    ) -> Result<pb::ComputeJob> {
        let op = Op::ComputeSubmit(pb::ComputeSubmitRequest {
            module_id: module_id.into(),
            input_id: input_id.into(),
            budget,
            replicas,
        });
        self.call(op, reply!(ComputeJob)).await
    }

    /// Job `job_id`, or (with `None`) every job this node submitted, newest
    /// first.
    pub async fn compute_status(&self, job_id: Option<&str>) -> Result<Vec<pb::ComputeJob>> {
        let op = Op::ComputeStatus(pb::ComputeStatusRequest {
            job_id: job_id.unwrap_or_default().into(),
        });
        Ok(self.call(op, reply!(ComputeJobs)).await?.jobs)
    }

    /// One job's state and runs.
    pub async fn compute_job(&self, job_id: &str) -> Result<pb::ComputeJob> {
        if job_id.is_empty() {
            // Without an id the node would answer with every job.
            return Err(Error::Api {
                code: pb::ErrorCode::BadRequest,
                message: "no job id given".into(),
            });
        }
        let jobs = self.compute_status(Some(job_id)).await?;
        jobs.into_iter().next().ok_or_else(|| Error::Api {
            code: pb::ErrorCode::NotFound,
            message: format!("no compute job {job_id}"),
        })
    }

    /// Asks for job `job_id`'s state every 200 ms, handing each answer to
    /// `on_progress`, until the job has ended (see
    /// [`compute_job_ended`]); returns the final job. A job that
    /// failed or was cancelled is still `Ok`: its `state`, `error_code` and
    /// `error` say what happened.
    pub async fn compute_wait(
        &self,
        job_id: &str,
        mut on_progress: impl FnMut(&pb::ComputeJob),
    ) -> Result<pb::ComputeJob> {
        loop {
            let job = self.compute_job(job_id).await?;
            on_progress(&job);
            if compute_job_ended(&job.state) {
                return Ok(job);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Cancels job `job_id`: its providers stop, and it ends `cancelled`.
    pub async fn compute_cancel(&self, job_id: &str) -> Result<()> {
        self.ok(Op::ComputeCancel(pb::ComputeCancelRequest {
            job_id: job_id.into(),
        }))
        .await
    }

    /// This node's credits as the receipts it holds add them up: earned as a
    /// provider, spent as a requester.
    pub async fn compute_balance(&self) -> Result<pb::ComputeBalance> {
        let op = Op::ComputeBalance(pb::ComputeBalanceRequest {});
        self.call(op, reply!(ComputeBalance)).await
    }

    /// The receipts this node holds, at most `limit` (0: the node's default).
    pub async fn compute_receipts(&self, limit: u32) -> Result<Vec<pb::ComputeReceipt>> {
        let op = Op::ComputeReceipts(pb::ComputeReceiptsRequest { limit });
        Ok(self.call(op, reply!(ComputeReceipts)).await?.receipts)
    }
}
