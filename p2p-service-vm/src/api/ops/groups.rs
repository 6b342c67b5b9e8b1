//! Trusted peer groups: creating a group, inviting, joining, revoking,
//! members, certificate requests, topic keys and CRLs. The group work itself
//! is `security`'s (through the content service, which serves group items);
//! here it is run off the async threads and answered.

use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::parse_peer;
use crate::api::apps::Principal;
use crate::api::{ApiError, ApiService};
use crate::content::ContentService;

fn group_pb(c: &ContentService, g: p2pvm_security::GroupInfo) -> pb::GroupInfo {
    pb::GroupInfo {
        id: g.id.to_string(),
        member: c.groups().is_member(g.id),
        name: g.name,
        owner: g.owner,
        ca_subject: g.ca_subject,
        member_until_unix: g.member_until.unwrap_or(0),
        crl_number: g.crl_number,
        relays_crl: g.relays_crl,
        topic_key_held: c.groups().topic_key_at(g.id, g.crl_number).is_some(),
    }
}

/// Group work (files, key generation) on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, p2pvm_security::GroupError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::new(pb::ErrorCode::Internal, e.to_string()))?
        .map_err(ApiError::from)
}

/// Runs one of this domain's stateless operations.
pub(in crate::api) async fn run(svc: &ApiService, who: &Principal, op: Op) -> Result<R, ApiError> {
    match op {
        Op::GroupCreate(r) => {
            who.require_admin()?;
            let c = svc.content().clone();
            let days = if r.valid_days == 0 { 365 } else { r.valid_days };
            let g =
                blocking(move || c.groups().create(&r.name, days.saturating_mul(86_400))).await?;
            svc.content().listen_crls(g.id).await;
            Ok(R::Group(group_pb(svc.content(), g)))
        }
        Op::GroupInvite(r) => {
            who.require_admin()?;
            let peer = parse_peer(&r.peer_id)?;
            let c = svc.content().clone();
            let secs = match (r.valid_secs, r.valid_days) {
                (0, 0) => 30 * 86_400,
                (0, days) => days.saturating_mul(86_400),
                (secs, _) => secs,
            };
            let group = r.group.clone();
            let (id, pem) = blocking(move || {
                let id = c.groups().resolve(&group)?;
                let pem = c.groups().invite(&group, &peer, secs)?;
                Ok((id, pem))
            })
            .await?;
            Ok(R::GroupInvitation(pb::GroupInvitation {
                group_id: id.to_string(),
                pem,
            }))
        }
        Op::GroupJoin(r) => {
            who.require_admin()?;
            let c = svc.content().clone();
            let name = (!r.name.is_empty()).then_some(r.name);
            let g = blocking(move || c.groups().join(&r.invitation, name.as_deref())).await?;
            svc.content().listen_crls(g.id).await;
            Ok(R::Group(group_pb(svc.content(), g)))
        }
        Op::GroupRevoke(r) => {
            who.require_admin()?;
            let peer = parse_peer(&r.peer_id)?;
            let c = svc.content().clone();
            let (id, crl) = blocking(move || {
                Ok((
                    c.groups().resolve(&r.group)?,
                    c.groups().revoke(&r.group, &peer)?,
                ))
            })
            .await?;
            // Members hear of it now (and again with every republish).
            svc.content().publish_crl(id, crl).await;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::GroupMembers(r) => {
            who.require_admin()?;
            let c = svc.content().clone();
            let group = r.group.clone();
            let (id, members) =
                blocking(move || Ok((c.groups().resolve(&group)?, c.groups().members(&group)?)))
                    .await?;
            Ok(R::GroupMembers(pb::GroupMemberList {
                group_id: id.to_string(),
                members: members
                    .into_iter()
                    .map(|m| pb::GroupMember {
                        peer_id: m.peer,
                        serial: m.serial,
                        not_before_unix: m.not_before,
                        not_after_unix: m.not_after,
                        revoked: m.revoked,
                    })
                    .collect(),
            }))
        }
        Op::GroupCsr(_) => {
            who.require_admin()?;
            let c = svc.content();
            let peer = svc.inner.ctx.node.peer_id();
            let pem = c.certificate_request().map_err(|e| {
                ApiError::new(pb::ErrorCode::Internal, format!("certificate request: {e}"))
            })?;
            Ok(R::GroupCsr(pb::GroupCsr {
                peer_id: peer.to_base58(),
                pem,
            }))
        }
        Op::GroupTopicKey(r) => {
            who.require_admin()?;
            let c = svc.content().clone();
            let id = blocking({
                let c = c.clone();
                move || c.groups().resolve(&r.group)
            })
            .await?;
            let epoch = c.groups().crl_number(id);
            if !r.signature.is_empty() {
                c.take_epoch_signature(id, epoch, r.signature.to_vec())
                    .await?;
            }
            let command = blocking({
                let c = c.clone();
                move || {
                    c.groups()
                        .openssl_epoch_command(id, epoch, &format!("epoch-{epoch}.sig"))
                }
            })
            .await
            .unwrap_or_else(|e| e.message);
            Ok(R::GroupTopicKey(pb::GroupTopicKey {
                group_id: id.to_string(),
                epoch,
                held: c.groups().topic_key_at(id, epoch).is_some(),
                message: p2pvm_security::group_topics::epoch_message(id, epoch),
                openssl_command: command,
            }))
        }
        Op::GroupCrlPublish(r) => {
            who.require_admin()?;
            let c = svc.content().clone();
            let (id, crl) = blocking({
                let c = c.clone();
                move || {
                    let id = c.groups().resolve(&r.group)?;
                    Ok((id, c.groups().relay_crl(id, &r.crl)?))
                }
            })
            .await?;
            c.publish_crl(id, crl).await;
            let g = c
                .groups()
                .list()
                .into_iter()
                .find(|g| g.id == id)
                .ok_or_else(|| ApiError::new(pb::ErrorCode::NotFound, "the group went away"))?;
            Ok(R::Group(group_pb(&c, g)))
        }
        Op::GroupList(_) => {
            let c = svc.content();
            Ok(R::Groups(pb::GroupList {
                groups: c
                    .groups()
                    .list()
                    .into_iter()
                    .map(|g| group_pb(c, g))
                    .collect(),
            }))
        }
        // The dispatcher routes only this domain's operations here.
        _ => Err(super::routed_wrongly()),
    }
}
