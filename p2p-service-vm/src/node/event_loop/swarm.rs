//! The swarm's own events: listeners, connections opened and closed, dials
//! that failed, addresses confirmed or expired.

use std::sync::Arc;
use std::time::Instant;

use libp2p::metrics::Recorder;
use libp2p::swarm::SwarmEvent;
use tracing::{debug, info};

use super::{Conn, EventLoop};
use crate::node::behaviour::BehaviourEvent;
use crate::node::handle::{Cause, NodeError, NodeEvent};
use crate::node::reach::{ip_of, is_local};

impl EventLoop {
    pub(super) fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        // Not address candidates: libp2p-metrics labels them by protocol
        // stack, and a peer chooses what it says it observed (one new label
        // per connection, for ever).
        if !matches!(
            event,
            SwarmEvent::NewExternalAddrCandidate { .. }
                | SwarmEvent::ExternalAddrConfirmed { .. }
                | SwarmEvent::ExternalAddrExpired { .. }
        ) {
            self.metrics.record(&event);
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.publish_status();
                self.emit(NodeEvent::NewListenAddr(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                info!(%address, "no longer listening");
                self.publish_status();
                let stale = self.reach.on_listen_expired(&address);
                self.expire_external(stale);
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                if let Some(relay) = self.reach.on_listener_closed(listener_id, Instant::now()) {
                    info!(%relay, "relay reservation ended");
                    self.publish_status();
                    self.publish_reach();
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } if !self.names_its_relay(&address) => {
                // Identify turns a peer's view of our relayed address into a
                // candidate on our own IP ("our IP/p2p/relay/p2p-circuit"),
                // which AutoNAT may then confirm: no relay is there.
                debug!(%address, "not a relay's address: not advertised");
                self.swarm.remove_external_address(&address);
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed");
                self.reach.on_confirmed(address);
                self.publish_reach();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                info!(%address, "external address expired");
                self.reach.on_expired(&address);
                self.publish_reach();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.dial_attempts.retain(|_, p| *p != peer_id);
                let remote = endpoint.get_remote_address().clone();
                let mapped = match &endpoint {
                    libp2p::core::ConnectedPoint::Listener { local_addr, .. } => {
                        !endpoint.is_relayed()
                            && self.mapped.contains(local_addr)
                            && ip_of(&remote).is_some_and(|ip| !is_local(ip))
                    }
                    libp2p::core::ConnectedPoint::Dialer { .. } => false,
                };
                self.conns.insert(
                    connection_id,
                    Conn {
                        peer: peer_id,
                        relayed: endpoint.is_relayed(),
                        mapped,
                        outbound: endpoint.is_dialer(),
                        remote,
                    },
                );
                for reply in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(peer_id));
                }
                self.redial.on_connected(&peer_id);
                self.on_path(peer_id, &endpoint);
                if num_established.get() == 1 {
                    debug!(%peer_id, "peer connected");
                    self.publish_status();
                    self.emit(NodeEvent::PeerConnected {
                        peer_id,
                        addr: endpoint.get_remote_address().clone(),
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.conns.remove(&connection_id);
                if num_established > 0 {
                    return;
                }
                debug!(%peer_id, "peer disconnected");
                self.publish_status();
                self.rtts.remove(&peer_id);
                self.addrs.remove(&peer_id);
                self.agents.remove(&peer_id);
                self.reach.remove_candidate(&peer_id);
                self.redial.on_disconnected(&peer_id, Instant::now());
                self.repunch.forget(&peer_id);
                self.emit(NodeEvent::PeerDisconnected { peer_id });
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                let Some(peer_id) = self.dial_attempts.remove(&connection_id) else {
                    return;
                };
                let ours_pending = self.dial_attempts.values().any(|p| *p == peer_id);
                if !ours_pending && !self.swarm.is_connected(&peer_id) {
                    let error: Cause = Arc::new(error);
                    for reply in self.dials.remove(&peer_id).unwrap_or_default() {
                        let _ = reply.send(Err(NodeError::Dial(error.clone())));
                    }
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }
}
