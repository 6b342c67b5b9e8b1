//! Named services: advertising one (kept across reconnection), withdrawing
//! it, and finding the peers that offer one.

use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::error::Result;

impl Client {
    /// Advertises a named service (e.g. "chat") that others can find.
    pub async fn advertise_service(&self, name: &str) -> Result<()> {
        self.ok(Op::AdvertiseService(pb::AdvertiseServiceRequest {
            name: name.into(),
        }))
        .await?;
        self.inner
            .regs
            .lock()
            .expect("lock")
            .services
            .push(name.into());
        Ok(())
    }

    /// Withdraws an advertisement.
    pub async fn withdraw_service(&self, name: &str) -> Result<()> {
        self.inner
            .regs
            .lock()
            .expect("lock")
            .services
            .retain(|s| s != name);
        self.ok(Op::WithdrawService(pb::WithdrawServiceRequest {
            name: name.into(),
        }))
        .await
    }

    /// Peers offering a named service.
    pub async fn find_service(&self, name: &str) -> Result<Vec<String>> {
        let op = Op::FindService(pb::FindServiceRequest {
            name: name.into(),
            limit: 0,
            timeout_ms: 0,
        });
        Ok(self.call(op, reply!(Services)).await?.peer_ids)
    }
}
