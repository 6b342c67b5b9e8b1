//! libp2p's hole punching (DCUtR) with a bound on what one peer can make us
//! do, and a charge for asking more.
//!
//! Each hole punch has this node dial addresses the other peer chose, so a
//! peer that asks for punch after punch turns the node into its dialler
//! (against whatever addresses it names). libp2p bounds one relayed
//! connection to three attempts on the side that starts them, but not the
//! number of relayed connections a peer opens to us, each of which starts
//! a punch, nor the punch requests a peer sends on a connection we opened.
//! This wrapper counts both:
//!
//! - relayed connections a peer opens to us: more than
//!   [`INBOUND_PER_WINDOW`] in a minute;
//! - punch requests a peer sends on one relayed connection: more than
//!   libp2p's own three attempts.
//!
//! A peer over either is held off hole punching for [`HOLD`] (its relayed
//! connections stay, within the relay's limits, but no punch is started or
//! answered), and the event loop charges it once per hold.
//!
//! It also widens the addresses DCUtR offers the other side. DCUtR offers
//! only what peers observed of us, one transport at a time: a node that,
//! after its router's address changed, had been seen again only over QUIC
//! offered its new QUIC address and its old TCP one, while the other side,
//! seen only over TCP, offered TCP; the two dialled past each other and
//! every punch failed. Routers that keep a connection's source port (Linux
//! masquerade, most home routers) map each of our listen ports to the same
//! port at the address a peer saw, so that address with each of our other
//! listen ports is offered too (libp2p translates only within one
//! transport). A wrong guess costs one failed dial in a punch.

use std::collections::{HashMap, VecDeque};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use either::Either;
use libp2p::core::Endpoint;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NewExternalAddrCandidate,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId, dcutr};

/// Relayed connections one peer may open to us in [`WINDOW`] and have a
/// hole punch started for each. An honest peer opens one per meeting, and
/// a few more when a punch failed or a connection broke.
pub const INBOUND_PER_WINDOW: usize = 8;
/// The window relayed connections are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Punch requests a peer may send on one relayed connection we opened: the
/// attempts libp2p's DCUtR itself makes on one connection.
pub const REQUESTS_PER_CONNECTION: u8 = 3;
/// How long a flooding peer is held off hole punching.
pub const HOLD: Duration = Duration::from_secs(600);
/// Peers remembered before the stale ones are forgotten: peer ids cost an
/// attacker nothing, so what is kept per peer must not outlive its window.
const PRUNE_AT: usize = 1024;
/// The least time between two scans for stale peers.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// What the guard reports.
#[derive(Debug)]
pub enum Event {
    /// DCUtR's own outcome of a punch.
    Punch(dcutr::Event),
    /// `peer` asked for more punches than the limits allow and is held off
    /// hole punching for [`HOLD`].
    Flood { peer: PeerId, why: &'static str },
}

/// [`dcutr::Behaviour`] behind the limits above.
pub struct PunchGuard {
    inner: dcutr::Behaviour,
    /// When each peer's relayed connections to us opened, in the window.
    inbound: HashMap<PeerId, VecDeque<Instant>>,
    /// Punch requests on each relayed connection we opened (and only those).
    requests: HashMap<ConnectionId, u8>,
    /// Peers held off, until when.
    held: HashMap<PeerId, Instant>,
    queued: VecDeque<ToSwarm<Event, THandlerInEvent<dcutr::Behaviour>>>,
    /// When stale peers were last forgotten.
    pruned: Option<Instant>,
    /// Our own (not relayed) listen addresses.
    listening: Vec<Multiaddr>,
}

impl PunchGuard {
    pub fn new(inner: dcutr::Behaviour) -> Self {
        Self {
            inner,
            inbound: HashMap::new(),
            requests: HashMap::new(),
            held: HashMap::new(),
            queued: VecDeque::new(),
            pruned: None,
            listening: Vec::new(),
        }
    }

    fn is_held(&mut self, peer: PeerId, now: Instant) -> bool {
        match self.held.get(&peer) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.held.remove(&peer);
                false
            }
            None => false,
        }
    }

    fn hold(&mut self, peer: PeerId, now: Instant, why: &'static str) {
        if self.is_held(peer, now) {
            return;
        }
        self.held.insert(peer, now + HOLD);
        self.queued
            .push_back(ToSwarm::GenerateEvent(Event::Flood { peer, why }));
    }

    /// Forgets peers whose window and hold are over (a scan, so at most
    /// every [`PRUNE_EVERY`]).
    fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|t| now.saturating_duration_since(t) < PRUNE_EVERY)
        {
            return;
        }
        if self.inbound.len() > PRUNE_AT || self.held.len() > PRUNE_AT {
            self.pruned = Some(now);
        }
        if self.inbound.len() > PRUNE_AT {
            self.inbound.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < WINDOW)
            });
        }
        if self.held.len() > PRUNE_AT {
            self.held.retain(|_, until| *until > now);
        }
    }

    /// Whether a relayed connection `peer` opened to us gets a punch.
    fn admit_inbound(&mut self, peer: PeerId, now: Instant) -> bool {
        self.prune(now);
        if self.is_held(peer, now) {
            return false;
        }
        let times = self.inbound.entry(peer).or_default();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
        {
            times.pop_front();
        }
        times.push_back(now);
        if times.len() > INBOUND_PER_WINDOW {
            self.inbound.remove(&peer);
            self.hold(peer, now, "relayed connections opened one after another");
            return false;
        }
        true
    }

    /// Whether a punch request `peer` sent on `connection` (one we opened)
    /// is answered.
    fn admit_request(&mut self, peer: PeerId, connection: ConnectionId, now: Instant) -> bool {
        if self.is_held(peer, now) {
            return false;
        }
        let Some(n) = self.requests.get_mut(&connection) else {
            return true;
        };
        *n = n.saturating_add(1);
        if *n > REQUESTS_PER_CONNECTION {
            self.hold(peer, now, "punch requests repeated on one connection");
            return false;
        }
        true
    }

    /// Peers held off at the moment (for tests and the log).
    #[cfg(test)]
    fn held_peers(&self) -> usize {
        self.held.len()
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// The address a peer saw us at with each of our listen addresses' other
/// transports and ports (see the module's doc), not the observed one
/// itself. Nothing for an observation without an IP address, or of a
/// relayed address (its IP is the relay's, not ours).
fn translations(observed: &Multiaddr, listening: &[Multiaddr]) -> Vec<Multiaddr> {
    if is_relayed(observed) {
        return Vec::new();
    }
    let Some(ip) = observed.iter().next() else {
        return Vec::new();
    };
    if !matches!(ip, Protocol::Ip4(_) | Protocol::Ip6(_)) {
        return Vec::new();
    }
    let without_peer = |a: &Multiaddr| -> Multiaddr {
        a.iter()
            .take_while(|p| !matches!(p, Protocol::P2p(_)))
            .collect()
    };
    let observed = without_peer(observed);
    let mut out: Vec<Multiaddr> = Vec::new();
    for l in listening {
        let mut parts = l.iter();
        let same_family = parts
            .next()
            .is_some_and(|first| std::mem::discriminant(&first) == std::mem::discriminant(&ip));
        if !same_family {
            continue;
        }
        let mut t = Multiaddr::empty().with(ip.clone());
        for p in parts.take_while(|p| !matches!(p, Protocol::P2p(_))) {
            t.push(p);
        }
        if t != observed && !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// What DCUtR is told of one observation of our address, in order: the
/// observation, then its [`translations`]. DCUtR offers its candidates
/// least recently added first (and the swarm dials 8 at a time), so the
/// observation goes in before its guesses. Nothing for one without an IP.
fn offered(observed: &Multiaddr, listening: &[Multiaddr]) -> Vec<Multiaddr> {
    if !has_ip(observed) {
        return Vec::new();
    }
    let mut out = vec![observed.clone()];
    out.extend(translations(observed, listening));
    out
}

/// Whether `addr` names an IP address (and so can be dialled for a punch).
fn has_ip(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::Ip4(_) | Protocol::Ip6(_)))
}

impl NetworkBehaviour for PunchGuard {
    type ConnectionHandler = <dcutr::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // DCUtR tracks relayed connections only through their handlers, so
        // one given no punching handler is simply not known to it.
        if is_relayed(local_addr) && !self.admit_inbound(peer, Instant::now()) {
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(addr) {
            if self.is_held(peer, Instant::now()) {
                return Ok(Either::Right(dummy::ConnectionHandler));
            }
            self.requests.insert(connection_id, 0);
        }
        self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match &event {
            FromSwarm::ConnectionClosed(c) => {
                self.requests.remove(&c.connection_id);
            }
            FromSwarm::NewListenAddr(l)
                if !is_relayed(l.addr) && !self.listening.contains(l.addr) =>
            {
                self.listening.push(l.addr.clone());
            }
            FromSwarm::ExpiredListenAddr(l) => self.listening.retain(|a| a != l.addr),
            FromSwarm::NewExternalAddrCandidate(c) => {
                for addr in &offered(c.addr, &self.listening) {
                    let candidate = NewExternalAddrCandidate { addr };
                    self.inner
                        .on_swarm_event(FromSwarm::NewExternalAddrCandidate(candidate));
                }
                return;
            }
            _ => {}
        }
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        // A relayed connection's handler reports one event per punch
        // exchange. On a connection we opened the other side starts every
        // exchange (DCUtR's listener side does), so each is a request it
        // made of us.
        if event.is_left() && !self.admit_request(peer_id, connection_id, Instant::now()) {
            return;
        }
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some(e) = self.queued.pop_front() {
            return Poll::Ready(e);
        }
        self.inner.poll(cx).map(|e| e.map_out(Event::Punch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> PunchGuard {
        PunchGuard::new(dcutr::Behaviour::new(PeerId::random()))
    }

    fn floods(g: &mut PunchGuard) -> Vec<PeerId> {
        g.queued
            .drain(..)
            .filter_map(|e| match e {
                ToSwarm::GenerateEvent(Event::Flood { peer, .. }) => Some(peer),
                _ => None,
            })
            .collect()
    }

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_observed_address_is_offered_with_each_listen_port() {
        let listening = [
            ma("/ip4/10.2.0.2/tcp/38197"),
            ma("/ip4/10.2.0.2/udp/47063/quic-v1"),
            ma("/ip6/fd00::2/tcp/38197"),
        ];
        // Seen over QUIC at a new address: TCP at that address too, not
        // the observation again, and no IPv6 listen port on an IPv4 one.
        let seen = ma("/ip4/198.19.255.254/udp/47063/quic-v1");
        assert_eq!(
            translations(&seen, &listening),
            vec![ma("/ip4/198.19.255.254/tcp/38197")]
        );
        // A port the router chose for an outgoing connection: our listen
        // ports, which is what a peer must dial.
        let peer = PeerId::random();
        let seen = ma(&format!("/ip4/198.18.0.5/tcp/50111/p2p/{peer}"));
        assert_eq!(
            translations(&seen, &listening),
            vec![
                ma("/ip4/198.18.0.5/tcp/38197"),
                ma("/ip4/198.18.0.5/udp/47063/quic-v1")
            ]
        );
    }

    #[test]
    fn dcutr_is_told_the_observation_then_its_guesses() {
        let listening = [
            ma("/ip4/10.2.0.2/tcp/38197"),
            ma("/ip4/10.2.0.2/udp/47063/quic-v1"),
        ];
        let seen = ma("/ip4/198.19.255.254/udp/47063/quic-v1");
        assert_eq!(
            offered(&seen, &listening),
            vec![seen.clone(), ma("/ip4/198.19.255.254/tcp/38197")]
        );
        let bare = ma(&format!("/p2p/{}", PeerId::random()));
        assert!(offered(&bare, &listening).is_empty());
    }

    #[test]
    fn an_observation_without_an_ip_address_is_not_offered() {
        let listening = [ma("/ip4/10.2.0.2/tcp/38197")];
        let bare = ma(&format!("/p2p/{}", PeerId::random()));
        assert!(translations(&bare, &listening).is_empty());
        assert!(!has_ip(&bare));
        assert!(has_ip(&ma("/ip4/198.18.0.5/tcp/1")));
        let dns = ma("/dns4/example.org/tcp/1");
        assert!(translations(&dns, &listening).is_empty());
        // What identify reports on a connection that came through a relay:
        // the relay's IP, never ours.
        let relayed = ma(&format!(
            "/ip4/198.18.0.3/tcp/4001/p2p/{}/p2p-circuit",
            PeerId::random()
        ));
        assert!(translations(&relayed, &listening).is_empty());
    }

    #[test]
    fn listen_addresses_are_followed() {
        use libp2p::core::transport::ListenerId;
        use libp2p::swarm::{ExpiredListenAddr, NewListenAddr};
        let mut g = guard();
        let (tcp, relayed) = (
            ma("/ip4/10.2.0.2/tcp/38197"),
            ma(&format!(
                "/ip4/198.18.0.3/tcp/4001/p2p/{}/p2p-circuit",
                PeerId::random()
            )),
        );
        let listener_id = ListenerId::next();
        for addr in [&tcp, &relayed] {
            g.on_swarm_event(FromSwarm::NewListenAddr(NewListenAddr {
                listener_id,
                addr,
            }));
        }
        assert_eq!(
            g.listening,
            vec![tcp.clone()],
            "relayed ones are not ours to guess"
        );
        g.on_swarm_event(FromSwarm::ExpiredListenAddr(ExpiredListenAddr {
            listener_id,
            addr: &tcp,
        }));
        assert!(g.listening.is_empty());
    }

    #[test]
    fn relayed_connections_past_the_window_limit_get_no_punch_and_one_charge() {
        let mut g = guard();
        let (flooder, honest) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        for i in 0..INBOUND_PER_WINDOW {
            assert!(g.admit_inbound(flooder, t0 + Duration::from_secs(i as u64)));
        }
        assert!(g.admit_inbound(honest, t0));
        assert!(!g.admit_inbound(flooder, t0 + Duration::from_secs(10)));
        assert!(!g.admit_inbound(flooder, t0 + Duration::from_secs(11)));
        assert_eq!(floods(&mut g), vec![flooder], "charged once per hold");
        assert!(g.admit_inbound(honest, t0 + Duration::from_secs(11)));
        // Held for the whole hold, free after it.
        assert!(!g.admit_inbound(flooder, t0 + HOLD));
        assert!(g.admit_inbound(flooder, t0 + Duration::from_secs(11) + HOLD));
        assert_eq!(g.held_peers(), 0);
    }

    #[test]
    fn peers_past_their_window_are_forgotten() {
        let mut g = guard();
        let t0 = Instant::now();
        for _ in 0..=PRUNE_AT {
            assert!(g.admit_inbound(PeerId::random(), t0));
        }
        assert!(g.inbound.len() > PRUNE_AT);
        // A minute on, the next admission forgets them all.
        assert!(g.admit_inbound(PeerId::random(), t0 + WINDOW));
        assert_eq!(g.inbound.len(), 1);
    }

    #[test]
    fn connections_spread_over_the_window_are_not_a_flood() {
        let mut g = guard();
        let peer = PeerId::random();
        let t0 = Instant::now();
        // One every 10 s: at most six in any minute.
        for i in 0..60 {
            assert!(g.admit_inbound(peer, t0 + Duration::from_secs(10 * i)));
        }
        assert!(floods(&mut g).is_empty());
    }

    #[test]
    fn punch_requests_past_libp2ps_attempts_on_one_connection_are_dropped() {
        let mut g = guard();
        let peer = PeerId::random();
        let (ours, other) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        g.requests.insert(ours, 0);
        g.requests.insert(other, 0);
        let now = Instant::now();
        for _ in 0..REQUESTS_PER_CONNECTION {
            assert!(g.admit_request(peer, ours, now));
        }
        assert!(!g.admit_request(peer, ours, now));
        assert_eq!(floods(&mut g), vec![peer]);
        // Held: its other connections get no answer either.
        assert!(!g.admit_request(peer, other, now));
        // A connection the peer opened (not ours) is not counted here.
        let theirs = ConnectionId::new_unchecked(3);
        assert!(g.admit_request(PeerId::random(), theirs, now));
        assert!(floods(&mut g).is_empty());
    }
}
