//! Back on the network after losing it: a node whose line went down (or
//! whose router changed address, which breaks every connection through it)
//! dials its bootstrap peers again once it has too few peers, as Kubo's
//! bootstrapper does. Plain state the event loop asks on each tick.
//!
//! Without it a node that lost all its connections stayed alone until
//! restarted: the DHT's routing table names peers, but nothing dials them.

use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// Fewer connected peers than this and the bootstrap peers are dialled
/// again (Kubo's threshold).
pub(crate) const MIN_PEERS: usize = 4;

/// The first wait between two dials of one bootstrap peer; it doubles up to
/// [`MAX_BACKOFF`] while the peer stays out of reach.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(5);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How long a bootstrap peer the operator disconnected is left alone.
pub(crate) const HOLD: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Boot {
    peer: PeerId,
    addr: Multiaddr,
    backoff: Duration,
    next: Instant,
    /// Not dialled before this (the operator disconnected it).
    held_until: Instant,
}

/// The bootstrap peers and when each may be dialled again.
#[derive(Debug)]
pub(crate) struct Redial {
    boots: Vec<Boot>,
}

impl Redial {
    /// Bootstrap peers just dialled at start-up, at `now`.
    pub(crate) fn new(peers: Vec<(PeerId, Multiaddr)>, now: Instant) -> Self {
        let boots = peers
            .into_iter()
            .map(|(peer, addr)| Boot {
                peer,
                addr,
                backoff: FIRST_BACKOFF,
                next: now + FIRST_BACKOFF,
                held_until: now,
            })
            .collect();
        Self { boots }
    }

    /// Addresses to dial now: bootstrap peers not connected and due, when
    /// fewer than [`MIN_PEERS`] peers are connected. Each one returned
    /// waits twice as long before the next try while the node has other
    /// peers (that bootstrap peer may be gone for good); a node with none
    /// is cut off, and tries every [`FIRST_BACKOFF`] so that it is back
    /// soon after its line is.
    pub(crate) fn due(
        &mut self,
        connected: usize,
        is_connected: impl Fn(&PeerId) -> bool,
        now: Instant,
    ) -> Vec<Multiaddr> {
        if connected >= MIN_PEERS {
            return Vec::new();
        }
        let mut out = Vec::new();
        for b in &mut self.boots {
            if b.next > now || is_connected(&b.peer) {
                continue;
            }
            out.push(b.addr.clone());
            if connected == 0 {
                b.next = now + FIRST_BACKOFF;
            } else {
                b.next = now + b.backoff;
                b.backoff = (b.backoff * 2).min(MAX_BACKOFF);
            }
        }
        out
    }

    /// `peer` connected: its next loss is retried after the first backoff.
    pub(crate) fn on_connected(&mut self, peer: &PeerId) {
        for b in self.boots.iter_mut().filter(|b| b.peer == *peer) {
            b.backoff = FIRST_BACKOFF;
        }
    }

    /// The last connection to `peer` closed at `now`: due at once.
    pub(crate) fn on_disconnected(&mut self, peer: &PeerId, now: Instant) {
        for b in self.boots.iter_mut().filter(|b| b.peer == *peer) {
            b.next = b.next.min(now).max(b.held_until);
        }
    }

    /// The operator disconnected `peer` at `now`: not dialled again soon.
    pub(crate) fn hold(&mut self, peer: &PeerId, now: Instant) {
        for b in self.boots.iter_mut().filter(|b| b.peer == *peer) {
            b.held_until = now + HOLD;
            b.next = b.held_until;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(i: u8) -> (PeerId, Multiaddr) {
        let a = format!("/ip4/198.18.0.{i}/tcp/4001").parse().expect("addr");
        (PeerId::random(), a)
    }

    #[test]
    fn a_node_short_of_peers_dials_missing_bootstrap_peers_with_growing_waits() {
        let t0 = Instant::now();
        let (a, b) = (boot(2), boot(3));
        let mut r = Redial::new(vec![a.clone(), b.clone()], t0);
        let none = |_: &PeerId| false;
        // One other peer connected: the waits grow.
        assert!(r.due(1, none, t0).is_empty(), "just dialled at start-up");
        let t1 = t0 + FIRST_BACKOFF;
        assert_eq!(r.due(1, none, t1), vec![a.1.clone(), b.1.clone()]);
        assert!(r.due(1, none, t1 + Duration::from_secs(4)).is_empty());
        let t2 = t1 + FIRST_BACKOFF;
        assert_eq!(r.due(1, none, t2).len(), 2);
        assert!(
            r.due(1, none, t2 + Duration::from_secs(9)).is_empty(),
            "doubled"
        );
        assert_eq!(r.due(1, none, t2 + Duration::from_secs(10)).len(), 2);
        // Cut off: every FIRST_BACKOFF, however long it has been.
        let t3 = t2 + Duration::from_secs(3600);
        for i in 0..5 {
            let t = t3 + FIRST_BACKOFF * i;
            assert_eq!(r.due(0, none, t).len(), 2, "try {i}");
        }
        // Connected to `a`, and enough peers: nothing to dial.
        let only_a = |p: &PeerId| *p == a.0;
        let late = t3 + Duration::from_secs(3600);
        assert_eq!(r.due(1, only_a, late), vec![b.1.clone()]);
        assert!(r.due(MIN_PEERS, none, late + MAX_BACKOFF).is_empty());
        // The waits stop growing at the cap.
        let mut t = late + MAX_BACKOFF;
        for _ in 0..10 {
            assert_eq!(r.due(1, only_a, t).len(), 1);
            t += MAX_BACKOFF;
        }
    }

    #[test]
    fn a_lost_bootstrap_peer_is_dialled_at_once_unless_the_operator_dropped_it() {
        let t0 = Instant::now();
        let (a, b) = (boot(2), boot(3));
        let mut r = Redial::new(vec![a.clone(), b.clone()], t0);
        r.on_connected(&a.0);
        r.on_connected(&b.0);
        let t1 = t0 + Duration::from_secs(1);
        r.on_disconnected(&a.0, t1);
        r.hold(&b.0, t1);
        r.on_disconnected(&b.0, t1);
        assert_eq!(r.due(0, |_| false, t1), vec![a.1.clone()]);
        let a_back = |p: &PeerId| *p == a.0;
        assert!(
            r.due(0, a_back, t1 + HOLD - Duration::from_secs(1))
                .is_empty()
        );
        assert_eq!(r.due(0, a_back, t1 + HOLD), vec![b.1]);
    }
}
