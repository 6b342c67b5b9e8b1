//! The DHT and the service registry: records, provider records, and the
//! services apps advertise (a session's advertisements are reference-counted
//! node-wide: the first announces, the last one's release withdraws).
//!
//! ```text
//!  PutRecord / GetRecord / Provide / FindProviders ─► Kademlia (one query each)
//!  AdvertiseService ─► count 0 → 1 ─► Command::Announce(service key)
//!  WithdrawService / session end ─► count 1 → 0 ─► Command::StopProviding
//!  FindService ─► this node's own advertisements + the DHT's providers
//! ```

use libp2p::{PeerId, kad};
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::timeout_of;
use crate::api::apps::Principal;
use crate::api::session::{Session, ok};
use crate::api::{ApiError, ApiService};
use crate::node::{Command, service_key};

/// Largest DHT key.
const MAX_KEY_BYTES: usize = 1024;
/// Largest DHT value: Kademlia messages are capped at 16 KiB by default, and a
/// record travels with its key and publisher.
const MAX_VALUE_BYTES: usize = 8 << 10;
/// Most providers returned by one lookup.
const MAX_PROVIDERS: usize = 100;

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
        .ctx
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

/// Runs one of this domain's stateless operations.
pub(in crate::api) async fn run(svc: &ApiService, _who: &Principal, op: Op) -> Result<R, ApiError> {
    let node = &svc.inner.ctx.node;
    match op {
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
        // The dispatcher routes only this domain's operations here.
        _ => Err(super::routed_wrongly()),
    }
}

impl Session {
    pub(in crate::api) async fn advertise(
        &mut self,
        name: String,
    ) -> Result<pb::response::Result, ApiError> {
        validate_service_name(&name)?;
        if self.services.contains(&name) {
            return Err(ApiError::new(
                pb::ErrorCode::AlreadyExists,
                "already advertised",
            ));
        }
        // The provider record is stored locally at once and announced to the
        // DHT in the background; waiting for that (up to the query timeout)
        // would stall this session and every other advertiser.
        let node = &self.svc.inner.ctx.node;
        let announce = Command::Announce(service_key(&name));
        let first = async { node.send(announce).await.map_err(ApiError::from) };
        Session::acquire(&self.svc.inner.services, &name, first).await?;
        self.services.insert(name);
        self.sync_state();
        ok()
    }

    pub(in crate::api) async fn withdraw(
        &mut self,
        name: &str,
    ) -> Result<pb::response::Result, ApiError> {
        if !self.services.remove(name) {
            return Err(ApiError::new(
                pb::ErrorCode::NotFound,
                "not advertised by this app",
            ));
        }
        self.release_service(name).await;
        self.sync_state();
        ok()
    }

    pub(in crate::api) async fn release_service(&self, name: &str) {
        let last = Command::StopProviding(service_key(name));
        self.release(&self.svc.inner.services, name, last).await;
    }
}
