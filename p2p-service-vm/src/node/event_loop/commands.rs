//! What the node does for its handle's commands (`Command`): each answered
//! on its oneshot, now or once the swarm reports the outcome.

use std::sync::Arc;
use std::time::Instant;

use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, gossipsub};
use tracing::warn;

use super::{EventLoop, FindState, Finding, PendingQuery, Reply};
use crate::node::behaviour::{MAX_PUBSUB_BYTES, peer_record_key};
use crate::node::handle::{Command, NodeError};

impl EventLoop {
    pub(super) fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Peers(reply) => {
                let peers = self
                    .swarm
                    .connected_peers()
                    .copied()
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|p| self.summary(p, Vec::new()))
                    .collect();
                let _ = reply.send(Ok(peers));
            }
            Command::Connect { peer, addrs, reply } => self.connect(peer, addrs, reply),
            Command::Paths(peer, reply) => {
                let _ = reply.send(Ok(self.paths(&peer)));
            }
            Command::RemoteAddr(peer, reply) => {
                let _ = reply.send(Ok(self.direct_remote(&peer)));
            }
            Command::Disconnect(peer, reply) => {
                self.redial.hold(&peer, Instant::now());
                let r = self
                    .swarm
                    .disconnect_peer_id(peer)
                    .map_err(|_| NodeError::NotFound);
                let _ = reply.send(r);
            }
            Command::FindPeer(target, reply) => {
                if self.swarm.is_connected(&target) {
                    let _ = reply.send(Ok(self.summary(target, Vec::new())));
                } else {
                    let finding = Finding::new(std::sync::Mutex::new(FindState {
                        reply: Some(reply),
                        ..FindState::default()
                    }));
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    let closest = kad.get_closest_peers(target);
                    let record = kad.get_record(peer_record_key(&target));
                    self.queries.insert(
                        closest,
                        PendingQuery::FindPeer {
                            target,
                            finding: finding.clone(),
                        },
                    );
                    self.queries
                        .insert(record, PendingQuery::PeerRecord { target, finding });
                }
            }
            Command::PutRecord(record, reply) => {
                match self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .put_record(record, kad::Quorum::One)
                {
                    Ok(id) => {
                        self.queries.insert(id, PendingQuery::PutRecord(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Dht(Arc::new(e))));
                    }
                }
            }
            Command::GetRecord(key, reply) => {
                let id = self.swarm.behaviour_mut().kad.get_record(key);
                self.queries.insert(id, PendingQuery::GetRecord(reply));
            }
            Command::Provide(key, reply) => {
                match self.swarm.behaviour_mut().kad.start_providing(key) {
                    Ok(id) => {
                        self.queries.insert(id, PendingQuery::Provide(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Dht(Arc::new(e))));
                    }
                }
            }
            Command::Announce(key) => {
                if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                    warn!(error = ?e, "cannot store provider record");
                }
            }
            Command::StopProviding(key) => self.swarm.behaviour_mut().kad.stop_providing(&key),
            Command::FindProviders { key, limit, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.queries.insert(
                    id,
                    PendingQuery::Providers {
                        found: Vec::new(),
                        limit: limit.max(1),
                        reply,
                    },
                );
            }
            Command::Subscribe(topic, reply) => {
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&gossipsub::IdentTopic::new(topic))
                    .map(|_| ())
                    .map_err(|e| NodeError::Pubsub(Arc::new(e)));
                let _ = reply.send(r);
            }
            Command::Unsubscribe(topic) => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .unsubscribe(&gossipsub::IdentTopic::new(topic));
            }
            Command::Publish(topic, data, reply) => {
                let r = if data.len() > MAX_PUBSUB_BYTES {
                    Err(NodeError::Invalid(format!(
                        "pubsub message of {} bytes exceeds {MAX_PUBSUB_BYTES}",
                        data.len()
                    )))
                } else {
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(gossipsub::IdentTopic::new(topic), data.to_vec())
                        .map(|_| ())
                        .map_err(|e| match e {
                            gossipsub::PublishError::AllQueuesFull(n) => NodeError::Busy(format!(
                                "the send queues of all {n} peers are full; retry shortly"
                            )),
                            gossipsub::PublishError::NoPeersSubscribedToTopic => {
                                NodeError::NoSubscribers
                            }
                            e => NodeError::Pubsub(Arc::new(e)),
                        })
                };
                let _ = reply.send(r);
            }
            Command::TopicPeers(topic, reply) => {
                let hash = gossipsub::IdentTopic::new(topic).hash();
                let peers = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&hash))
                    .map(|(p, _)| *p)
                    .collect();
                let _ = reply.send(Ok(peers));
            }
        }
    }

    pub(super) fn connect(
        &mut self,
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
        reply: Reply<PeerId>,
    ) {
        let peer = peer.or_else(|| {
            addrs.iter().find_map(|a| match a.iter().last() {
                Some(Protocol::P2p(p)) => Some(p),
                _ => None,
            })
        });
        let Some(peer) = peer else {
            let _ = reply.send(Err(NodeError::Invalid(
                "a peer id is needed (as peer_id or a /p2p/ suffix)".into(),
            )));
            return;
        };
        if peer == *self.swarm.local_peer_id() {
            let _ = reply.send(Err(NodeError::Invalid("cannot connect to self".into())));
            return;
        }
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(peer));
            return;
        }
        // Always dial ourselves, even when another dial to the peer is under way:
        // that one may be trying stale addresses while the caller knows fresh ones.
        // Our attempts are tracked by connection id, so a failure of someone
        // else's dial does not fail this request.
        let opts = DialOpts::peer_id(peer)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .addresses(addrs)
            .build();
        let connection = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dial_attempts.insert(connection, peer);
                self.dials.entry(peer).or_default().push(reply);
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::Dial(Arc::new(e))));
            }
        }
    }
}
