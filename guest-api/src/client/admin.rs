//! Administering the node's apps: issuing and revoking their tokens, and
//! every live session (admin only).

use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::error::Result;

impl Client {
    /// Issues (or rotates) an app's token (admin only).
    pub async fn issue_token(&self, app: &str) -> Result<String> {
        let op = Op::IssueToken(pb::IssueTokenRequest { app: app.into() });
        Ok(self.call(op, reply!(AppToken)).await?.token)
    }

    /// Revokes an app's token and ends its sessions (admin only).
    pub async fn revoke_app(&self, app: &str) -> Result<()> {
        self.ok(Op::RevokeApp(pb::RevokeAppRequest { app: app.into() }))
            .await
    }

    /// Apps holding tokens (admin only).
    pub async fn list_apps(&self) -> Result<Vec<String>> {
        let op = Op::ListApps(pb::ListAppsRequest {});
        Ok(self.call(op, reply!(Apps)).await?.apps)
    }

    /// Every live session and what it owns (admin only).
    pub async fn list_sessions(&self) -> Result<Vec<pb::SessionState>> {
        let op = Op::ListSessions(pb::ListSessionsRequest {});
        Ok(self.call(op, reply!(Sessions)).await?.sessions)
    }
}
