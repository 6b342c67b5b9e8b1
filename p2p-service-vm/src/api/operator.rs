//! The operator's calls from outside an API session (the dashboard): the
//! admin token is checked against the same credential store a session's
//! handshake uses, and the operations are the API's own. They are not
//! counted in the API's metrics: an open dashboard asks every 2 s, and the
//! figures are for the apps' traffic.

use libp2p::PeerId;
use p2pvm_proto::pb::request::Op;
use p2pvm_proto::pb::response::Result as R;

use super::apps::{ADMIN_APP, Principal};
use super::{ApiError, ApiService, ops};
use crate::node::Command;

impl ApiService {
    /// Whether `token` is the operator's (admin) token now. An app's token
    /// is not: the dashboard shows what only the operator may see.
    pub fn is_operator_token(&self, token: &str) -> bool {
        self.inner
            .apps
            .lock()
            .expect("lock")
            .authenticate(token)
            .is_some_and(|p| p.admin)
    }

    /// Runs one stateless operation with the operator's rights.
    pub async fn as_operator(&self, op: Op) -> Result<R, ApiError> {
        let operator = Principal {
            app: ADMIN_APP.into(),
            admin: true,
        };
        ops::run(self, &operator, op).await
    }

    /// Bans `peer` until `until_unix` (the operator's decision, written at
    /// once) and closes its connections; the credit task keeps it out.
    pub async fn ban_peer(
        &self,
        peer: PeerId,
        until_unix: u64,
        reason: &str,
    ) -> Result<(), ApiError> {
        let (ledger, reason) = (self.inner.ctx.ledger.clone(), reason.to_owned());
        tokio::task::spawn_blocking(move || ledger.ban(peer, until_unix, &reason))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        // A peer not connected now is refused when it comes back.
        let _ = self
            .inner
            .ctx
            .node
            .call(|reply| Command::Disconnect(peer, reply))
            .await;
        Ok(())
    }

    /// Lifts `peer`'s ban; whether there was one.
    pub async fn unban_peer(&self, peer: PeerId) -> Result<bool, ApiError> {
        let ledger = self.inner.ctx.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.unban(&peer))
            .await
            .map_err(internal)?
            .map_err(internal)
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(p2pvm_proto::pb::ErrorCode::Internal, e.to_string())
}
