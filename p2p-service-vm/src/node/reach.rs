//! Whether peers can reach this node, and the relays it keeps for when they
//! cannot: plain state the event loop feeds with swarm events and asks what
//! to do next. No swarm in here, so the rules are unit-tested.
//!
//! Reachability follows AutoNAT (v2): an address is public once a peer dialled
//! it back; the node is *private* once a dial-back failed and no address is
//! confirmed. A private node holds reservations on `want` relays (peers that
//! offer the circuit relay's hop protocol), replaces one that goes away after
//! a pause, and advertises the relayed addresses the reservations give it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// How long a relay that refused our reservation (or never answered) rests
/// before it is asked again.
pub(crate) const RELAY_BACKOFF: Duration = Duration::from_secs(60);

/// How long a relay whose accepted reservation ended rests: the connection
/// to it broke (our line went down, say), not the relay's will, so it is
/// asked again as soon as we reach it.
pub(crate) const RELAY_RETRY: Duration = Duration::from_secs(5);

/// Peers whose last view of our address is kept, to notice it move.
const OBSERVERS_KEPT: usize = 256;

/// What the node knows about being reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Nothing tested yet.
    #[default]
    Unknown,
    /// A peer dialled one of our addresses back.
    Public,
    /// Dial-backs failed and no address is confirmed: behind a NAT or a
    /// firewall; reached through relays and hole punching.
    Private,
}

impl Reachability {
    /// The word the API and the CLI show.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Public => "public",
            Self::Private => "private",
        }
    }
}

/// Whether a multiaddr goes through a relay.
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The relay a relayed address goes through: the peer named just before
/// its circuit.
pub(crate) fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => last = Some(id),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

/// A private node's relayed addresses as a record for the DHT: libp2p's
/// signed peer record, so that whoever reads it can check that the node
/// itself wrote it (anyone may store a record under any key).
pub(crate) fn signed_peer_record(
    key: &libp2p::identity::Keypair,
    addrs: Vec<Multiaddr>,
) -> Option<Vec<u8>> {
    let record = libp2p::core::PeerRecord::new(key, addrs).ok()?;
    Some(record.into_signed_envelope().into_protobuf_encoding())
}

/// The addresses in a DHT record, if it is `peer`'s own signed peer record;
/// `None` for anything else (garbage, another peer's, a forged signature).
pub(crate) fn addrs_from_record(bytes: &[u8], peer: &PeerId) -> Option<Vec<Multiaddr>> {
    let envelope = libp2p::core::SignedEnvelope::from_protobuf_encoding(bytes).ok()?;
    let record = libp2p::core::PeerRecord::from_signed_envelope(envelope).ok()?;
    (record.peer_id() == *peer).then(|| record.addresses().to_vec())
}

/// The IP address a multiaddr starts with.
pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}

/// Whether an IP is one of a local network's (private, link-local,
/// loopback, carrier-grade NAT's shared space, IPv6 unique local): a peer
/// there did not come in from the internet.
pub(crate) fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let shared = v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64;
            v4.is_private() || v4.is_link_local() || v4.is_loopback() || shared
        }
        IpAddr::V6(v6) => {
            let unique_local = (v6.segments()[0] & 0xfe00) == 0xfc00;
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            v6.is_loopback() || unique_local || link_local
        }
    }
}

/// Whether a multiaddr is on this host's loopback.
pub(crate) fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// The transport a multiaddr names, as the API shows it.
pub fn transport_of(addr: &Multiaddr) -> &'static str {
    let mut t = "other";
    for p in addr.iter() {
        match p {
            // After a circuit, the relay's own transport no longer counts.
            Protocol::P2pCircuit => return "relay",
            Protocol::QuicV1 => t = "quic",
            Protocol::Tcp(_) if t == "other" => t = "tcp",
            _ => {}
        }
    }
    t
}

#[derive(Debug)]
struct Reservation {
    listener: ListenerId,
    accepted: bool,
}

/// Reachability and relay reservations.
#[derive(Debug)]
pub(crate) struct Reach {
    want: usize,
    /// Dial-backs that failed since the last success.
    failed_probes: u32,
    /// Confirmed external addresses, relayed ones included.
    confirmed: Vec<Multiaddr>,
    /// Addresses the operator declared: confirmed whatever peers see.
    declared: Vec<Multiaddr>,
    /// The IP each peer last saw us at (identify's observed address).
    observed: HashMap<PeerId, IpAddr>,
    /// Peers that offer the hop protocol, with an address to reach them.
    candidates: HashMap<PeerId, Multiaddr>,
    reservations: HashMap<PeerId, Reservation>,
    resting: HashMap<PeerId, Instant>,
}

impl Reach {
    /// Keeps `want` reservations while private (0: never uses relays).
    pub(crate) fn new(want: usize) -> Self {
        Self {
            want,
            failed_probes: 0,
            confirmed: Vec::new(),
            declared: Vec::new(),
            observed: HashMap::new(),
            candidates: HashMap::new(),
            reservations: HashMap::new(),
            resting: HashMap::new(),
        }
    }

    pub(crate) fn reachability(&self) -> Reachability {
        if self.confirmed.iter().any(|a| !is_relayed(a)) {
            Reachability::Public
        } else if self.failed_probes > 0 {
            Reachability::Private
        } else {
            Reachability::Unknown
        }
    }

    /// Confirmed addresses that are not relayed.
    pub(crate) fn external(&self) -> Vec<Multiaddr> {
        let direct = self.confirmed.iter().filter(|a| !is_relayed(a));
        direct.cloned().collect()
    }

    /// Confirmed relayed addresses.
    pub(crate) fn relayed(&self) -> Vec<Multiaddr> {
        let relayed = self.confirmed.iter().filter(|a| is_relayed(a));
        relayed.cloned().collect()
    }

    /// An AutoNAT dial-back of `addr` came through (`true`) or not.
    pub(crate) fn on_probe(&mut self, ok: bool) {
        if ok {
            self.failed_probes = 0;
        } else {
            self.failed_probes = self.failed_probes.saturating_add(1);
        }
    }

    pub(crate) fn on_confirmed(&mut self, addr: Multiaddr) {
        if !self.confirmed.contains(&addr) {
            self.confirmed.push(addr);
        }
    }

    pub(crate) fn on_expired(&mut self, addr: &Multiaddr) {
        self.confirmed.retain(|a| a != addr);
    }

    /// The operator vouches for `addr` (config): it never goes stale.
    pub(crate) fn declare(&mut self, addr: Multiaddr) {
        self.declared.push(addr);
    }

    /// Confirmed direct addresses on `ip` that the operator did not declare.
    fn confirmed_on(&self, ip: IpAddr) -> Vec<Multiaddr> {
        let stale = self
            .confirmed
            .iter()
            .filter(|a| !is_relayed(a) && ip_of(a) == Some(ip) && !self.declared.contains(a));
        stale.cloned().collect()
    }

    /// `peer` sees us at `observed` (identify) on a connection that is
    /// `alone` (its only direct one to us). A peer that saw us at another IP
    /// before and now reaches us afresh tells that our address moved (the
    /// router got a new one from its ISP, say): the addresses confirmed on
    /// the old IP are stale and returned, to be expired. A peer holding
    /// other connections may simply reach us by two ways at once (through
    /// a hairpin NAT, or two networks): nothing is concluded. A new address
    /// is confirmed only by a dial-back of its own.
    pub(crate) fn on_observed(
        &mut self,
        peer: PeerId,
        observed: &Multiaddr,
        alone: bool,
    ) -> Vec<Multiaddr> {
        let Some(ip) = ip_of(observed) else {
            return Vec::new();
        };
        if !alone {
            return Vec::new();
        }
        if self.observed.len() >= OBSERVERS_KEPT && !self.observed.contains_key(&peer) {
            // Forget an arbitrary observer: any one still tells a move.
            if let Some(k) = self.observed.keys().next().copied() {
                self.observed.remove(&k);
            }
        }
        match self.observed.insert(peer, ip) {
            Some(old) if old != ip => self.confirmed_on(old),
            _ => Vec::new(),
        }
    }

    /// A listen address went away (the interface lost its address): a
    /// confirmed address on the same IP (a host with no NAT in front) is
    /// stale and returned, to be expired.
    pub(crate) fn on_listen_expired(&self, addr: &Multiaddr) -> Vec<Multiaddr> {
        ip_of(addr).map_or_else(Vec::new, |ip| self.confirmed_on(ip))
    }

    /// `peer` offers the hop protocol and is reached at `addr`.
    pub(crate) fn add_candidate(&mut self, peer: PeerId, addr: Multiaddr) {
        self.candidates.insert(peer, addr);
    }

    /// `peer` no longer offers the hop protocol.
    pub(crate) fn remove_candidate(&mut self, peer: &PeerId) {
        self.candidates.remove(peer);
    }

    pub(crate) fn has_candidates(&self) -> bool {
        !self.candidates.is_empty()
    }

    /// Relays to ask for a reservation now, each as the circuit address to
    /// listen on. The caller records each with [`Self::reserving`].
    pub(crate) fn relays_to_ask(&mut self, now: Instant) -> Vec<(PeerId, Multiaddr)> {
        self.resting.retain(|_, until| *until > now);
        if self.reachability() != Reachability::Private {
            return Vec::new();
        }
        let missing = self.want.saturating_sub(self.reservations.len());
        let mut free: Vec<_> = self
            .candidates
            .iter()
            .filter(|(p, _)| !self.reservations.contains_key(p) && !self.resting.contains_key(p))
            .collect();
        // Stable picks: the same relays across calls, not a shuffle.
        free.sort_by_key(|(p, _)| p.to_bytes());
        free.into_iter()
            .take(missing)
            .map(|(p, a)| {
                // A dialled address may already end in the peer's id.
                let mut circuit = a.clone();
                if matches!(circuit.iter().last(), Some(Protocol::P2p(_))) {
                    circuit.pop();
                }
                let circuit = circuit.with(Protocol::P2p(*p)).with(Protocol::P2pCircuit);
                (*p, circuit)
            })
            .collect()
    }

    pub(crate) fn reserving(&mut self, relay: PeerId, listener: ListenerId) {
        self.reservations.insert(
            relay,
            Reservation {
                listener,
                accepted: false,
            },
        );
    }

    /// The relay accepted (or renewed) our reservation. A node that turned
    /// public meanwhile no longer needs it: its listener is returned, to be
    /// closed now that no request of it is in flight.
    pub(crate) fn on_accepted(&mut self, relay: PeerId) -> Option<ListenerId> {
        if self.reachability() == Reachability::Public {
            return self.reservations.remove(&relay).map(|r| r.listener);
        }
        if let Some(r) = self.reservations.get_mut(&relay) {
            r.accepted = true;
        }
        None
    }

    /// Relays holding an accepted reservation of ours.
    pub(crate) fn relays(&self) -> usize {
        self.reservations.values().filter(|r| r.accepted).count()
    }

    /// A listener closed: if it was a reservation, its relay rests (a
    /// short while if it had accepted: the connection broke) and is returned.
    pub(crate) fn on_listener_closed(
        &mut self,
        listener: ListenerId,
        now: Instant,
    ) -> Option<PeerId> {
        let relay = *self
            .reservations
            .iter()
            .find(|(_, r)| r.listener == listener)?
            .0;
        let accepted = self.reservations.remove(&relay).is_some_and(|r| r.accepted);
        let rest = if accepted { RELAY_RETRY } else { RELAY_BACKOFF };
        self.resting.insert(relay, now + rest);
        Some(relay)
    }

    /// The node turned public: accepted reservations it no longer needs, to
    /// close. One still being asked for is closed once the relay answers
    /// ([`Self::on_accepted`]): libp2p's relay client panics when the answer
    /// to a request comes for a listener already closed.
    pub(crate) fn surplus(&mut self) -> Vec<ListenerId> {
        if self.reachability() != Reachability::Public {
            return Vec::new();
        }
        let done: Vec<PeerId> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.accepted)
            .map(|(p, _)| *p)
            .collect();
        let surplus = done.iter().filter_map(|p| self.reservations.remove(p));
        surplus.map(|r| r.listener).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn reachability_follows_probes_and_confirmed_addresses() {
        let mut r = Reach::new(2);
        assert_eq!(r.reachability(), Reachability::Unknown);
        r.on_probe(false);
        assert_eq!(r.reachability(), Reachability::Private);
        // A relayed address is confirmed by the relay, not by a dial-back:
        // the node stays private.
        let relayed = addr(
            "/ip4/198.18.0.2/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        );
        r.on_confirmed(relayed.clone());
        assert_eq!(r.reachability(), Reachability::Private);
        assert_eq!(r.relayed(), vec![relayed]);
        let public = addr("/ip4/198.18.0.9/tcp/4001");
        r.on_confirmed(public.clone());
        assert_eq!(r.reachability(), Reachability::Public);
        assert_eq!(r.external(), vec![public.clone()]);
        r.on_expired(&public);
        assert_eq!(r.reachability(), Reachability::Private);
    }

    #[test]
    fn a_private_node_reserves_on_wanted_relays_and_replaces_a_lost_one_after_a_rest() {
        let now = Instant::now();
        let mut r = Reach::new(2);
        let relays: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        for (i, p) in relays.iter().enumerate() {
            // Dialled addresses end in the peer's id; announced ones do not.
            let suffix = if i == 0 {
                format!("/p2p/{p}")
            } else {
                String::new()
            };
            r.add_candidate(
                *p,
                addr(&format!("/ip4/198.18.0.{}/tcp/4001{suffix}", i + 2)),
            );
        }
        assert!(
            r.relays_to_ask(now).is_empty(),
            "unknown reachability reserves nothing"
        );
        r.on_probe(false);
        let picks = r.relays_to_ask(now);
        assert_eq!(picks.len(), 2);
        for (i, (p, a)) in picks.iter().enumerate() {
            assert!(is_relayed(a), "{a}");
            let ids = a.iter().filter(|x| matches!(x, Protocol::P2p(_))).count();
            assert_eq!(ids, 1, "{a}");
            assert!(a.iter().any(|x| x == Protocol::P2p(*p)), "{a}");
            r.reserving(*p, ListenerId::next());
            if i == 0 {
                r.on_accepted(*p);
            }
        }
        assert_eq!(r.relays(), 1);
        assert!(
            r.relays_to_ask(now).is_empty(),
            "two reservations are enough"
        );
        // The first relay goes away: the third takes its place, and the lost
        // one is not asked again before its rest ends.
        let lost = picks[0].0;
        let listener = r.reservations[&lost].listener;
        assert_eq!(r.on_listener_closed(listener, now), Some(lost));
        let next = r.relays_to_ask(now);
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].0, lost);
        r.reserving(next[0].0, ListenerId::next());
        let other = picks[1].0;
        let l = r.reservations[&other].listener;
        r.on_listener_closed(l, now);
        assert!(r.relays_to_ask(now).is_empty(), "both others rest");
        let later = r.relays_to_ask(now + RELAY_BACKOFF + Duration::from_secs(1));
        assert_eq!(later.len(), 1);
    }

    #[test]
    fn a_reservation_lost_after_acceptance_is_asked_again_sooner_than_a_refused_one() {
        let now = Instant::now();
        let mut r = Reach::new(2);
        r.on_probe(false);
        let (kept, refused) = (PeerId::random(), PeerId::random());
        r.add_candidate(kept, addr("/ip4/198.18.0.2/tcp/4001"));
        r.add_candidate(refused, addr("/ip4/198.18.0.3/tcp/4001"));
        let (lk, lr) = (ListenerId::next(), ListenerId::next());
        r.reserving(kept, lk);
        r.reserving(refused, lr);
        r.on_accepted(kept);
        r.on_listener_closed(lk, now);
        r.on_listener_closed(lr, now);
        let soon = r.relays_to_ask(now + RELAY_RETRY + Duration::from_millis(1));
        assert_eq!(soon.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![kept]);
        let later = r.relays_to_ask(now + RELAY_BACKOFF + Duration::from_millis(1));
        assert_eq!(later.len(), 2, "both asked once the refusal's rest is over");
    }

    #[test]
    fn an_address_a_peer_saw_us_move_from_goes_stale_unless_declared() {
        let mut r = Reach::new(2);
        let (old, declared) = (
            addr("/ip4/198.18.0.9/tcp/4001"),
            addr("/ip4/198.18.0.9/tcp/80"),
        );
        let relayed = addr(
            "/ip4/198.18.0.9/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        );
        r.declare(declared.clone());
        for a in [&old, &declared, &relayed] {
            r.on_confirmed(a.clone());
        }
        let (seer, other) = (PeerId::random(), PeerId::random());
        assert!(
            r.on_observed(seer, &addr("/ip4/198.18.0.9/tcp/5555"), true)
                .is_empty()
        );
        // Another peer seeing another IP is no move (multi-homed, say).
        assert!(
            r.on_observed(other, &addr("/ip4/203.0.113.1/tcp/1"), true)
                .is_empty()
        );
        // The same peer, same IP, new port: still no move.
        assert!(
            r.on_observed(seer, &addr("/ip4/198.18.0.9/tcp/6666"), true)
                .is_empty()
        );
        // Seen elsewhere on a second connection while the first lives (a
        // hairpin NAT): no move.
        assert!(
            r.on_observed(seer, &addr("/ip4/198.18.1.7/tcp/5555"), false)
                .is_empty()
        );
        assert_eq!(
            r.on_observed(seer, &addr("/ip4/198.18.1.7/tcp/5555"), true),
            vec![old.clone()],
            "only the undeclared direct address on the old IP is stale"
        );
        assert_eq!(
            r.on_listen_expired(&addr("/ip4/198.18.0.9/tcp/4001")),
            vec![old]
        );
        assert!(
            r.on_listen_expired(&addr("/ip4/10.0.0.1/tcp/4001"))
                .is_empty()
        );
    }

    #[test]
    fn observers_kept_are_bounded() {
        let mut r = Reach::new(2);
        for i in 0..(OBSERVERS_KEPT as u32 + 50) {
            let a = addr(&format!("/ip4/198.18.0.{}/tcp/1", i % 250 + 1));
            r.on_observed(PeerId::random(), &a, true);
        }
        assert_eq!(r.observed.len(), OBSERVERS_KEPT);
    }

    #[test]
    fn a_node_that_turns_public_drops_its_reservations() {
        let mut r = Reach::new(2);
        r.on_probe(false);
        let p = PeerId::random();
        r.add_candidate(p, addr("/ip4/198.18.0.2/tcp/4001"));
        let q = PeerId::random();
        r.add_candidate(q, addr("/ip4/198.18.0.3/tcp/4001"));
        let picks = r.relays_to_ask(Instant::now());
        let (l, pending) = (ListenerId::next(), ListenerId::next());
        r.reserving(picks[0].0, l);
        r.reserving(picks[1].0, pending);
        assert_eq!(r.on_accepted(picks[0].0), None, "still private: kept");
        assert!(r.surplus().is_empty(), "still private");
        r.on_confirmed(addr("/ip4/198.18.0.9/udp/4001/quic-v1"));
        // The accepted one goes now; the one whose answer is awaited goes
        // when it comes, not before.
        assert_eq!(r.surplus(), vec![l]);
        assert!(r.surplus().is_empty());
        assert_eq!(r.on_accepted(picks[1].0), Some(pending));
        assert!(r.relays_to_ask(Instant::now()).is_empty());
    }

    #[test]
    fn a_peer_record_names_only_its_signers_addresses() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let me = key.public().to_peer_id();
        let addrs = vec![addr(
            "/ip4/198.18.0.4/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        )];
        let bytes = signed_peer_record(&key, addrs.clone()).expect("signed");
        assert_eq!(addrs_from_record(&bytes, &me), Some(addrs.clone()));
        // Someone else's record stored under my key is not mine.
        let other = libp2p::identity::Keypair::generate_ed25519();
        let theirs = signed_peer_record(&other, addrs).expect("signed");
        assert_eq!(addrs_from_record(&theirs, &me), None);
        // A flipped byte breaks the signature; garbage is no record.
        for i in [bytes.len() / 2, bytes.len() - 1] {
            let mut forged = bytes.clone();
            forged[i] ^= 1;
            assert_eq!(addrs_from_record(&forged, &me), None, "byte {i}");
        }
        assert_eq!(addrs_from_record(b"not a record", &me), None);
    }

    #[test]
    fn local_networks_are_told_from_the_internet() {
        for local in [
            "10.1.0.2",
            "192.168.1.5",
            "172.16.0.1",
            "100.64.3.4",
            "127.0.0.1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(is_local(local.parse().expect("ip")), "{local}");
        }
        for public in [
            "198.18.0.4",
            "11.0.0.1",
            "100.128.0.1",
            "2001:db8::1",
            "8.8.8.8",
        ] {
            assert!(!is_local(public.parse().expect("ip")), "{public}");
        }
    }

    #[test]
    fn transports_are_named_from_the_address() {
        assert_eq!(transport_of(&addr("/ip4/1.2.3.4/tcp/1")), "tcp");
        assert_eq!(transport_of(&addr("/ip4/1.2.3.4/udp/1/quic-v1")), "quic");
        let relayed = "/ip4/1.2.3.4/udp/1/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";
        assert_eq!(transport_of(&addr(relayed)), "relay");
        assert!(is_relayed(&addr(relayed)));
        assert!(!is_relayed(&addr("/ip4/1.2.3.4/tcp/1")));
    }
}
