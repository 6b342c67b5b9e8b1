//! Kademlia's query results, routed to the command that started each query;
//! find-peer's answer once either of its two lookups settles it.

use std::collections::HashSet;
use std::sync::Arc;

use libp2p::kad::{self, QueryId, QueryResult};
use libp2p::{Multiaddr, PeerId};
use tracing::{debug, warn};

use super::{EventLoop, FindState, PROVIDERS_KEPT, PendingQuery};
use crate::node::handle::NodeError;
use crate::node::reach::{addrs_from_record, is_relayed};
use crate::report::chain;

impl EventLoop {
    /// Answers a find-peer request once (the other lookup may still end).
    pub(super) fn answer(&self, f: &mut FindState, target: PeerId, addrs: Vec<Multiaddr>) {
        let Some(reply) = f.reply.take() else {
            return;
        };
        let r = if addrs.is_empty() && !self.swarm.is_connected(&target) {
            Err(NodeError::NotFound)
        } else {
            Ok(self.summary(target, addrs))
        };
        let _ = reply.send(r);
    }

    pub(super) fn on_query(&mut self, id: QueryId, result: QueryResult, last: bool) {
        let Some(pending) = self.queries.remove(&id) else {
            return;
        };
        match (pending, result) {
            (PendingQuery::GetRecord(reply), QueryResult::GetRecord(r)) => match r {
                Ok(kad::GetRecordOk::FoundRecord(found)) => {
                    let _ = reply.send(Ok(found.record));
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                }
                Ok(kad::GetRecordOk::FinishedWithNoAdditionalRecord { .. }) => {
                    let _ = reply.send(Err(NodeError::NotFound));
                }
                Err(kad::GetRecordError::Timeout { .. }) => {
                    let _ = reply.send(Err(NodeError::Timeout));
                }
                Err(_) => {
                    let _ = reply.send(Err(NodeError::NotFound));
                }
            },
            (PendingQuery::PutPeerRecord, QueryResult::PutRecord(r)) => {
                if let Err(e) = r {
                    // Put again at the next relay tick.
                    debug!(error = %chain(&e), "our peer record did not reach the DHT");
                    self.published_record.clear();
                }
            }
            (PendingQuery::PutRecord(reply), QueryResult::PutRecord(r)) => {
                let _ = reply.send(r.map(|_| ()).map_err(|e| NodeError::Dht(Arc::new(e))));
            }
            (PendingQuery::Provide(reply), QueryResult::StartProviding(r)) => {
                let _ = reply.send(r.map(|_| ()).map_err(|e| NodeError::Dht(Arc::new(e))));
            }
            (
                PendingQuery::Providers {
                    mut found,
                    limit,
                    reply,
                },
                QueryResult::GetProviders(r),
            ) => {
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r {
                    let known: HashSet<_> = found.iter().copied().collect();
                    found.extend(providers.into_iter().filter(|p| !known.contains(p)));
                }
                if found.len() >= limit || last {
                    // Everything found so far goes back, not just `limit`: one
                    // DHT answer often names several providers at once, and the
                    // caller ranks them (by credit) before it picks.
                    found.truncate(limit.max(PROVIDERS_KEPT));
                    let _ = reply.send(Ok(found));
                    if !last && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                } else {
                    self.queries.insert(
                        id,
                        PendingQuery::Providers {
                            found,
                            limit,
                            reply,
                        },
                    );
                }
            }
            (PendingQuery::Relays, QueryResult::GetProviders(r)) => {
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r {
                    let me = *self.swarm.local_peer_id();
                    for relay in providers.into_iter().filter(|p| *p != me) {
                        // Identify on the new connection tells whether it
                        // serves the hop protocol; dialling by id lets the
                        // DHT supply its addresses.
                        if !self.swarm.is_connected(&relay) {
                            let _ = self.swarm.dial(relay);
                        }
                    }
                }
                if !last {
                    self.queries.insert(id, PendingQuery::Relays);
                }
            }
            (PendingQuery::FindPeer { target, finding }, QueryResult::GetClosestPeers(r)) => {
                let peers = match r {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let addrs = peers
                    .into_iter()
                    .find(|p| p.peer_id == target)
                    .map(|h| h.addrs)
                    .unwrap_or_default();
                let mut f = finding.lock().expect("lock");
                let settled =
                    self.swarm.is_connected(&target) || addrs.iter().any(is_relayed) || f.no_record;
                if settled {
                    self.answer(&mut f, target, addrs);
                } else {
                    f.closest = Some(addrs);
                }
            }
            (PendingQuery::PeerRecord { target, finding }, QueryResult::GetRecord(r)) => {
                let record = match &r {
                    Ok(kad::GetRecordOk::FoundRecord(found)) => {
                        addrs_from_record(&found.record.value, &target)
                    }
                    _ => None,
                };
                let mut f = finding.lock().expect("lock");
                match record {
                    Some(addrs) => {
                        for a in &addrs {
                            self.swarm.add_peer_address(target, a.clone());
                        }
                        let mut all = addrs.clone();
                        let known = f.closest.take().unwrap_or_default();
                        all.extend(known.into_iter().filter(|a| !addrs.contains(a)));
                        self.answer(&mut f, target, all);
                        if !last && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
                        {
                            q.finish();
                        }
                    }
                    // Not the peer's own record (anyone may store one under
                    // its key): keep looking while the query runs.
                    None if !last && f.reply.is_some() => {
                        drop(f);
                        self.queries
                            .insert(id, PendingQuery::PeerRecord { target, finding });
                    }
                    None => {
                        f.no_record = true;
                        if let Some(known) = f.closest.take() {
                            self.answer(&mut f, target, known);
                        }
                    }
                }
            }
            (pending, other) => {
                // A query id is only ever paired with its own result type.
                warn!(?other, "unexpected DHT query result");
                drop(pending);
            }
        }
    }
}
