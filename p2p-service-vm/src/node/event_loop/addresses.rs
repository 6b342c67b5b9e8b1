//! What the node says of where it can be reached, and keeps true: the
//! reachability it publishes, its signed peer record, relay reservations,
//! bootstrap redials, hole punches tried again, stale external addresses.

use std::time::Instant;

use libp2p::kad;
use libp2p::{Multiaddr, PeerId};
use tracing::{debug, info, warn};

use super::{EventLoop, PendingQuery, RELAY_SEARCH_EVERY};
use crate::node::behaviour::{peer_record_key, relay_key};
use crate::node::handle::ReachStatus;
use crate::node::reach::{
    Reachability, ip_of, is_loopback, is_relayed, relay_of, signed_peer_record,
};
use crate::report::chain;

impl EventLoop {
    /// Publishes reachability for node info, and acts on a change: a public
    /// node serving as a relay says so in the DHT; one no longer private
    /// drops its reservations.
    pub(super) fn publish_reach(&mut self) {
        *self.status.reach.write().expect("lock") = ReachStatus {
            reachability: self.reach.reachability(),
            external: self.reach.external(),
            relayed: self.reach.relayed(),
            relays: self.reach.relays(),
        };
        let public = self.reach.reachability() == Reachability::Public;
        if public && self.serve_relay && !self.relay_announced {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(relay_key()) {
                warn!(error = ?e, "cannot announce this node as a relay");
            } else {
                info!("publicly reachable: serving as a relay");
                self.relay_announced = true;
            }
        }
        for listener in self.reach.surplus() {
            self.swarm.remove_listener(listener);
        }
        // A private node is no DHT server: peers would have to reach it
        // through relays for every query (a storm of circuits once many
        // private nodes share a relay). It is found by its signed peer
        // record instead, which names its relayed addresses.
        let private = self.reach.reachability() == Reachability::Private;
        if private != self.kad_client {
            self.kad_client = private;
            let mode = if private {
                kad::Mode::Client
            } else {
                kad::Mode::Server
            };
            info!(?mode, "DHT mode");
            self.swarm.behaviour_mut().kad.set_mode(Some(mode));
        }
        let relayed = self.reach.relayed();
        if private && !relayed.is_empty() && relayed != self.published_record {
            self.put_peer_record(relayed);
        }
    }

    /// Puts our signed peer record (relayed addresses) in the DHT.
    pub(super) fn put_peer_record(&mut self, addrs: Vec<Multiaddr>) {
        let Some(value) = signed_peer_record(&self.keypair, addrs.clone()) else {
            return;
        };
        let key = peer_record_key(self.swarm.local_peer_id());
        let record = kad::Record::new(key, value);
        match self
            .swarm
            .behaviour_mut()
            .kad
            .put_record(record, kad::Quorum::One)
        {
            Ok(id) => {
                self.published_record = addrs;
                self.queries.insert(id, PendingQuery::PutPeerRecord);
            }
            Err(e) => warn!(error = ?e, "cannot store our peer record"),
        }
    }

    /// Keeps a private node's reservations: asks new relays for them, and the
    /// DHT for relays when it knows too few.
    pub(super) fn look_after_relays(&mut self) {
        let now = Instant::now();
        // Our peer record, again if the last put failed.
        let relayed = self.reach.relayed();
        if self.kad_client && !relayed.is_empty() && relayed != self.published_record {
            self.put_peer_record(relayed);
        }
        for (relay, circuit) in self.reach.relays_to_ask(now) {
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    debug!(%relay, %circuit, "asking for a relay reservation");
                    self.reach.reserving(relay, listener);
                }
                Err(e) => warn!(%relay, %circuit, error = ?e, "cannot listen through relay"),
            }
        }
        let short =
            self.reach.reachability() == Reachability::Private && !self.reach.has_candidates();
        let searched_lately = self
            .last_relay_search
            .is_some_and(|t| now.duration_since(t) < RELAY_SEARCH_EVERY);
        if short && !searched_lately {
            self.last_relay_search = Some(now);
            let id = self.swarm.behaviour_mut().kad.get_providers(relay_key());
            self.queries.insert(id, PendingQuery::Relays);
        }
    }

    /// Dials the bootstrap peers again when the node has too few peers: how
    /// it gets back on the network after its line went down.
    pub(super) fn redial_bootstrap(&mut self) {
        let swarm = &self.swarm;
        let connected = swarm.connected_peers().count();
        let due = self
            .redial
            .due(connected, |p| swarm.is_connected(p), Instant::now());
        for addr in due {
            info!(%addr, connected, "few peers: dialling a bootstrap peer again");
            if let Err(e) = self.swarm.dial(addr.clone()) {
                debug!(%addr, error = %chain(&e), "bootstrap redial failed");
            }
        }
    }

    /// Keeps [`Repunch`] told which peers we reach only through a relay we
    /// dialled.
    pub(super) fn on_path(&mut self, peer: PeerId, endpoint: &libp2p::core::ConnectedPoint) {
        if !endpoint.is_relayed() {
            self.repunch.forget(&peer);
            return;
        }
        let direct = self.has_direct(&peer);
        if endpoint.is_dialer() && !direct && self.swarm.behaviour().dcutr.is_enabled() {
            let addr = endpoint.get_remote_address().clone();
            self.repunch.on_relayed_dialled(peer, addr, Instant::now());
        }
    }

    /// Dials again, through the relay, peers that a hole punch has not yet
    /// reached directly: a new relayed connection starts a new punch.
    pub(super) fn punch_again(&mut self) {
        let (conns, limit) = (&self.conns, self.per_peer_limit);
        // Room for one more relayed connection and the direct one.
        let room = |peer: &PeerId| conns.values().filter(|c| c.peer == *peer).count() + 2 <= limit;
        for (peer, addr) in self.repunch.due(Instant::now(), room) {
            if self.has_direct(&peer) || !self.swarm.is_connected(&peer) {
                self.repunch.forget(&peer);
                continue;
            }
            info!(%peer, %addr, "no direct connection yet: punching again through the relay");
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(vec![addr])
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %chain(&e), "relayed redial for a punch failed");
            }
        }
    }

    /// Stops advertising addresses that no longer reach us (our address
    /// moved).
    pub(super) fn expire_external(&mut self, stale: Vec<Multiaddr>) {
        if stale.is_empty() {
            return;
        }
        for addr in stale {
            info!(%addr, "our address moved: no longer advertising it");
            self.swarm.remove_external_address(&addr);
            self.reach.on_expired(&addr);
        }
        self.publish_reach();
    }

    /// Whether a confirmed address, if relayed, starts with an address its
    /// relay is known at (its announced listen addresses, or where we
    /// dialled it).
    pub(super) fn names_its_relay(&self, addr: &Multiaddr) -> bool {
        if !is_relayed(addr) {
            return true;
        }
        let (Some(relay), Some(ip)) = (relay_of(addr), ip_of(addr)) else {
            return false;
        };
        let announced = self.addrs.get(&relay).into_iter().flatten();
        let dialled = self
            .conns
            .values()
            .filter(|c| c.peer == relay && !c.relayed);
        announced
            .chain(dialled.map(|c| &c.remote))
            .any(|a| ip_of(a) == Some(ip))
    }

    /// Where a relay candidate is dialled: the address of our own direct
    /// outbound connection to it if there is one (it worked), else the first
    /// routable address it announced.
    pub(super) fn relay_addr(&self, peer: &PeerId, announced: &[Multiaddr]) -> Option<Multiaddr> {
        let dialled = self
            .conns
            .values()
            .find(|c| c.peer == *peer && c.outbound && !c.relayed)
            .map(|c| c.remote.clone());
        dialled.or_else(|| {
            announced
                .iter()
                .find(|a| !is_relayed(a) && !is_loopback(a))
                .cloned()
        })
    }
}
