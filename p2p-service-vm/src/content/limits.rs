//! What one peer, and all of them, may take of this node's serving: the
//! upload caps (node-wide and per throttled peer), content streams and
//! answer batches per peer, and searches answered per peer.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use libp2p::PeerId;

/// The node-wide upload cap, shared by every stream this node serves.
pub(crate) struct Limiter {
    inner: DefaultDirectRateLimiter,
    pub(super) burst: u32,
}

impl Limiter {
    /// `None` when uncapped.
    pub fn new(bytes_per_sec: u64) -> Option<Self> {
        let rate = NonZeroU32::new(bytes_per_sec.min(u32::MAX as u64) as u32)?;
        // A burst of a quarter second (at least one block with its proof) keeps
        // the cap smooth without refusing a single large answer.
        let burst = (rate.get() / 4).max(p2pvm_content::BLOCK_BYTES as u32 + 64 * 64);
        let quota = Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).expect("positive"));
        Some(Self {
            inner: RateLimiter::direct(quota),
            burst,
        })
    }

    pub(super) async fn take(&self, mut n: u64) {
        while n > 0 {
            let step = n.min(self.burst as u64) as u32;
            if let Some(step) = NonZeroU32::new(step) {
                // Cannot fail: step never exceeds the burst.
                let _ = self.inner.until_n_ready(step).await;
            }
            n -= step as u64;
        }
    }
}

/// One shared `T` per peer, made on its first stream and gone with its
/// last: what a peer gets must not multiply with the streams it opens.
pub(crate) struct PerPeer<T>(std::sync::Mutex<HashMap<PeerId, Weak<T>>>);

impl<T> Default for PerPeer<T> {
    fn default() -> Self {
        Self(Default::default())
    }
}

impl<T> PerPeer<T> {
    /// `peer`'s `T`, made by `make` if it has none yet.
    fn get_or(&self, peer: PeerId, make: impl FnOnce() -> T) -> Arc<T> {
        let mut all = self.0.lock().expect("lock");
        all.retain(|_, t| t.strong_count() > 0);
        if let Some(t) = all.get(&peer).and_then(Weak::upgrade) {
            return t;
        }
        let t = Arc::new(make());
        all.insert(peer, Arc::downgrade(&t));
        t
    }
}

/// The upload caps of throttled peers, one per peer shared by all of its
/// streams and connections (a cap per stream would multiply a peer's rate by
/// how many it opens).
pub(crate) type PeerThrottles = PerPeer<Limiter>;

impl PerPeer<Limiter> {
    /// `peer`'s cap at `rate` bytes per second.
    pub fn get(&self, peer: PeerId, rate: u64) -> Arc<Limiter> {
        self.get_or(peer, || Limiter::new(rate.max(1)).expect("a positive rate"))
    }
}

/// Content streams (libp2p and fast path alike) served to one peer at
/// once. A downloader uses up to three per item it fetches from us (its
/// worker's stream and two fast-path connections) and one per manifest or
/// search; a stream refused here costs an honest peer a failed request, so
/// the cap is generous. What a peer's streams can hold in memory is bounded
/// node-wide by [`BATCHES_IN_FLIGHT`].
pub(super) const STREAMS_PER_PEER: usize = 64;

/// Batches of answers computed and not yet sent for one peer, over all its
/// streams: one peer cannot take the node-wide allowance for itself.
pub(super) const BATCHES_PER_PEER: usize = 8;

/// The answer batches in flight of each peer.
pub(crate) type PeerBatches = PerPeer<tokio::sync::Semaphore>;

impl PerPeer<tokio::sync::Semaphore> {
    /// `peer`'s allowance, shared by all its streams.
    pub fn get(&self, peer: PeerId) -> Arc<tokio::sync::Semaphore> {
        self.get_or(peer, || tokio::sync::Semaphore::new(BATCHES_PER_PEER))
    }
}

/// Batches of answers computed and not yet sent, node-wide (each at most
/// [`BATCH`] blocks, about 2 MiB): a peer that asks on many streams and
/// reads none can hold these for [`WRITE_TIMEOUT`] at most, and pays for
/// each in its credit.
pub(crate) const BATCHES_IN_FLIGHT: usize = 64;

/// The content streams being served, counted per peer.
#[derive(Default)]
pub(crate) struct PeerStreams(std::sync::Mutex<HashMap<PeerId, usize>>);

/// One served stream of a peer; the count goes down when it is dropped.
pub(crate) struct StreamSlot {
    all: Arc<PeerStreams>,
    peer: PeerId,
}

impl PeerStreams {
    /// How many streams of `peer` are served now.
    pub fn count(&self, peer: &PeerId) -> usize {
        self.0.lock().expect("lock").get(peer).copied().unwrap_or(0)
    }

    /// A slot for another stream of `peer`, or `None` at the cap.
    pub fn enter(self: &Arc<Self>, peer: PeerId) -> Option<StreamSlot> {
        let mut all = self.0.lock().expect("lock");
        let n = all.entry(peer).or_default();
        if *n >= STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            all: self.clone(),
            peer,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut all = self.all.0.lock().expect("lock");
        if let Some(n) = all.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                all.remove(&self.peer);
            }
        }
    }
}

/// Searches answered per peer: a burst of [`SEARCH_BURST`], then
/// [`SEARCHES_PER_SEC`]. Each search decodes the stored items under its
/// rarest word (the store's word index), which for a common word is many: a
/// peer asking without pause would keep this node's blocking threads for
/// itself.
pub(super) const SEARCH_BURST: u32 = 20;

pub(super) const SEARCHES_PER_SEC: u32 = 2;

/// Peers whose search allowance is tracked before idle ones are dropped.
pub(super) const SEARCH_PEERS_TRACKED: usize = 10_000;

/// How often, at most, the search allowances of idle peers are dropped: a
/// pass looks at every tracked peer, so it must not run at every search.
pub(super) const SEARCH_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The search allowance of each peer.
pub(crate) struct SearchLimits {
    limits: governor::DefaultKeyedRateLimiter<PeerId>,
    last_prune: std::sync::Mutex<std::time::Instant>,
}

impl Default for SearchLimits {
    fn default() -> Self {
        let quota = Quota::per_second(NonZeroU32::new(SEARCHES_PER_SEC).expect("positive"))
            .allow_burst(NonZeroU32::new(SEARCH_BURST).expect("positive"));
        Self {
            limits: RateLimiter::keyed(quota),
            last_prune: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl SearchLimits {
    /// Whether `peer` may have another search answered now.
    pub fn allow(&self, peer: &PeerId) -> bool {
        if self.limits.len() > SEARCH_PEERS_TRACKED && self.prune_due() {
            // Peers back at a full allowance need no entry.
            self.limits.retain_recent();
        }
        self.limits.check_key(peer).is_ok()
    }

    /// True at most once per [`SEARCH_PRUNE_EVERY`]; a search that finds
    /// another one pruning goes on without waiting.
    fn prune_due(&self) -> bool {
        let Ok(mut last) = self.last_prune.try_lock() else {
            return false;
        };
        if last.elapsed() < SEARCH_PRUNE_EVERY {
            return false;
        }
        *last = std::time::Instant::now();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_throttled_peer_shares_one_cap_over_all_its_streams() {
        let throttles = PeerThrottles::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let one = throttles.get(a, 64 * 1024);
        let two = throttles.get(a, 64 * 1024);
        assert!(
            Arc::ptr_eq(&one, &two),
            "a second stream got a cap of its own"
        );
        assert!(!Arc::ptr_eq(&one, &throttles.get(b, 64 * 1024)));
        // The burst (one block) is spent by the first stream; the second must
        // then wait for the shared bucket to refill.
        one.take(one.burst as u64).await;
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(200), two.take(64 * 1024));
        assert!(
            waited.await.is_err(),
            "the second stream was not held to the shared rate"
        );
        // Gone with its last stream: the map does not grow with every peer seen.
        drop((one, two));
        throttles.get(PeerId::random(), 1);
        assert_eq!(throttles.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_peer_gets_a_bounded_number_of_streams_and_its_slots_come_back() {
        let streams = Arc::new(PeerStreams::default());
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut held: Vec<StreamSlot> = (0..STREAMS_PER_PEER)
            .map(|_| streams.enter(a).expect("under the cap"))
            .collect();
        assert!(streams.enter(a).is_none(), "a stream over the cap");
        // Others are not held to a's count.
        let other = streams.enter(b).expect("another peer");
        held.pop();
        held.push(streams.enter(a).expect("a slot came back"));
        assert!(streams.enter(a).is_none(), "a stream over the cap");
        drop(other);
        assert_eq!(streams.0.lock().unwrap().len(), 1);
        // Gone with the last stream: peers seen once do not stay in the map.
        drop(held);
        assert!(streams.0.lock().unwrap().is_empty());
    }

    #[test]
    fn a_peer_holds_a_bounded_share_of_the_answers_in_flight() {
        let batches = PeerBatches::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let (one, two) = (batches.get(a), batches.get(a));
        assert!(
            Arc::ptr_eq(&one, &two),
            "a second stream got its own allowance"
        );
        let held: Vec<_> = (0..BATCHES_PER_PEER)
            .map(|_| {
                one.clone()
                    .try_acquire_owned()
                    .expect("within the allowance")
            })
            .collect();
        assert!(
            two.clone().try_acquire_owned().is_err(),
            "over the allowance"
        );
        assert!(batches.get(b).try_acquire_owned().is_ok(), "b held to a's");
        drop(held);
        assert!(two.try_acquire_owned().is_ok());
    }

    #[test]
    fn searches_are_answered_in_a_burst_then_at_a_bounded_rate_per_peer() {
        let limits = SearchLimits::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        for i in 0..SEARCH_BURST {
            assert!(limits.allow(&a), "search {i} of the burst refused");
        }
        assert!(!limits.allow(&a), "a search past the burst answered");
        assert!(limits.allow(&b), "another peer held to a's allowance");
        // The allowance comes back at its rate.
        std::thread::sleep(std::time::Duration::from_millis(
            1100 / u64::from(SEARCHES_PER_SEC),
        ));
        assert!(limits.allow(&a));
    }

    #[test]
    fn idle_search_peers_are_pruned_at_most_once_per_interval() {
        let limits = SearchLimits::default();
        assert!(!limits.prune_due(), "a pass right after the start");
        *limits.last_prune.lock().unwrap() -= SEARCH_PRUNE_EVERY;
        assert!(limits.prune_due());
        assert!(!limits.prune_due(), "a second pass in the same interval");
    }
}
