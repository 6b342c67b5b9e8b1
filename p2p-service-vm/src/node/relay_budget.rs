//! The relay's total bandwidth cap: at most `[relay] max_bytes_per_hour`
//! relayed in any hour, over all circuits and peers.
//!
//! libp2p's relay copies a circuit's bytes inside its connection handler and
//! reports none of them, so the cap is kept on admission: each circuit
//! counts, when it is opened, as the most it may carry (`max_circuit_bytes`,
//! both directions together, plus what its copy loop can overshoot by), and a
//! circuit that would take the last hour's total over the cap is refused.
//! That errs on the operator's side: a circuit that carries only a hole
//! punch's handshake costs a whole circuit's worth for an hour.
//!
//! The check is one of the relay's circuit rate limiters, the last one asked,
//! so a request the relay's other limits refuse takes nothing from the
//! budget; one it then refuses for want of a reservation gives its share back
//! ([`RelayBudget::refund`]), and one the relay never accepts (the asker
//! reset its request, a connection closed mid-way; the relay reports
//! neither) lets its share lapse after [`PENDING`]. Refusals are remembered by peer so the event
//! loop can tell them from a peer over its own limits: only the latter is
//! charged in the credit ledger ([`RelayBudget::took_refusal`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::relay::RateLimiter;
use libp2p::{Multiaddr, PeerId};

/// The window the cap counts over.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// What a circuit's copy loop may carry past its byte limit: it checks the
/// limit before each read, and reads up to its 8 KiB buffer each way.
const COPY_OVERSHOOT: u64 = 2 * 8 * 1024;

/// How long an admitted circuit that the relay has not yet accepted holds
/// its share. Setting a circuit up takes round trips; one that never gets
/// there (the asker reset its stream, a connection closed mid-way: the relay
/// says nothing of those) frees its share by itself, so a flood of
/// abandoned requests cannot spend the hour's budget.
const PENDING: Duration = Duration::from_secs(30);

/// How long a refusal by the cap waits to be read by the event loop (it is
/// read within the same turn; one whose denial never reached the loop goes).
const REFUSAL_TTL: Duration = Duration::from_secs(10);

/// The cap's shared state: the relay's limiter admits through it, the event
/// loop confirms, refunds and reads refusals.
#[derive(Clone)]
pub struct RelayBudget {
    inner: Arc<Mutex<Inner>>,
}

struct Admitted {
    at: Instant,
    peer: PeerId,
    /// The relay accepted the circuit: it counts for the whole window.
    accepted: bool,
}

struct Inner {
    /// Circuits the window holds at most.
    max_circuits: u64,
    window: Duration,
    /// Admitted circuits in the window, oldest first.
    admitted: VecDeque<Admitted>,
    /// Refusals by the cap not yet read by the event loop, oldest first.
    refused: VecDeque<(Instant, PeerId)>,
}

impl Inner {
    /// Drops what no longer counts at `now`.
    fn expire(&mut self, now: Instant) {
        let window = self.window;
        self.admitted.retain(|a| {
            let age = now.saturating_duration_since(a.at);
            age < window && (a.accepted || age < PENDING)
        });
        while self
            .refused
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= REFUSAL_TTL)
        {
            self.refused.pop_front();
        }
    }
}

impl RelayBudget {
    /// A budget of `cap_bytes` an hour for circuits of at most
    /// `circuit_bytes` each.
    pub fn new(cap_bytes: u64, circuit_bytes: u64) -> Self {
        Self::with_window(cap_bytes, circuit_bytes, WINDOW)
    }

    fn with_window(cap_bytes: u64, circuit_bytes: u64, window: Duration) -> Self {
        let per_circuit = circuit_bytes.saturating_add(COPY_OVERSHOOT);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                max_circuits: cap_bytes / per_circuit,
                window,
                admitted: VecDeque::new(),
                refused: VecDeque::new(),
            })),
        }
    }

    /// The limiter to give the relay's config.
    pub fn limiter(&self) -> Box<dyn RateLimiter> {
        let budget = self.clone();
        Box::new(move |peer: PeerId, _addr: &Multiaddr, now: Instant| budget.admit(peer, now))
    }

    /// Takes one circuit's worth for `peer` if the last hour leaves room.
    pub fn admit(&self, peer: PeerId, now: Instant) -> bool {
        let mut b = self.lock();
        b.expire(now);
        if (b.admitted.len() as u64) < b.max_circuits {
            b.admitted.push_back(Admitted {
                at: now,
                peer,
                accepted: false,
            });
            true
        } else {
            b.refused.push_back((now, peer));
            false
        }
    }

    /// The relay accepted a circuit of `peer`'s: its share holds for the
    /// window (until now it would have lapsed after [`PENDING`]).
    pub fn accepted(&self, peer: PeerId) {
        let mut b = self.lock();
        if let Some(a) = b
            .admitted
            .iter_mut()
            .find(|a| a.peer == peer && !a.accepted)
        {
            a.accepted = true;
        }
    }

    /// Gives back the share of `peer`'s newest circuit not yet accepted: the
    /// relay refused it after the budget admitted it (no reservation for its
    /// destination).
    pub fn refund(&self, peer: PeerId) {
        let mut b = self.lock();
        if let Some(i) = b
            .admitted
            .iter()
            .rposition(|a| a.peer == peer && !a.accepted)
        {
            b.admitted.remove(i);
        }
    }

    /// Whether a refusal of `peer`'s circuit was the cap's (and forgets it).
    pub fn took_refusal(&self, peer: PeerId) -> bool {
        let mut b = self.lock();
        b.expire(Instant::now());
        match b.refused.iter().position(|(_, p)| *p == peer) {
            Some(i) => {
                b.refused.remove(i);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state stays whole across a panic elsewhere: every change is
        // one push, pop or counter step.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_cap_admits_whole_circuits_and_the_window_frees_them() {
        let b = RelayBudget::with_window(10 * MIB, 3 * MIB, Duration::from_secs(60));
        let (p, q) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        // Three circuits of 3 MiB (and the overshoot) fit in 10 MiB, a
        // fourth does not, whoever asks.
        for (peer, at) in [(p, 0), (q, 0), (p, 10)] {
            assert!(b.admit(peer, t0 + Duration::from_secs(at)));
            b.accepted(peer);
        }
        assert!(!b.admit(q, t0 + Duration::from_secs(20)));
        assert!(b.took_refusal(q), "the cap's refusal is remembered");
        assert!(!b.took_refusal(q), "and told once");
        assert!(!b.took_refusal(p), "p was never refused by the cap");
        // A minute after the first two, their share is free again; the
        // third's is not.
        let later = t0 + Duration::from_secs(60);
        assert!(b.admit(q, later));
        assert!(b.admit(q, later));
        assert!(!b.admit(p, later));
    }

    #[test]
    fn a_refund_frees_the_askers_newest_circuit() {
        let b = RelayBudget::with_window(2 * MIB, MIB, Duration::from_secs(60));
        let (p, q) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        assert!(b.admit(p, now));
        assert!(
            !b.admit(q, now),
            "one circuit of 1 MiB and overshoot fits in 2 MiB"
        );
        b.refund(q); // q holds nothing: nothing changes
        assert!(!b.admit(q, now));
        b.refund(p);
        assert!(b.admit(q, now));
    }

    #[test]
    fn an_admitted_circuit_the_relay_never_accepts_frees_its_share() {
        let b = RelayBudget::with_window(2 * MIB, MIB, Duration::from_secs(3600));
        let (p, q) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        assert!(b.admit(p, t0));
        assert!(
            !b.admit(q, t0 + Duration::from_secs(1)),
            "p's circuit holds it"
        );
        // p reset its request: nothing accepted it, and its share lapses.
        assert!(b.admit(q, t0 + PENDING));
        b.accepted(q);
        // An accepted circuit holds its share for the window.
        assert!(!b.admit(p, t0 + PENDING + Duration::from_secs(600)));
    }

    #[test]
    fn a_cap_below_one_circuit_admits_nothing() {
        let b = RelayBudget::new(MIB, MIB);
        assert!(!b.admit(PeerId::random(), Instant::now()));
    }
}
