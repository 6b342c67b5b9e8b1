//! The events of the node's behaviours: identify, ping, Kademlia, gossipsub,
//! mDNS, AutoNAT, the relay (both sides), DCUtR, UPnP and the punch guard.

use libp2p::kad;
use libp2p::{autonat, dcutr, gossipsub, identify, mdns, ping, relay, upnp};
use tracing::{debug, info, warn};

use super::EventLoop;
use crate::node::behaviour::{BehaviourEvent, KAD_PROTOCOL};
use crate::node::handle::{NodeEvent, PubsubMessage};
use crate::node::punch_guard::Event as PunchEvent;
use crate::node::reach::is_relayed;
use crate::report::chain;

impl EventLoop {
    pub(super) fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        self.record(&event);
        match event {
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                self.agents.insert(peer_id, info.agent_version.clone());
                let direct = self.conns.get(&connection_id).is_some_and(|c| !c.relayed);
                if direct && !is_relayed(&info.observed_addr) {
                    let others = self
                        .conns
                        .iter()
                        .any(|(id, c)| c.peer == peer_id && !c.relayed && *id != connection_id);
                    let stale = self
                        .reach
                        .on_observed(peer_id, &info.observed_addr, !others);
                    self.expire_external(stale);
                }
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for addr in &info.listen_addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                } else {
                    // A peer that left the DHT's server role (it learnt it is
                    // private) leaves our routing table: kept, it would be
                    // handed to every lookup, each then dialling its LAN
                    // addresses until QUIC's handshake times out. Twenty
                    // such entries made every lookup outlive its timeout.
                    self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
                }
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    if let Some(addr) = self.relay_addr(&peer_id, &info.listen_addrs) {
                        self.reach.add_candidate(peer_id, addr);
                    }
                } else {
                    self.reach.remove_candidate(&peer_id);
                }
                self.addrs.insert(peer_id, info.listen_addrs);
            }
            BehaviourEvent::Autonat(autonat::v2::client::Event {
                tested_addr,
                server,
                result,
                ..
            }) => {
                match &result {
                    Ok(()) => info!(%tested_addr, %server, "AutoNAT: reachable"),
                    Err(e) => info!(%tested_addr, %server, error = %e, "AutoNAT: not reachable"),
                }
                // A dial-back through a relay says nothing of our own
                // reachability.
                if !is_relayed(&tested_addr) {
                    self.reach.on_probe(result.is_ok());
                }
                self.publish_reach();
                // A node that just learnt it is private asks for relays now,
                // not at the next tick.
                self.look_after_relays();
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                if !renewal {
                    info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                if let Some(listener) = self.reach.on_accepted(relay_peer_id) {
                    debug!(relay = %relay_peer_id, "public now: dropping the reservation");
                    self.swarm.remove_listener(listener);
                }
                self.publish_reach();
            }
            // The bandwidth cap admitted it, the relay did not: its share
            // is free again.
            BehaviourEvent::Relay(relay::Event::CircuitReqDenied {
                src_peer_id,
                status: relay::StatusCode::NoReservation,
                ..
            }) => self.relay_budget.refund(src_peer_id),
            BehaviourEvent::Relay(relay::Event::CircuitReqAccepted { src_peer_id, .. }) => {
                self.relay_budget.accepted(src_peer_id)
            }
            // Admitted, then the destination could not be reached: nothing
            // was relayed. (libp2p marks these events for removal; their
            // replacement is a log line.)
            #[allow(deprecated)]
            BehaviourEvent::Relay(
                relay::Event::CircuitReqOutboundConnectFailed { src_peer_id, .. }
                | relay::Event::CircuitReqAcceptFailed { src_peer_id, .. },
            ) => self.relay_budget.refund(src_peer_id),
            // The relay's own budget is spent: nothing the asker did.
            BehaviourEvent::Relay(relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status: relay::StatusCode::ResourceLimitExceeded,
            }) if self.relay_budget.took_refusal(src_peer_id) => {
                warn!(
                    src = %src_peer_id,
                    dst = %dst_peer_id,
                    "circuit refused: the relay's bandwidth cap for the hour is spent (relay.max_bytes_per_hour)"
                );
            }
            // Over the operator's limits (not, say, a circuit to a peer that
            // holds no reservation, which an honest dialler may ask for).
            BehaviourEvent::Relay(
                relay::Event::ReservationReqDenied {
                    src_peer_id,
                    status: relay::StatusCode::ResourceLimitExceeded,
                }
                | relay::Event::CircuitReqDenied {
                    src_peer_id,
                    status: relay::StatusCode::ResourceLimitExceeded,
                    ..
                },
            ) => {
                debug!(peer = %src_peer_id, "relay request over the limits refused");
                self.emit(NodeEvent::OverLimits {
                    peer_id: src_peer_id,
                });
            }
            BehaviourEvent::RelayClient(relay::client::Event::OutboundCircuitEstablished {
                relay_peer_id,
                limit,
            }) => {
                // Kept by relay: a relayed connection's address names it.
                self.circuit_limit(relay_peer_id, limit.and_then(|l| l.data_in_bytes()));
            }
            BehaviourEvent::RelayClient(relay::client::Event::InboundCircuitEstablished {
                src_peer_id,
                limit,
            }) => {
                // Kept by the peer at the other end: which relay carries an
                // inbound circuit is not said.
                self.circuit_limit(src_peer_id, limit.and_then(|l| l.data_in_bytes()));
            }
            BehaviourEvent::Dcutr(PunchEvent::Flood { peer, why }) => {
                warn!(%peer, why, "hole-punch flood: no hole punching with this peer for 10 minutes");
                self.emit(NodeEvent::OverLimits { peer_id: peer });
            }
            BehaviourEvent::Dcutr(PunchEvent::Punch(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(direct) => {
                    info!(peer = %remote_peer_id, "hole punched: direct connection");
                    // Everything moves to the direct connection: streams pick
                    // any open connection, and a relayed one is slow and
                    // limited by the relay's operator.
                    let relayed: Vec<_> = self
                        .conns
                        .iter()
                        .filter(|(id, c)| c.peer == remote_peer_id && c.relayed && **id != direct)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in relayed {
                        self.swarm.close_connection(id);
                    }
                }
                Err(e) => {
                    info!(peer = %remote_peer_id, error = %chain(&e), "hole punch failed; staying relayed")
                }
            },
            BehaviourEvent::Upnp(event) => match event {
                upnp::Event::NewExternalAddr {
                    external_addr,
                    local_addr,
                } => {
                    info!(%external_addr, %local_addr, "router mapped a port (UPnP)");
                    self.mapped.insert(local_addr);
                }
                upnp::Event::ExpiredExternalAddr {
                    external_addr,
                    local_addr,
                } => {
                    info!(%external_addr, "router port mapping expired (UPnP)");
                    self.mapped.remove(&local_addr);
                }
                upnp::Event::GatewayNotFound => debug!("no UPnP gateway"),
                upnp::Event::NonRoutableGateway => {
                    info!("the UPnP gateway is itself behind a NAT; its mappings are of no use")
                }
            },
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.rtts.insert(peer, rtt);
            }
            BehaviourEvent::Ping(ping::Event {
                result: Err(ping::Failure::Unsupported),
                ..
            }) => {}
            // Two pings in a row went unanswered (libp2p reports from the
            // second): the connection is dead, as a TCP connection through a
            // router that lost its address stays for many minutes otherwise
            // (rust-yamux, unlike Go's, has no keep-alive of its own).
            // Closing it lets streams, the DHT and relays use a live one.
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            }) => {
                info!(%peer, error = %chain(&e), "peer stopped answering pings: closing the connection");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.emit(NodeEvent::Pubsub(PubsubMessage {
                    topic: message.topic.into_string(),
                    data: message.data.into(),
                    source: message.source,
                    via: propagation_source,
                    message_id: message_id.0,
                }));
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => self.on_query(id, result, step.last),
            _ => {}
        }
    }
}
