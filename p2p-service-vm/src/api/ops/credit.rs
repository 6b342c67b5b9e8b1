//! The credit ledger as the operator sees it: every peer's standing, one
//! peer's record and its history. Admin only: an app need not learn what
//! this node thinks of its peers.

use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::parse_peer;
use crate::api::apps::Principal;
use crate::api::{ApiError, ApiService};

fn credit_pb(c: &p2pvm_security::PeerCredit) -> pb::PeerCredit {
    use p2pvm_security::Standing;
    pb::PeerCredit {
        peer_id: c.peer.to_string(),
        score: c.score as u32,
        standing: match c.standing {
            Standing::Good => "good",
            Standing::Throttled => "throttled",
            Standing::Refused => "refused",
            Standing::Banned => "banned",
        }
        .into(),
        expected_bytes_per_sec: c.expected_bps,
        reliability: c.reliability,
        bytes_received: c.bytes_received,
        bytes_served: c.bytes_served,
        requests_ok: c.requests_ok,
        requests_failed: c.requests_failed,
        corrupt_blocks: c.corrupt_blocks,
        violations: c.violations,
        malware: c.malware,
        drm_passed: c.drm_passed,
        drm_failed: c.drm_failed,
        compute_agreed: c.compute_agreed,
        compute_disagreed: c.compute_disagreed,
        expected_fuel_per_sec: c.expected_fuel_per_sec,
        uptime_secs: c.uptime_secs,
        first_seen_unix: c.first_seen_unix,
        last_seen_unix: c.last_seen_unix,
        banned_until_unix: c.ban.as_ref().map(|b| b.until_unix).unwrap_or(0),
        ban_reason: c.ban.as_ref().map(|b| b.reason.clone()).unwrap_or_default(),
    }
}

/// Runs one of this domain's stateless operations.
pub(in crate::api) async fn run(svc: &ApiService, who: &Principal, op: Op) -> Result<R, ApiError> {
    match op {
        Op::CreditList(_) => {
            who.require_admin()?;
            let peers = svc.inner.ctx.ledger.list();
            Ok(R::CreditList(pb::CreditList {
                peers: peers.iter().map(credit_pb).collect(),
            }))
        }
        Op::CreditShow(r) => {
            who.require_admin()?;
            let peer = parse_peer(&r.peer_id)?;
            Ok(R::Credit(credit_pb(&svc.inner.ctx.ledger.credit(&peer))))
        }
        Op::CreditHistory(r) => {
            who.require_admin()?;
            let peer = parse_peer(&r.peer_id)?;
            let ledger = svc.inner.ctx.ledger.clone();
            let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) } as usize;
            let events = tokio::task::spawn_blocking(move || ledger.history(&peer, limit))
                .await
                .map_err(|e| ApiError::new(pb::ErrorCode::Internal, e.to_string()))?
                .map_err(|e| ApiError::new(pb::ErrorCode::Internal, e.to_string()))?;
            Ok(R::CreditHistory(pb::CreditHistory {
                peer_id: r.peer_id,
                events: events
                    .into_iter()
                    .map(|e| pb::CreditEvent {
                        at_unix: e.at_unix,
                        kind: e.kind,
                        amount: e.amount,
                        detail: e.detail,
                    })
                    .collect(),
            }))
        }
        // The dispatcher routes only this domain's operations here.
        _ => Err(super::routed_wrongly()),
    }
}
