//! The operator's calls: app tokens (issue, list, revoke) and the node's
//! live sessions. All need the admin capability.

use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use crate::api::apps::Principal;
use crate::api::session::{Session, ok};
use crate::api::{ApiError, ApiService};

/// Runs one of this domain's stateless operations.
pub(in crate::api) async fn run(svc: &ApiService, who: &Principal, op: Op) -> Result<R, ApiError> {
    match op {
        Op::IssueToken(r) => {
            who.require_admin()?;
            let token = svc.change_apps(|apps| apps.with_issued(&r.app)).await?;
            Ok(R::AppToken(pb::AppToken { app: r.app, token }))
        }
        Op::ListApps(_) => {
            who.require_admin()?;
            let apps = svc.inner.apps.lock().expect("lock").list();
            Ok(R::Apps(pb::AppList { apps }))
        }
        Op::ListSessions(_) => {
            who.require_admin()?;
            let sessions = svc.inner.sessions.lock().expect("lock");
            let mut list: Vec<pb::SessionState> = sessions
                .values()
                .map(|s| s.state.lock().expect("lock").clone())
                .collect();
            list.sort_by_key(|s| s.session_id);
            Ok(R::Sessions(pb::SessionList { sessions: list }))
        }
        Op::RevokeApp(_) => who.require_admin().and(Err(ApiError::new(
            pb::ErrorCode::Internal,
            "revocation is handled by the session",
        ))),
        // The dispatcher routes only this domain's operations here.
        _ => Err(super::routed_wrongly()),
    }
}

impl Session {
    /// Revokes an app's token and ends its sessions (the stateless `run` refuses
    /// this one: it is routed here).
    pub(in crate::api) async fn revoke_app(
        &self,
        app: &str,
    ) -> Result<pb::response::Result, ApiError> {
        self.svc
            .change_apps(|apps| Ok(((), apps.with_revoked(app)?)))
            .await?;
        self.svc.kill_app_sessions(app);
        ok()
    }
}
