//! Which block to ask which provider for next.
//!
//! A state machine without I/O, clock or randomness of its own: workers tell
//! it what providers hold and what arrived, readers tell it where they read,
//! and it answers `pick`, each call given the time. Its random tie-breaks come
//! from a seed, so a test drives it through any history with a made-up clock
//! and gets the same choices every run (the property tests below).
//!
//! It hands out, in order of preference:
//! 1. missing blocks inside a reader's playback window (its next `window`
//!    blocks), lowest first, so the first bytes and the bytes after a seek
//!    arrive fast; and a second copy of one of the next [`PLAYBACK_HEAD`]
//!    blocks a reader plays once it is late at its first provider (in flight
//!    longer than blocks take), since playback waits on it;
//! 2. other wanted blocks, rarest among known providers first (random among
//!    equals), so a swarm spreads the publisher's upload instead of asking it
//!    for the same block N times;
//! 3. a second copy of a block another provider has had in flight for long:
//!    in the end game (no missing block left that a known provider holds)
//!    after [`ENDGAME_AFTER`], so one slow or vanished provider cannot hold
//!    up the finish; before it, only once the block has taken
//!    [`STUCK_FACTOR`] times as long as blocks have been taking (on slow
//!    lines every block takes seconds: copying each one that took longer
//!    than a fixed delay spent a third of a crowd's downloads on duplicates)
//!    — never a block this provider already has in flight.
//!
//! A download that keeps the item wants every block. One that keeps nothing
//! wants only the blocks within `ram_ahead` of a reader: they wait in memory
//! until read, so that window bounds its memory.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::time::{Duration, Instant};

use libp2p::PeerId;

mod pick;
mod providers;

/// The first pause before a provider that said it does not hold the item is
/// asked again; each further refusal doubles it, up to [`BACKOFF_MAX`].
pub(super) const BACKOFF_FIRST: Duration = Duration::from_secs(2);
/// The longest such pause.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A provider's pause after refusals.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    strikes: u32,
}

/// How many stall limits a download may wait without data while providers
/// keep it in line for their upload slots (a flash crowd on slow uploads).
pub(super) const IN_LINE_FACTOR: u32 = 4;

/// How long a block may be in flight in the end game before an idle
/// provider may duplicate it.
pub(super) const ENDGAME_AFTER: Duration = Duration::from_millis(400);
/// Before the end game, a block in flight this many times as long as blocks
/// take on average is stuck, and may be asked of another provider.
pub(super) const STUCK_FACTOR: u32 = 4;
/// Blocks at the head of a playback window (the next a reader plays) that
/// another provider is asked for as soon as they are late at the first.
pub(super) const PLAYBACK_HEAD: u64 = 2;
/// What counts as stuck before any block has arrived.
pub(super) const STUCK_BEFORE_ANY: Duration = Duration::from_secs(5);
/// A kept download spares its seeds the blocks a known peer holds while
/// peers delivered a block within this long; after it, seeds serve anything.
pub(super) const SEEDS_SPARED_FOR: Duration = Duration::from_secs(3);

/// A block's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Missing,
    /// In flight at this many providers.
    Pending(u8),
    Held,
}

/// What a provider holds.
#[derive(Debug, Clone)]
pub(crate) enum Have {
    Unknown,
    All,
    Some(Vec<bool>),
}

impl Have {
    pub(super) fn has(&self, k: u64) -> bool {
        match self {
            Have::Unknown => false,
            Have::All => true,
            Have::Some(v) => v.get(k as usize).copied().unwrap_or(false),
        }
    }
}

#[derive(Debug, Clone)]
struct Provider {
    have: Have,
    /// In the throttled credit band: used only for blocks that no better
    /// provider holds, and never for a playback window.
    throttled: bool,
    /// Blocks asked of this provider and not yet settled, on any of its
    /// connections.
    asked: HashSet<u64>,
    /// It said it holds the whole item (once: a later refusal of a block
    /// does not make it a peer that is still fetching).
    seed: bool,
    /// A worker is fetching from it now. A provider whose worker ended is
    /// kept with what it last said it held: holdings only grow in a swarm,
    /// so an old `Have` still says where blocks are.
    active: bool,
}

#[derive(Debug, Clone)]
struct Reader {
    id: u64,
    next: u64,
    end: u64,
}

/// The schedule of one download.
#[derive(Debug, Clone)]
pub(crate) struct Sched {
    slots: Vec<Slot>,
    /// When each pending block was first asked for.
    since: Vec<Option<Instant>>,
    /// How many known providers hold each block.
    rarity: Vec<u16>,
    /// How many known providers that are not seeds hold each block.
    shared: Vec<u16>,
    /// When a provider that is not a seed last delivered a new block.
    last_from_peer: Instant,
    readers: Vec<Reader>,
    next_reader: u64,
    /// Blocks ahead of a reader fetched first (playback window).
    window: u64,
    /// Blocks ahead of a reader wanted at all when nothing is kept.
    ram_ahead: u64,
    keep: bool,
    providers: HashMap<PeerId, Provider>,
    /// Providers out of this download (data that did not verify): never
    /// used again here.
    bad: HashSet<PeerId>,
    /// Providers that said they do not hold the item, and until when they
    /// are not asked again.
    backoff: HashMap<PeerId, Backoff>,
    rng: u64,
    last_progress: Instant,
    /// When a provider last told us to wait for an upload slot.
    last_in_line: Option<Instant>,
    held: u64,
    /// Moving average of how long a block is in flight, request to arrival.
    block_time: Option<Duration>,
}

impl Sched {
    pub(crate) fn new(
        blocks: u64,
        window: u64,
        ram_ahead: u64,
        keep: bool,
        seed: u64,
        now: Instant,
    ) -> Self {
        let n = blocks as usize;
        Self {
            slots: vec![Slot::Missing; n],
            since: vec![None; n],
            rarity: vec![0; n],
            shared: vec![0; n],
            last_from_peer: now,
            readers: Vec::new(),
            next_reader: 1,
            window,
            ram_ahead,
            keep,
            providers: HashMap::new(),
            bad: HashSet::new(),
            backoff: HashMap::new(),
            // xorshift is stuck at zero.
            rng: seed | 1,
            last_progress: now,
            last_in_line: None,
            held: 0,
            block_time: None,
        }
    }

    /// How long a block must have been in flight before the end game for
    /// another provider to be asked for it too.
    pub(super) fn stuck_after(&self) -> Duration {
        self.block_time
            .map_or(STUCK_BEFORE_ANY, |t| (t * STUCK_FACTOR).max(ENDGAME_AFTER))
    }

    /// How long the next blocks of a playback may be in flight at one
    /// provider before a second is asked: as long as blocks have been
    /// taking, and at least the end-game delay.
    pub(super) fn late_after(&self) -> Duration {
        self.block_time
            .map_or(ENDGAME_AFTER, |t| t.max(ENDGAME_AFTER))
    }

    /// Whether no wanted block is missing that a known provider holds: only
    /// blocks in flight (or that nobody has) are left.
    fn in_end_game(&self) -> bool {
        !(0..self.slots.len() as u64).any(|k| {
            self.slots[k as usize] == Slot::Missing && self.rarity[k as usize] > 0 && self.wanted(k)
        })
    }

    fn random(&mut self) -> u64 {
        // xorshift: only used to break ties between equally rare blocks.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    pub(super) fn keep(&self) -> bool {
        self.keep
    }

    /// From now on every block is wanted. True if that is news.
    pub(super) fn set_keep(&mut self, now: Instant) -> bool {
        // New demand: the stall clock starts now, not at the last block.
        self.last_progress = now;
        !std::mem::replace(&mut self.keep, true)
    }

    pub(super) fn slot(&self, k: u64) -> Slot {
        self.slots[k as usize]
    }

    /// How many known providers hold block `k`.
    pub(crate) fn rarity(&self, k: u64) -> u16 {
        self.rarity[k as usize]
    }

    /// Readers reading now.
    pub(super) fn readers(&self) -> usize {
        self.readers.len()
    }

    /// Blocks ahead of each reader wanted when nothing is kept (the memory
    /// budget narrows it when memory is short).
    pub(super) fn set_ram_ahead(&mut self, blocks: u64) {
        self.ram_ahead = blocks.max(1);
    }

    /// Whether a worker fetches from `peer` now.
    pub(super) fn is_active(&self, peer: &PeerId) -> bool {
        self.providers.get(peer).is_some_and(|p| p.active)
    }

    /// Whether `peer` said it holds the whole item.
    pub(super) fn is_complete(&self, peer: &PeerId) -> bool {
        self.providers
            .get(peer)
            .is_some_and(|p| matches!(p.have, Have::All))
    }

    pub(super) fn held_blocks(&self) -> u64 {
        self.held
    }

    /// Providers fetched from now.
    pub(super) fn providers(&self) -> Vec<PeerId> {
        self.providers
            .iter()
            .filter(|(_, p)| p.active)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(super) fn has_readers(&self) -> bool {
        !self.readers.is_empty()
    }

    /// A reader of `blocks` starts; returns its id.
    pub(super) fn add_reader(&mut self, blocks: Range<u64>, now: Instant) -> u64 {
        let id = self.next_reader;
        self.next_reader += 1;
        self.readers.push(Reader {
            id,
            next: blocks.start,
            end: blocks.end,
        });
        self.last_progress = now;
        id
    }

    /// A reader has read every block before `next`.
    pub(super) fn advance(&mut self, reader: u64, next: u64) {
        if let Some(r) = self.readers.iter_mut().find(|r| r.id == reader) {
            r.next = next;
        }
    }

    /// A reader is gone; true when none is left.
    pub(super) fn remove_reader(&mut self, reader: u64) -> bool {
        self.readers.retain(|r| r.id != reader);
        self.readers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: u64 = 4;
    const RAM_AHEAD: u64 = 8;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn waiting_in_line_for_upload_slots_is_not_a_stall_for_a_while() {
        let t = Instant::now();
        let limit = Duration::from_secs(30);
        let mut s = Sched::new(4, WINDOW, RAM_AHEAD, true, 1, t);
        let later = t + limit + Duration::from_secs(1);
        assert!(s.stalled(later, limit), "nothing arrived, nobody said wait");
        let mut s = Sched::new(4, WINDOW, RAM_AHEAD, true, 1, t);
        s.in_line(later);
        assert!(!s.stalled(later, limit));
        // Told to wait, but long ago: a stall after all.
        assert!(s.stalled(later + limit + Duration::from_secs(1), limit));
        // Kept in line all along: a stall only after IN_LINE_FACTOR limits.
        let end = t + limit * IN_LINE_FACTOR;
        s.in_line(end);
        assert!(!s.stalled(end, limit));
        s.in_line(end + Duration::from_secs(1));
        assert!(s.stalled(end + Duration::from_secs(1), limit));
    }

    #[test]
    fn a_late_block_at_the_head_of_playback_is_asked_of_a_second_provider() {
        let t0 = Instant::now();
        let (slow, fast, third) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut s = Sched::new(16, WINDOW, RAM_AHEAD, false, 3, t0);
        s.add_reader(0..16, t0);
        for p in [slow, fast, third] {
            s.set_have(p, Have::All);
        }
        assert_eq!(s.pick(&slow, t0, true), Some(0));
        // Not late yet: the next provider takes the next missing block.
        assert_eq!(s.pick(&fast, t0, true), Some(1));
        // Blocks take 200 ms; block 0 has been at `slow` for 800 ms.
        assert!(s.hold(fast, 1, t0 + ENDGAME_AFTER / 2));
        let late = t0 + 2 * ENDGAME_AFTER;
        // `fast` copies it before any missing block, and `slow` is never
        // asked for it twice.
        assert_eq!(s.pick(&fast, late, true), Some(0));
        assert_eq!(s.slot(0), Slot::Pending(2));
        assert_eq!(s.pick(&slow, late, true), Some(2));
        assert_eq!(s.pick(&third, late, true), Some(3));
        // Blocks 2 and 3 are late too, but past the head of playback (0-1):
        // a missing block goes first.
        let later = late + 2 * ENDGAME_AFTER;
        assert_eq!(s.pick(&fast, later, true), Some(4));
        // Playback moves on: 2 is at its head now and late at `slow`.
        assert!(s.hold(fast, 0, later));
        s.advance(1, 2);
        assert_eq!(s.pick(&third, later, true), Some(2));
        // A provider that may not serve playback windows never copies one.
        assert_eq!(s.pick(&slow, later, false), Some(5));
    }

    #[test]
    fn the_end_game_never_asks_one_peer_twice_for_a_block() {
        let t0 = Instant::now();
        let (slow, other) = (PeerId::random(), PeerId::random());
        let mut s = Sched::new(1, WINDOW, RAM_AHEAD, true, 7, t0);
        s.set_have(slow, Have::All);
        s.set_have(other, Have::All);
        assert_eq!(s.pick(&slow, t0, true), Some(0));
        let later = t0 + 2 * ENDGAME_AFTER;
        // Held up past the end-game delay, `slow` is not asked again...
        assert_eq!(s.pick(&slow, later, true), None);
        // ...but another peer may take a second copy, not before the delay.
        assert_eq!(s.pick(&other, t0 + ENDGAME_AFTER / 2, true), None);
        assert_eq!(s.pick(&other, later, true), Some(0));
        assert_eq!(s.slot(0), Slot::Pending(2));
        assert!(s.hold(other, 0, later));
        s.release(slow, 0);
        assert_eq!(s.slot(0), Slot::Held);
        assert!(s.satisfied());
    }

    #[test]
    fn before_the_end_game_only_a_stuck_block_is_copied() {
        // Blocks take 2 s each (a slow line): a block 1 s in flight is not
        // copied while others are missing, one 4 blocks' time in flight is.
        let t0 = Instant::now();
        let (slow, partial) = (PeerId::random(), PeerId::random());
        let mut s = Sched::new(8, WINDOW, RAM_AHEAD, true, 5, t0);
        s.set_have(slow, Have::All);
        let first = s.pick(&slow, t0, true).expect("a block");
        let t1 = t0 + Duration::from_secs(2);
        assert!(s.hold(slow, first, t1));
        assert_eq!(s.stuck_after(), Duration::from_secs(8));
        let stuck = s.pick(&slow, t1, true).expect("a block");
        // `partial` holds `stuck` and one block nobody has asked for.
        let other = (0..8)
            .find(|k| *k != first && *k != stuck)
            .expect("another");
        let mut bits = vec![false; 8];
        bits[stuck as usize] = true;
        bits[other as usize] = true;
        s.set_have(partial, Have::Some(bits.clone()));
        assert_eq!(s.pick(&partial, t1, true), Some(other));
        // Nothing else `partial` holds is missing, but other blocks are (at
        // `slow`): not the end game, so no copy after a mere second...
        assert_eq!(s.pick(&partial, t1 + Duration::from_secs(1), true), None);
        // ...only once it has taken four times what blocks take.
        assert_eq!(
            s.pick(&partial, t1 + Duration::from_secs(9), true),
            Some(stuck)
        );
        assert_eq!(s.slot(stuck), Slot::Pending(2));
    }

    #[test]
    fn a_seed_is_spared_what_a_peer_holds_while_peers_deliver() {
        let t0 = Instant::now();
        let (seed, peer) = (PeerId::random(), PeerId::random());
        let mut s = Sched::new(4, WINDOW, RAM_AHEAD, true, 3, t0);
        s.set_have(seed, Have::All);
        s.set_have(peer, Have::Some(vec![true, true, true, false]));
        // Block 3 is the seed's alone: the only one it is asked for.
        assert_eq!(s.pick(&seed, t0, true), Some(3));
        assert_eq!(s.pick(&seed, t0, true), None);
        let k = s.pick(&peer, t0, true).expect("a block");
        let t1 = t0 + Duration::from_secs(1);
        assert!(s.hold(peer, k, t1));
        assert_eq!(s.pick(&seed, t1 + SEEDS_SPARED_FOR / 2, true), None);
        // Peers have delivered nothing for a while: the seed serves the rest.
        let late = t1 + SEEDS_SPARED_FOR;
        let got = s.pick(&seed, late, true).expect("a block");
        assert!(got < 3 && got != k);
        // A download that keeps nothing (a stream) never spares seeds.
        let mut s = Sched::new(4, WINDOW, RAM_AHEAD, false, 3, t0);
        s.add_reader(0..4, t0);
        s.set_have(seed, Have::All);
        s.set_have(peer, Have::All);
        s.set_have(peer, Have::Some(vec![true; 4]));
        assert!(s.pick(&seed, t0, false).is_some());
    }

    #[test]
    fn what_a_provider_held_outlives_its_worker() {
        let t0 = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut s = Sched::new(4, WINDOW, RAM_AHEAD, true, 3, t0);
        s.set_have(a, Have::Some(vec![true, false, false, false]));
        s.set_have(b, Have::Some(vec![true, true, false, false]));
        assert_eq!(s.pick(&a, t0, true), Some(0));
        assert_eq!(s.retire_peer(&a), 1, "its request goes back to the pool");
        assert_eq!(s.slot(0), Slot::Missing);
        assert_eq!(s.rarity(0), 2, "what it held still counts");
        assert_eq!(s.known_useful(), vec![a]);
        assert!(!s.is_active(&a) && s.is_active(&b));
        assert_eq!(s.providers(), vec![b]);
        // Its worker starts again and says what it holds now.
        s.set_have(a, Have::Some(vec![true, false, true, false]));
        assert!(s.is_active(&a) && s.known_useful().is_empty());
        assert_eq!(s.rarity(2), 1);
        // A provider whose data did not verify is forgotten with its holdings.
        s.mark_bad(a);
        assert_eq!((s.rarity(0), s.rarity(2)), (1, 0));
        assert!(s.known_useful().is_empty() && s.providers() == vec![b]);
    }

    #[test]
    fn a_swarm_finishes_despite_a_provider_that_never_answers() {
        // Simulated time: each live provider answers one block per 10 ms;
        // the first takes requests and never answers.
        let t0 = Instant::now();
        let ps = peers(3);
        let mut s = Sched::new(64, WINDOW, RAM_AHEAD, true, 11, t0);
        for p in &ps {
            s.set_have(*p, Have::All);
        }
        let mut now = t0;
        let mut inflight: HashMap<PeerId, Vec<u64>> = HashMap::new();
        for step in 0..10_000 {
            if s.satisfied() {
                // The dead provider held up at most one block per request.
                assert!(step < 200, "took {step} steps");
                return;
            }
            for p in &ps {
                let q = inflight.entry(*p).or_default();
                while q.len() < 4
                    && let Some(k) = s.pick(p, now, true)
                {
                    q.push(k);
                }
            }
            for p in &ps[1..] {
                let q = inflight.get_mut(p).expect("asked");
                if !q.is_empty() {
                    let k = q.remove(0);
                    s.hold(*p, k, now);
                }
            }
            now += Duration::from_millis(10);
        }
        panic!("never finished: {} of 64 held", s.held_blocks());
    }

    #[test]
    fn a_complete_provider_refusing_a_block_is_not_asked_for_it_again() {
        // A peer that claims the whole item and answers "not held" must not
        // take the block back at once, over and over, keeping it from the
        // honest peer and its end-game clock from ever starting.
        let t0 = Instant::now();
        let (liar, honest) = (PeerId::random(), PeerId::random());
        let mut s = Sched::new(2, WINDOW, RAM_AHEAD, true, 3, t0);
        s.set_have(liar, Have::All);
        s.set_have(honest, Have::All);
        let k = s.pick(&liar, t0, true).expect("a block");
        s.not_held(liar, k);
        assert_eq!(s.slot(k), Slot::Missing);
        let other = s.pick(&liar, t0, true).expect("the other block");
        assert_ne!(other, k, "asked again for the block it refused");
        assert_eq!(s.pick(&liar, t0, true), None);
        // The honest peer gets it, and rarity counts the liar out of it.
        assert_eq!(s.pick(&honest, t0, true), Some(k));
        assert_eq!(s.rarity[k as usize], 1);
        assert_eq!(s.rarity[other as usize], 2);
        // A new `Have` that claims the block again makes it askable again.
        s.set_have(liar, Have::All);
        assert_eq!(s.rarity[k as usize], 2);
    }

    #[test]
    fn a_provider_without_the_item_backs_off_for_a_while_not_for_good() {
        let t0 = Instant::now();
        let (p, other) = (PeerId::random(), PeerId::random());
        let mut s = Sched::new(4, WINDOW, RAM_AHEAD, true, 7, t0);
        assert!(s.back_off(p, t0), "the first refusal is the charged one");
        assert!(s.excluded(&p, t0));
        assert!(!s.excluded(&other, t0));
        assert!(s.excluded(&p, t0 + BACKOFF_FIRST - Duration::from_millis(1)));
        assert!(
            !s.excluded(&p, t0 + BACKOFF_FIRST),
            "asked again after the pause"
        );
        // Each refusal doubles the pause, up to the cap; none is charged again.
        let t1 = t0 + BACKOFF_FIRST;
        assert!(!s.back_off(p, t1));
        assert!(s.excluded(&p, t1 + BACKOFF_FIRST));
        assert!(!s.excluded(&p, t1 + 2 * BACKOFF_FIRST));
        let mut t = t1;
        for _ in 0..40 {
            s.back_off(p, t);
            t += BACKOFF_MAX;
        }
        assert!(!s.excluded(&p, t), "the pause is capped");
        // A provider that only had no stream for us pauses as briefly, and
        // its first real refusal is still the charged one.
        let q = PeerId::random();
        s.pause(q, t0);
        assert!(s.excluded(&q, t0));
        assert!(!s.excluded(&q, t0 + BACKOFF_FIRST));
        assert!(s.back_off(q, t0 + BACKOFF_FIRST), "no strike from a pause");
        // Bad data, unlike a refusal, is for good.
        s.mark_bad(other);
        assert!(s.excluded(&other, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn a_provider_that_left_a_request_unanswered_waits_for_its_verdict() {
        let t0 = Instant::now();
        let p = PeerId::random();
        let mut s = Sched::new(4, WINDOW, RAM_AHEAD, true, 7, t0);
        let verdict = t0 + Duration::from_secs(30);
        s.hold_off(p, verdict);
        // Well past the pause of a provider without the item.
        assert!(s.excluded(&p, t0 + 2 * BACKOFF_FIRST));
        assert!(s.excluded(&p, verdict - Duration::from_millis(1)));
        assert!(!s.excluded(&p, verdict), "a slow peer is asked again");
        // A shorter pause later does not cut the wait short.
        let q = PeerId::random();
        s.hold_off(q, verdict);
        s.pause(q, t0);
        assert!(s.excluded(&q, t0 + 2 * BACKOFF_FIRST));
        // Its first "not here" afterwards is still the charged one.
        assert!(s.back_off(q, verdict));
    }

    /// One step of a download's life, as workers and readers report it.
    #[derive(Debug, Clone)]
    enum Op {
        Have {
            peer: usize,
            bits: Option<Vec<bool>>,
        },
        Throttle {
            peer: usize,
        },
        Pick {
            peer: usize,
            urgent: bool,
        },
        /// Settle one of a peer's requests: held, released or not held.
        Answer {
            peer: usize,
            nth: usize,
            how: u8,
        },
        Forget {
            peer: usize,
        },
        Retire {
            peer: usize,
        },
        AddReader {
            start: u64,
            len: u64,
        },
        Advance {
            nth: usize,
            by: u64,
        },
        RemoveReader {
            nth: usize,
        },
        /// Drop held blocks outside every window (what a streaming download
        /// does with its memory).
        Evict,
        Keep,
        Tick {
            ms: u64,
        },
        /// The memory budget narrows (or widens) the readers' windows.
        Narrow {
            blocks: u64,
        },
    }

    const BLOCKS: u64 = 10;
    const PEERS: usize = 4;

    fn op() -> impl Strategy<Value = Op> {
        let peer = 0..PEERS;
        prop_oneof![
            1 => (
                peer.clone(),
                proptest::option::of(proptest::collection::vec(any::<bool>(), BLOCKS as usize))
            )
                .prop_map(|(peer, bits)| Op::Have { peer, bits }),
            1 => peer.clone().prop_map(|peer| Op::Throttle { peer }),
            4 => (peer.clone(), any::<bool>()).prop_map(|(peer, urgent)| Op::Pick { peer, urgent }),
            4 => (peer.clone(), 0..8usize, 0..3u8)
                .prop_map(|(peer, nth, how)| Op::Answer { peer, nth, how }),
            1 => peer.clone().prop_map(|peer| Op::Forget { peer }),
            1 => peer.clone().prop_map(|peer| Op::Retire { peer }),
            1 => (0..BLOCKS, 1..BLOCKS).prop_map(|(start, len)| Op::AddReader { start, len }),
            1 => (0..4usize, 0..6u64).prop_map(|(nth, by)| Op::Advance { nth, by }),
            1 => (0..4usize).prop_map(|nth| Op::RemoveReader { nth }),
            1 => Just(Op::Evict),
            1 => Just(Op::Keep),
            1 => (0..900u64).prop_map(|ms| Op::Tick { ms }),
            1 => (1..=RAM_AHEAD).prop_map(|blocks| Op::Narrow { blocks }),
        ]
    }

    /// What must hold after every step.
    fn check_invariants(s: &Sched) -> Result<(), TestCaseError> {
        for k in 0..BLOCKS {
            let holders = s.providers.values().filter(|p| p.have.has(k)).count();
            prop_assert_eq!(s.rarity[k as usize] as usize, holders, "rarity of {}", k);
            let peers = s
                .providers
                .values()
                .filter(|p| !p.seed && p.have.has(k))
                .count();
            prop_assert_eq!(s.shared[k as usize] as usize, peers, "peers holding {}", k);
            let asked = s
                .providers
                .values()
                .filter(|p| p.asked.contains(&k))
                .count();
            match s.slot(k) {
                Slot::Missing => prop_assert_eq!(asked, 0, "missing {} yet asked", k),
                Slot::Pending(n) => prop_assert_eq!(n as usize, asked, "pending count of {}", k),
                Slot::Held => {}
            }
            prop_assert_eq!(
                s.since[k as usize].is_some(),
                matches!(s.slot(k), Slot::Pending(_)),
                "request clock of {}",
                k
            );
        }
        let held = s.slots.iter().filter(|x| **x == Slot::Held).count() as u64;
        prop_assert_eq!(s.held, held);
        Ok(())
    }

    /// Whether `k` is one of the next [`PLAYBACK_HEAD`] blocks some reader
    /// plays.
    fn at_playback_head(s: &Sched, k: u64) -> bool {
        s.readers.iter().any(|r| {
            let window_end = (r.next + s.window.min(s.ram_ahead)).min(r.end);
            r.next <= k && k < (r.next + PLAYBACK_HEAD).min(window_end)
        })
    }

    /// What must hold of one pick, given the schedule before it.
    fn check_pick(
        before: &Sched,
        peer: &PeerId,
        urgent: bool,
        now: Instant,
        got: Option<u64>,
    ) -> Result<(), TestCaseError> {
        let Some(p) = before.providers.get(peer) else {
            prop_assert_eq!(got, None);
            return Ok(());
        };
        let better_has = |k: u64| {
            p.throttled
                && before
                    .providers
                    .values()
                    .any(|o| o.active && !o.throttled && o.have.has(k))
        };
        // A seed is spared what a peer holds while peers deliver.
        let spared = |k: u64| {
            p.seed && before.keep && before.sparing_seeds(now) && before.shared[k as usize] > 0
        };
        let eligible_missing: Vec<u64> = (0..BLOCKS)
            .filter(|k| {
                before.slot(*k) == Slot::Missing
                    && p.have.has(*k)
                    && before.wanted(*k)
                    && !better_has(*k)
                    && !spared(*k)
            })
            .collect();
        let Some(k) = got else {
            // Never idle while there is a block this peer could fetch.
            prop_assert!(
                eligible_missing.is_empty(),
                "no pick though {:?} are missing and held by the peer",
                eligible_missing
            );
            return Ok(());
        };
        prop_assert!(p.have.has(k), "picked {} the peer does not hold", k);
        prop_assert!(!p.asked.contains(&k), "asked the same peer twice for {}", k);
        prop_assert!(before.slot(k) != Slot::Held, "picked held block {}", k);
        let in_playback = before
            .readers
            .iter()
            .any(|r| r.next <= k && k < (r.next + before.window.min(before.ram_ahead)).min(r.end));
        if !in_playback || !urgent || p.throttled {
            prop_assert!(before.wanted(k), "picked {} nobody wants", k);
            prop_assert!(
                !better_has(k),
                "a throttled peer got {} a better one holds",
                k
            );
            prop_assert!(!spared(k), "a seed got {} a peer holds", k);
        }
        match before.slot(k) {
            Slot::Pending(n) => {
                // A duplicate: only of a single copy; of the next blocks a
                // reader plays once late, else only when this peer has
                // nothing missing to fetch, and not early.
                prop_assert_eq!(n, 1);
                let since = before.since[k as usize].expect("pending has a clock");
                let age = now.saturating_duration_since(since);
                let late_head = urgent
                    && !p.throttled
                    && at_playback_head(before, k)
                    && age > before.late_after();
                if late_head {
                    return Ok(());
                }
                prop_assert!(
                    eligible_missing.is_empty(),
                    "duplicated {} while blocks were missing",
                    k
                );
                let fetchable_elsewhere = (0..BLOCKS).any(|j| {
                    before.slot(j) == Slot::Missing
                        && before.wanted(j)
                        && before.rarity[j as usize] > 0
                });
                let limit = if fetchable_elsewhere {
                    before.stuck_after()
                } else {
                    ENDGAME_AFTER
                };
                prop_assert!(limit >= ENDGAME_AFTER);
                prop_assert!(
                    age > limit,
                    "duplicated {} early ({:?} <= {:?})",
                    k,
                    age,
                    limit
                );
            }
            Slot::Missing if !(urgent && in_playback) => {
                // Rarest first (the scan stops at the first block held by one peer).
                let rarest = eligible_missing
                    .iter()
                    .map(|k| before.rarity[*k as usize])
                    .min()
                    .unwrap_or(0);
                prop_assert!(
                    before.rarity[k as usize] <= rarest.max(1),
                    "{} is not among the rarest",
                    k
                );
            }
            _ => {}
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_schedule_keeps_its_invariants(
            seed in any::<u64>(),
            keep in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..160),
        ) {
            let ids = peers(PEERS);
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = Sched::new(BLOCKS, WINDOW, RAM_AHEAD, keep, seed, t0);
            let mut readers: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    Op::Have { peer, bits } => {
                        s.set_have(ids[peer], bits.map_or(Have::All, Have::Some));
                    }
                    Op::Throttle { peer } => s.set_throttled(ids[peer]),
                    Op::Pick { peer, urgent } => {
                        let before = s.clone();
                        let got = s.pick(&ids[peer], now, urgent);
                        check_pick(&before, &ids[peer], urgent, now, got)?;
                    }
                    Op::Answer { peer, nth, how } => {
                        let asked: Vec<u64> = s
                            .providers
                            .get(&ids[peer])
                            .map(|p| { let mut v: Vec<u64> = p.asked.iter().copied().collect(); v.sort_unstable(); v })
                            .unwrap_or_default();
                        if let Some(k) = asked.get(nth % asked.len().max(1)).copied() {
                            match how {
                                // A block that keeps nothing is dropped
                                // when no reader wants it any more.
                                0 if s.keep() || s.in_window(k) => { s.hold(ids[peer], k, now); }
                                0 | 1 => s.release(ids[peer], k),
                                _ => s.not_held(ids[peer], k),
                            }
                        }
                    }
                    Op::Forget { peer } => s.forget_peer(&ids[peer]),
                    Op::Retire { peer } => { s.retire_peer(&ids[peer]); }
                    Op::AddReader { start, len } => {
                        readers.push(s.add_reader(start..(start + len).min(BLOCKS), now));
                    }
                    Op::Advance { nth, by } => {
                        if let Some(r) = readers.get(nth % readers.len().max(1)).copied()
                            && let Some(rd) = s.readers.iter().find(|x| x.id == r)
                        {
                            let next = (rd.next + by).min(rd.end);
                            s.advance(r, next);
                        }
                    }
                    Op::RemoveReader { nth } => {
                        if !readers.is_empty() {
                            let r = readers.remove(nth % readers.len());
                            s.remove_reader(r);
                        }
                    }
                    Op::Evict => {
                        if !s.keep() {
                            for k in 0..BLOCKS {
                                if s.slot(k) == Slot::Held && !s.in_window(k) {
                                    s.unhold(k, now);
                                }
                            }
                            // Memory holds only what some reader will read soon.
                            for k in 0..BLOCKS {
                                prop_assert!(s.slot(k) != Slot::Held || s.in_window(k));
                            }
                            prop_assert!(s.held <= s.readers.len() as u64 * s.ram_ahead);
                        }
                    }
                    Op::Keep => { s.set_keep(now); }
                    Op::Tick { ms } => now += Duration::from_millis(ms),
                    Op::Narrow { blocks } => s.set_ram_ahead(blocks),
                }
                check_invariants(&s)?;
            }
        }
    }
}
