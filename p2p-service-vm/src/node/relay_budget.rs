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
//! ([`RelayBudget::refund`]). Refusals are remembered by peer so the event
//! loop can tell them from a peer over its own limits: only the latter is
//! charged in the credit ledger ([`RelayBudget::took_refusal`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::relay::RateLimiter;
use libp2p::{Multiaddr, PeerId};

/// The window the cap counts over.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// What a circuit's copy loop may carry past its byte limit: it checks the
/// limit before each read, and reads up to its 8 KiB buffer each way.
const COPY_OVERSHOOT: u64 = 2 * 8 * 1024;

/// Refusals remembered for the event loop at most.
const MAX_REMEMBERED: usize = 4096;

/// The cap's shared state: the relay's limiter admits through it, the event
/// loop refunds and reads refusals.
#[derive(Clone)]
pub struct RelayBudget {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    /// Circuits the window holds at most.
    max_circuits: u64,
    window: Duration,
    /// Admitted circuits in the window, oldest first.
    admitted: VecDeque<(Instant, PeerId)>,
    /// Refusals by the cap not yet seen by the event loop.
    refused: HashMap<PeerId, u32>,
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
                refused: HashMap::new(),
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
        let window = b.window;
        while b
            .admitted
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= window)
        {
            b.admitted.pop_front();
        }
        if (b.admitted.len() as u64) < b.max_circuits {
            b.admitted.push_back((now, peer));
            true
        } else {
            // Each refusal is read back within the same turn of the event
            // loop; one whose denial never reached it (the stream broke) would
            // stay. Peer ids are free, so the map is bounded all the same.
            if b.refused.len() >= MAX_REMEMBERED {
                b.refused.clear();
            }
            *b.refused.entry(peer).or_default() += 1;
            false
        }
    }

    /// Gives back the share of `peer`'s newest circuit: the relay refused it
    /// after the budget admitted it (no reservation for its destination).
    pub fn refund(&self, peer: PeerId) {
        let mut b = self.lock();
        if let Some(i) = b.admitted.iter().rposition(|(_, p)| *p == peer) {
            b.admitted.remove(i);
        }
    }

    /// Whether a refusal of `peer`'s circuit was the cap's (and forgets it).
    pub fn took_refusal(&self, peer: PeerId) -> bool {
        let mut b = self.lock();
        let Some(n) = b.refused.get_mut(&peer) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            b.refused.remove(&peer);
        }
        true
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
        assert!(b.admit(p, t0));
        assert!(b.admit(q, t0));
        assert!(b.admit(p, t0 + Duration::from_secs(10)));
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
    fn a_cap_below_one_circuit_admits_nothing() {
        let b = RelayBudget::new(MIB, MIB);
        assert!(!b.admit(PeerId::random(), Instant::now()));
    }
}
