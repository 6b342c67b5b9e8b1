//! Another hole punch when the first did not give a direct connection.
//!
//! libp2p's DCUtR punches once per relayed connection (up to three dials,
//! started by the side that accepted it) and never again. One failed round
//! (a sync message late on a loaded machine, a peer whose address just
//! moved and whose new one was not yet among its candidates) left two peers
//! on the relay for as long as they stayed connected: slow, and limited by
//! the relay's operator. So the side that dialled the relayed connection
//! dials the same relayed address again a while later, while the peer is
//! still reached only through relays: a new relayed connection, and with it
//! a new round of punching. A few times, each wait twice the last, the way
//! the bootstrap redials back off ([`super::redial`]); the other side's
//! [`super::punch_guard`] allows far more relayed connections than this
//! makes. Plain state the event loop asks on each tick.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// How long a relayed connection we dialled may go without a direct one
/// before the first new round: DCUtR's own three dials are over by then.
pub(crate) const FIRST_WAIT: Duration = Duration::from_secs(15);
/// New rounds per peer before leaving it on the relay.
pub(crate) const ROUNDS: u8 = 3;

#[derive(Debug)]
struct Waiting {
    /// The relayed address we reached the peer at.
    addr: Multiaddr,
    rounds: u8,
    wait: Duration,
    next: Instant,
}

/// Peers reached only through a relay we dialled, and when to punch again.
#[derive(Debug, Default)]
pub(crate) struct Repunch {
    peers: HashMap<PeerId, Waiting>,
}

impl Repunch {
    /// We dialled `peer` through a relay at `addr`. A peer already waiting
    /// keeps its count: this may be our own new round.
    pub(crate) fn on_relayed_dialled(&mut self, peer: PeerId, addr: Multiaddr, now: Instant) {
        self.peers.entry(peer).or_insert(Waiting {
            addr,
            rounds: 0,
            wait: FIRST_WAIT,
            next: now + FIRST_WAIT,
        });
    }

    /// A direct connection to `peer` (punched or not), or none left at all:
    /// nothing to punch for.
    pub(crate) fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// Relayed addresses to dial again now, with their peers. A round is
    /// spent without a dial for a peer that has no `room` for another
    /// relayed connection and a direct one (the per-peer connection limit:
    /// earlier rounds' relayed connections stay until their circuits end).
    /// A peer that has had its [`ROUNDS`] is forgotten (until it is
    /// dialled through a relay afresh).
    pub(crate) fn due(
        &mut self,
        now: Instant,
        room: impl Fn(&PeerId) -> bool,
    ) -> Vec<(PeerId, Multiaddr)> {
        let mut out = Vec::new();
        self.peers.retain(|peer, w| {
            if w.next > now {
                return true;
            }
            if w.rounds >= ROUNDS {
                return false;
            }
            if room(peer) {
                out.push((*peer, w.addr.clone()));
            }
            w.rounds += 1;
            w.wait *= 2;
            w.next = now + w.wait;
            true
        });
        out
    }

    /// How many peers wait for another round.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relayed_addr() -> Multiaddr {
        format!(
            "/ip4/192.0.2.1/tcp/4001/p2p/{}/p2p-circuit",
            PeerId::random()
        )
        .parse()
        .unwrap()
    }

    #[test]
    fn nothing_is_due_before_the_first_wait() {
        let (mut r, t0) = (Repunch::default(), Instant::now());
        r.on_relayed_dialled(PeerId::random(), relayed_addr(), t0);
        assert!(r.due(t0, room).is_empty());
        assert!(
            r.due(t0 + FIRST_WAIT - Duration::from_millis(1), room)
                .is_empty()
        );
        assert_eq!(r.due(t0 + FIRST_WAIT, room).len(), 1);
    }

    fn room(_: &PeerId) -> bool {
        true
    }

    #[test]
    fn a_peer_without_room_spends_a_round_undialled() {
        let (mut r, t0) = (Repunch::default(), Instant::now());
        let (full, free) = (PeerId::random(), PeerId::random());
        r.on_relayed_dialled(full, relayed_addr(), t0);
        r.on_relayed_dialled(free, relayed_addr(), t0);
        let due = r.due(t0 + FIRST_WAIT, |p| *p != full);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, free);
        // The round is spent: the next comes after the doubled wait.
        let next = t0 + FIRST_WAIT + FIRST_WAIT * 2;
        assert!(r.due(next - Duration::from_millis(1), room).is_empty());
        assert_eq!(r.due(next, room).len(), 2);
    }

    #[test]
    fn rounds_back_off_and_end() {
        let (mut r, t0) = (Repunch::default(), Instant::now());
        let (peer, addr) = (PeerId::random(), relayed_addr());
        r.on_relayed_dialled(peer, addr.clone(), t0);
        let mut t = t0 + FIRST_WAIT;
        let mut wait = FIRST_WAIT;
        for _ in 0..ROUNDS {
            assert_eq!(r.due(t, room), vec![(peer, addr.clone())]);
            // Our own new relayed connection neither resets nor adds.
            r.on_relayed_dialled(peer, relayed_addr(), t);
            wait *= 2;
            assert!(r.due(t + wait - Duration::from_millis(1), room).is_empty());
            t += wait;
        }
        assert!(r.due(t, room).is_empty(), "no round past the last");
        assert_eq!(r.len(), 0, "a peer past its rounds is forgotten");
    }

    #[test]
    fn a_direct_connection_ends_the_wait() {
        let (mut r, t0) = (Repunch::default(), Instant::now());
        let (a, b) = (PeerId::random(), PeerId::random());
        r.on_relayed_dialled(a, relayed_addr(), t0);
        r.on_relayed_dialled(b, relayed_addr(), t0);
        r.forget(&a);
        let due = r.due(t0 + FIRST_WAIT, room);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, b);
    }
}
