//! Operations that need no per-session state: node queries, DHT, publish,
//! service lookup and the admin calls. Each maps one request to one node call.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId, kad};
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use p2pvm_content::ContentId;

use super::apps::Principal;
use super::{ApiError, ApiService};
use crate::content::{ContentInfo, ContentService, PublishMeta};
use crate::node::{Command, PeerSummary, service_key};

/// Default bound on an operation that waits for the network.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound an app may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest DHT key.
const MAX_KEY_BYTES: usize = 1024;
/// Largest DHT value: Kademlia messages are capped at 16 KiB by default, and a
/// record travels with its key and publisher.
const MAX_VALUE_BYTES: usize = 8 << 10;
/// Most providers returned by one lookup.
const MAX_PROVIDERS: usize = 100;

pub(crate) fn timeout_of(ms: u32) -> Duration {
    if ms == 0 {
        DEFAULT_TIMEOUT
    } else {
        Duration::from_millis(ms as u64).min(MAX_TIMEOUT)
    }
}

pub(crate) fn parse_peer(s: &str) -> Result<PeerId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad(format!("invalid peer id {s:?}")))
}

fn parse_addr(s: &str) -> Result<Multiaddr, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad(format!("invalid multiaddr {s:?}")))
}

pub(crate) fn validate_service_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(
            "a service name has 1-64 of A-Z, a-z, 0-9, '-', '_', '.'",
        ))
    }
}

fn check_key(key: &[u8]) -> Result<kad::RecordKey, ApiError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad(format!(
            "a DHT key has 1-{MAX_KEY_BYTES} bytes"
        )));
    }
    Ok(kad::RecordKey::new(&key))
}

/// `p` as the API shows it; what this node serves each peer only to admin
/// callers (an app need not learn whom the node serves).
fn peer_info(svc: &ApiService, who: &Principal, p: PeerSummary) -> pb::PeerInfo {
    let content_streams = match content(svc) {
        Ok(c) if who.admin => c.inner.served.count(&p.peer_id) as u32,
        _ => 0,
    };
    pb::PeerInfo {
        peer_id: p.peer_id.to_string(),
        addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
        agent_version: p.agent_version.unwrap_or_default(),
        rtt_micros: p.rtt.map(|d| d.as_micros() as u64).unwrap_or(0),
        content_streams,
    }
}

pub(crate) fn require_admin(p: &Principal) -> Result<(), ApiError> {
    if p.admin {
        Ok(())
    } else {
        Err(ApiError::new(
            pb::ErrorCode::PermissionDenied,
            "this operation needs the admin capability",
        ))
    }
}

pub(crate) fn content(svc: &ApiService) -> Result<&ContentService, ApiError> {
    svc.inner.content.as_ref().ok_or_else(|| {
        ApiError::new(
            pb::ErrorCode::Unavailable,
            "content sharing is not running on this node",
        )
    })
}

pub(crate) fn parse_content_id(s: &str) -> Result<ContentId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad(format!("invalid content id {s:?} (64 hex digits)")))
}

pub(crate) fn publish_meta(r: &pb::ContentPublishRequest) -> Result<PublishMeta, ApiError> {
    Ok(PublishMeta {
        name: r.name.clone(),
        mime_type: r.mime_type.clone(),
        tags: r.tags.clone(),
        rights: r.rights.as_ref().map(|x| p2pvm_content::Rights {
            licence: x.licence.clone(),
            redistribution_allowed: x.redistribution_allowed,
            expires_unix: x.expires_unix,
            allowed_groups: x.allowed_groups.clone(),
        }),
        pin: r.pin,
    })
}

pub(crate) fn content_info(c: &ContentService, i: ContentInfo) -> pb::ContentInfo {
    use p2pvm_security::Certification;
    let (certification, certified_by, certified_subject) = match c
        .certification(&i.manifest.manifest)
    {
        Ok(Certification::SelfSigned) => ("self-signed".to_string(), String::new(), String::new()),
        Ok(Certification::Certified { subject, issuer }) => ("certified".into(), issuer, subject),
        Ok(Certification::Unverified { subject, issuer }) => ("unverified".into(), issuer, subject),
        Err(e) => (
            format!("invalid: {}", crate::content::chain(&e)),
            String::new(),
            String::new(),
        ),
    };
    let m = i.manifest.manifest;
    pb::ContentInfo {
        certification,
        certified_by,
        certified_subject,
        content_id: i.manifest.id.to_string(),
        name: m.name,
        mime_type: m.mime_type,
        size: m.size,
        publisher: m.publisher,
        created_unix: m.created_unix,
        tags: m.tags,
        rights: m.rights.map(|r| pb::ContentRights {
            licence: r.licence,
            redistribution_allowed: r.redistribution_allowed,
            expires_unix: r.expires_unix,
            allowed_groups: r.allowed_groups,
        }),
        signed_manifest: i.manifest.signed.into(),
        local: i.local.is_some(),
        pinned: i.local.is_some_and(|l| l.pinned),
        providers: i.providers.iter().map(|p| p.to_string()).collect(),
    }
}

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

/// Refuses topics the node uses itself (group CRLs).
pub(crate) fn reserved_topic(topic: &str) -> Result<(), ApiError> {
    if topic.starts_with(crate::content::crls::RESERVED_TOPIC_PREFIX) {
        return Err(ApiError::new(
            pb::ErrorCode::PermissionDenied,
            format!("{topic} is reserved for the node"),
        ));
    }
    Ok(())
}

/// A group topic `group:<group id>/<name>`: its group (of which this node
/// must be a current member) and name; `None` for other topics.
pub(crate) fn group_topic_of(
    svc: &ApiService,
    topic: &str,
) -> Result<Option<(p2pvm_security::GroupId, String)>, ApiError> {
    let Some(rest) = topic.strip_prefix("group:") else {
        return Ok(None);
    };
    let bad = || ApiError::bad("a group topic is group:<group id>/<name>");
    let (group, name) = rest.split_once('/').ok_or_else(bad)?;
    let id: p2pvm_security::GroupId = group.parse().map_err(|_| bad())?;
    if name.is_empty() {
        return Err(bad());
    }
    if !content(svc)?.groups().is_member(id) {
        return Err(ApiError::new(
            pb::ErrorCode::DrmNotGroupMember,
            format!("this node is not a current member of group {id}"),
        ));
    }
    Ok(Some((id, name.to_owned())))
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

/// Node info from the status the event loop publishes; answered inline.
pub(crate) fn node_info(svc: &ApiService) -> R {
    let node = &svc.inner.node;
    let (addrs, n) = node.status();
    let (used, peak, budget) = svc.inner.content.as_ref().map_or((0, 0, 0), |c| c.memory());
    R::NodeInfo(pb::NodeInfo {
        peer_id: node.peer_id().to_string(),
        listen_addrs: addrs.iter().map(|a| a.to_string()).collect(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: p2pvm_proto::PROTOCOL_VERSION,
        connected_peers: n as u32,
        content_fast_path_port: svc
            .inner
            .content
            .as_ref()
            .and_then(|c| c.fast_path_port())
            .map_or(0, u32::from),
        content_memory_used_bytes: used,
        content_memory_peak_bytes: peak,
        content_memory_budget_bytes: budget,
    })
}

/// Runs one stateless operation.
pub(crate) async fn run(svc: &ApiService, who: &Principal, op: Op) -> Result<R, ApiError> {
    let node = &svc.inner.node;
    match op {
        Op::NodeInfo(_) => Ok(node_info(svc)),
        Op::Peers(_) => {
            let peers = node.call(Command::Peers).await?;
            Ok(R::Peers(pb::PeerList {
                peers: peers.into_iter().map(|p| peer_info(svc, who, p)).collect(),
            }))
        }
        Op::Connect(r) => {
            let peer = if r.peer_id.is_empty() {
                None
            } else {
                Some(parse_peer(&r.peer_id)?)
            };
            let addrs = r
                .addrs
                .iter()
                .map(|a| parse_addr(a))
                .collect::<Result<Vec<_>, _>>()?;
            if peer.is_none() && addrs.is_empty() {
                return Err(ApiError::bad("give a peer id, addresses, or both"));
            }
            let peer = node
                .call_timeout(timeout_of(r.timeout_ms), |reply| Command::Connect {
                    peer,
                    addrs,
                    reply,
                })
                .await?;
            Ok(R::Peer(pb::PeerInfo {
                peer_id: peer.to_string(),
                ..Default::default()
            }))
        }
        Op::Disconnect(r) => {
            require_admin(who)?;
            let peer = parse_peer(&r.peer_id)?;
            node.call(|reply| Command::Disconnect(peer, reply)).await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::FindPeer(r) => {
            let peer = parse_peer(&r.peer_id)?;
            let found = node
                .call_timeout(timeout_of(r.timeout_ms), |reply| {
                    Command::FindPeer(peer, reply)
                })
                .await?;
            Ok(R::Peer(peer_info(svc, who, found)))
        }
        Op::PutRecord(r) => {
            let key = check_key(&r.key)?;
            if r.value.len() > MAX_VALUE_BYTES {
                return Err(ApiError::bad(format!(
                    "a DHT value has at most {MAX_VALUE_BYTES} bytes"
                )));
            }
            let mut record = kad::Record::new(key, r.value.to_vec());
            record.publisher = Some(node.peer_id());
            node.call_timeout(timeout_of(r.timeout_ms), |reply| {
                Command::PutRecord(record, reply)
            })
            .await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::GetRecord(r) => {
            let key = check_key(&r.key)?;
            let rec = node
                .call_timeout(timeout_of(r.timeout_ms), |reply| {
                    Command::GetRecord(key, reply)
                })
                .await?;
            Ok(R::Record(pb::Record {
                key: rec.key.to_vec().into(),
                value: rec.value.into(),
                publisher: rec.publisher.map(|p| p.to_string()).unwrap_or_default(),
            }))
        }
        Op::Provide(r) => {
            let key = check_key(&r.key)?;
            node.call_timeout(timeout_of(r.timeout_ms), |reply| {
                Command::Provide(key, reply)
            })
            .await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::FindProviders(r) => {
            let key = check_key(&r.key)?;
            let peers = find_providers(svc, key, r.limit, r.timeout_ms).await?;
            Ok(R::Providers(pb::PeerList {
                peers: peers
                    .into_iter()
                    .map(|p| pb::PeerInfo {
                        peer_id: p.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            }))
        }
        Op::Publish(r) => {
            if r.topic.is_empty() {
                return Err(ApiError::bad("empty topic"));
            }
            reserved_topic(&r.topic)?;
            if let Some((id, name)) = group_topic_of(svc, &r.topic)? {
                content(svc)?
                    .publish_group(id, &name, r.data.to_vec())
                    .await
                    .map_err(|e| {
                        use crate::content::group_topics::GroupTopicError as G;
                        let code = match &e {
                            G::NotMember(_) => pb::ErrorCode::DrmNotGroupMember,
                            G::NoKey(_) => pb::ErrorCode::Unavailable,
                            G::Seal(_) => pb::ErrorCode::Internal,
                            G::Node(_) => pb::ErrorCode::Unavailable,
                        };
                        ApiError::new(code, crate::content::chain(&e))
                    })?;
                return Ok(R::Ok(pb::Empty {}));
            }
            node.call(|reply| Command::Publish(r.topic, r.data, reply))
                .await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::TopicPeers(r) => {
            let peers = node
                .call(|reply| Command::TopicPeers(r.topic, reply))
                .await?;
            Ok(R::TopicPeers(pb::PeerIdList {
                peer_ids: peers.iter().map(|p| p.to_string()).collect(),
            }))
        }
        Op::FindService(r) => {
            validate_service_name(&r.name)?;
            let mut peers: Vec<String> = Vec::new();
            if svc.inner.services.lock().await.contains_key(&r.name) {
                peers.push(node.peer_id().to_string());
            }
            let remote = find_providers(svc, service_key(&r.name), r.limit, r.timeout_ms).await;
            match remote {
                Ok(found) => peers.extend(
                    found
                        .into_iter()
                        .filter(|p| *p != node.peer_id())
                        .map(|p| p.to_string()),
                ),
                // Not finding remote offers is not an error when this node offers it.
                Err(_) if !peers.is_empty() => {}
                Err(e) => return Err(e),
            }
            Ok(R::Services(pb::ServiceList {
                name: r.name,
                peer_ids: peers,
            }))
        }
        Op::IssueToken(r) => {
            require_admin(who)?;
            let token = svc.change_apps(|apps| apps.with_issued(&r.app)).await?;
            Ok(R::AppToken(pb::AppToken { app: r.app, token }))
        }
        Op::ListApps(_) => {
            require_admin(who)?;
            let apps = svc.inner.apps.lock().expect("lock").list();
            Ok(R::Apps(pb::AppList { apps }))
        }
        Op::ListSessions(_) => {
            require_admin(who)?;
            let sessions = svc.inner.sessions.lock().expect("lock");
            let mut list: Vec<pb::SessionState> = sessions
                .values()
                .map(|s| s.state.lock().expect("lock").clone())
                .collect();
            list.sort_by_key(|s| s.session_id);
            Ok(R::Sessions(pb::SessionList { sessions: list }))
        }
        Op::RevokeApp(_) => require_admin(who).and(Err(ApiError::new(
            pb::ErrorCode::Internal,
            "revocation is handled by the session",
        ))),
        Op::ContentPublish(r) => {
            // Only the path form is stateless; the stream form is the session's.
            let meta = publish_meta(&r)?;
            let info = content(svc)?
                .publish_path(std::path::Path::new(&r.path), meta)
                .await?;
            Ok(R::Content(content_info(content(svc)?, info)))
        }
        Op::ContentDownload(r) => {
            let id = parse_content_id(&r.content_id)?;
            let c = content(svc)?;
            Ok(R::Content(content_info(c, c.download(&id).await?)))
        }
        Op::ContentSearch(r) => {
            let c = content(svc)?;
            let items = c
                .search(&r.query, if r.limit == 0 { 50 } else { r.limit as usize })
                .await?;
            Ok(R::ContentList(pb::ContentList {
                items: items.into_iter().map(|i| content_info(c, i)).collect(),
            }))
        }
        Op::ContentStat(r) => {
            let id = parse_content_id(&r.content_id)?;
            let c = content(svc)?;
            Ok(R::Content(content_info(c, c.stat(&id).await?)))
        }
        Op::ContentList(_) => {
            let c = content(svc)?;
            Ok(R::ContentList(pb::ContentList {
                items: c
                    .list()
                    .await?
                    .into_iter()
                    .map(|i| content_info(c, i))
                    .collect(),
            }))
        }
        Op::ContentPin(r) => {
            let id = parse_content_id(&r.content_id)?;
            content(svc)?.pin(&id, r.pinned).await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::ContentDelete(r) => {
            require_admin(who)?;
            let id = parse_content_id(&r.content_id)?;
            content(svc)?.delete(&id).await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::CreditList(_) => {
            require_admin(who)?;
            let peers = content(svc)?.inner.ledger.list();
            Ok(R::CreditList(pb::CreditList {
                peers: peers.iter().map(credit_pb).collect(),
            }))
        }
        Op::CreditShow(r) => {
            require_admin(who)?;
            let peer = parse_peer(&r.peer_id)?;
            Ok(R::Credit(credit_pb(
                &content(svc)?.inner.ledger.credit(&peer),
            )))
        }
        Op::CreditHistory(r) => {
            require_admin(who)?;
            let peer = parse_peer(&r.peer_id)?;
            let ledger = content(svc)?.inner.ledger.clone();
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
        Op::GroupCreate(r) => {
            require_admin(who)?;
            let c = content(svc)?.clone();
            let days = if r.valid_days == 0 { 365 } else { r.valid_days };
            let g =
                blocking(move || c.groups().create(&r.name, days.saturating_mul(86_400))).await?;
            content(svc)?.listen_crls(g.id).await;
            Ok(R::Group(group_pb(content(svc)?, g)))
        }
        Op::GroupInvite(r) => {
            require_admin(who)?;
            let peer = parse_peer(&r.peer_id)?;
            let c = content(svc)?.clone();
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
            require_admin(who)?;
            let c = content(svc)?.clone();
            let name = (!r.name.is_empty()).then_some(r.name);
            let g = blocking(move || c.groups().join(&r.invitation, name.as_deref())).await?;
            content(svc)?.listen_crls(g.id).await;
            Ok(R::Group(group_pb(content(svc)?, g)))
        }
        Op::GroupRevoke(r) => {
            require_admin(who)?;
            let peer = parse_peer(&r.peer_id)?;
            let c = content(svc)?.clone();
            let (id, crl) = blocking(move || {
                Ok((
                    c.groups().resolve(&r.group)?,
                    c.groups().revoke(&r.group, &peer)?,
                ))
            })
            .await?;
            // Members hear of it now (and again with every republish).
            content(svc)?.publish_crl(id, crl).await;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::GroupMembers(r) => {
            require_admin(who)?;
            let c = content(svc)?.clone();
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
            require_admin(who)?;
            let c = content(svc)?;
            let peer = c.inner.key.public().to_peer_id();
            let pem = c.certificate_request().map_err(|e| {
                ApiError::new(pb::ErrorCode::Internal, format!("certificate request: {e}"))
            })?;
            Ok(R::GroupCsr(pb::GroupCsr {
                peer_id: peer.to_base58(),
                pem,
            }))
        }
        Op::GroupTopicKey(r) => {
            require_admin(who)?;
            let c = content(svc)?.clone();
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
            require_admin(who)?;
            let c = content(svc)?.clone();
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
        op @ (Op::ComputeOffer(_)
        | Op::ComputeWithdraw(_)
        | Op::ComputeSubmit(_)
        | Op::ComputeStatus(_)
        | Op::ComputeCancel(_)
        | Op::ComputeBalance(_)
        | Op::ComputeReceipts(_)) => super::compute::run(svc, who, op).await,
        Op::GroupList(_) => {
            let c = content(svc)?;
            Ok(R::Groups(pb::GroupList {
                groups: c
                    .groups()
                    .list()
                    .into_iter()
                    .map(|g| group_pb(c, g))
                    .collect(),
            }))
        }
        // Session-bound operations never reach here; answer clearly if one does.
        _ => Err(ApiError::new(
            pb::ErrorCode::Internal,
            "operation routed wrongly",
        )),
    }
}

async fn find_providers(
    svc: &ApiService,
    key: kad::RecordKey,
    limit: u32,
    timeout_ms: u32,
) -> Result<Vec<PeerId>, ApiError> {
    let limit = if limit == 0 {
        20
    } else {
        (limit as usize).min(MAX_PROVIDERS)
    };
    let mut found = svc
        .inner
        .node
        .call_timeout(timeout_of(timeout_ms), |reply| Command::FindProviders {
            key,
            limit,
            reply,
        })
        .await?;
    found.truncate(limit);
    Ok(found)
}
