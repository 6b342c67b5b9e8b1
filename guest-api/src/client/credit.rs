//! The credit ledger as this node keeps it: every peer's score, one peer's
//! credit and its notable events (admin).

use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::error::Result;

impl Client {
    /// Every peer this node has credit records for, best score first (admin).
    pub async fn credit_list(&self) -> Result<Vec<pb::PeerCredit>> {
        let op = Op::CreditList(pb::CreditListRequest {});
        Ok(self.call(op, reply!(CreditList)).await?.peers)
    }

    /// One peer's credit (a stranger's when never observed; admin).
    pub async fn credit_show(&self, peer_id: &str) -> Result<pb::PeerCredit> {
        let op = Op::CreditShow(pb::CreditShowRequest {
            peer_id: peer_id.into(),
        });
        self.call(op, reply!(Credit)).await
    }

    /// One peer's notable events, newest first (admin).
    pub async fn credit_history(&self, peer_id: &str, limit: u32) -> Result<Vec<pb::CreditEvent>> {
        let op = Op::CreditHistory(pb::CreditHistoryRequest {
            peer_id: peer_id.into(),
            limit,
        });
        Ok(self.call(op, reply!(CreditHistory)).await?.events)
    }
}
