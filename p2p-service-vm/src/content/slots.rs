//! Upload slots: how many peers this node sends blocks to at once (what
//! BitTorrent calls unchoking).
//!
//! Serving every asker at once splits the upload among all of them: in a
//! flash crowd of 59 peers on a 4 Mbit/s line each got a 256 KiB block only
//! after ~30 s, their requests timed out, and the bytes already sent were
//! wasted (48 of 59 downloads failed "no verified data for 30s"). With a few
//! slots, the few peers served get whole blocks fast and pass them on to the
//! others, who are told at once that they must wait ([`Status::Busy`]) and ask
//! someone else meanwhile.
//!
//! A peer keeps its slot while it keeps asking, for a turn of [`TURN`] when
//! others wait (a few blocks: the shorter the turn, the sooner every waiting
//! peer has something to pass on); then the peer that has waited longest gets it. A slot whose
//! holder stops asking for [`IDLE`] is free again.
//!
//! How many slots a line has room for depends on its upload rate. Few users
//! know theirs, so an upload without a configured cap is measured: while
//! peers wait, the best rate sent over a [`RATE_WINDOW`] sizes the slots
//! (a block a second each, plus one). A window that sent less lowers that
//! best rate only by a quarter: holders that ask for little must not talk
//! the line down to one slot, which sent less again, and so on. With a fixed eight, a 2 Mbit/s line
//! served eight peers at a block every eight seconds each, answers outlived
//! the askers' patience (15 s) and most of what it sent was thrown away; on
//! 60 home lines that took the crowd from 86-94 s to 63 s.
//!
//! [`Status::Busy`]: p2pvm_content::transfer::Status::Busy

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// How long a slot is held while others wait.
pub(crate) const TURN: Duration = Duration::from_secs(3);
/// A holder that asks for nothing for this long gives its slot up.
pub(crate) const IDLE: Duration = Duration::from_secs(2);
/// A waiting peer that has not asked again for this long is no longer waiting
/// (a downloader asks a busy provider again within a second or two).
const FORGET: Duration = Duration::from_secs(15);
/// A waiting peer keeps its place in line for [`FORGET`], but holds a free
/// slot back from others only while it keeps asking (a downloader told to
/// wait asks again after half a second). On 60 home lines, peers that had
/// gone elsewhere held free slots back for their whole 15 s: lines of
/// 16-19 Mbit/s answered "busy" hundreds of times while sending a block
/// every two seconds.
const ASKING: Duration = Duration::from_millis(1200);
/// Slots a measured line keeps whatever it sent: a holder takes a block at a
/// time, as fast as its own download allows while it fetches from a handful
/// of others, so what leaves a line while few peers hold its slots says more
/// of the holders than of the line. Four holders of a 2 Mbit/s line wait about
/// four seconds for a block, well within their patience.
const MIN_MEASURED: usize = 4;
/// What a window's measured rate keeps of the line's best one when the
/// window sent less while peers waited: a line's speed changes slowly, and a
/// quiet window mostly means the slot holders asked for little.
const PEAK_DECAY: f64 = 0.75;

#[derive(Debug, Clone, Copy)]
struct Holder {
    since: Instant,
    last: Instant,
}

/// How long the upload is measured before the slots are sized again.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(4);

#[derive(Debug)]
struct State {
    holders: HashMap<PeerId, Holder>,
    /// Peers told to wait: when they were first told, and last asked.
    waiting: HashMap<PeerId, (Instant, Instant)>,
    /// Slots now: `max` unless the measured rate says fewer.
    limit: usize,
    /// The best rate measured in a window in which peers waited, decayed
    /// by [`PEAK_DECAY`] in each such window that sent less.
    peak: Option<f64>,
    /// Bytes sent since `window_start`, and whether peers waited meanwhile.
    window_start: Instant,
    window_bytes: u64,
    window_contended: bool,
}

/// The node's upload slots.
#[derive(Debug)]
pub(crate) struct UploadSlots {
    max: usize,
    /// Whether the rate is measured (no configured cap).
    measured: bool,
    state: Mutex<State>,
}

/// The least upload rate a slot should get: one block a second. A slower
/// share makes each holder wait seconds for every block, and blocks spread
/// through the swarm that much later.
const SLOT_RATE: u64 = p2pvm_content::BLOCK_BYTES;

impl UploadSlots {
    /// `max` slots (at least one), fewer on a capped upload: as many as give
    /// each a block a second (`upload_rate` 0: uncapped).
    pub(crate) fn new(max: usize, upload_rate: u64) -> Self {
        let by_rate = match upload_rate {
            0 => max,
            r => usize::try_from(r / SLOT_RATE).unwrap_or(usize::MAX),
        };
        let max = max.min(by_rate).max(1);
        Self {
            max,
            measured: upload_rate == 0,
            state: Mutex::new(State {
                holders: HashMap::new(),
                waiting: HashMap::new(),
                limit: max,
                peak: None,
                window_start: Instant::now(),
                window_bytes: 0,
                window_contended: false,
            }),
        }
    }

    /// `bytes` of blocks were sent (handed to the connection, which takes
    /// them no faster than the line does).
    pub(crate) fn sent(&self, bytes: u64, now: Instant) {
        if !self.measured {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.window_bytes += bytes;
        self.measure(&mut st, now);
    }

    /// Closes the rate window once it is [`RATE_WINDOW`] long and sizes the
    /// slots by the line's best recent rate: one per block a second, plus
    /// one (room for a faster line to show). Called as blocks leave and as
    /// peers ask, so a window in which nothing left still closes.
    fn measure(&self, st: &mut State, now: Instant) {
        let elapsed = now.saturating_duration_since(st.window_start);
        if !self.measured || elapsed < RATE_WINDOW {
            return;
        }
        if st.window_contended {
            let rate = st.window_bytes as f64 / elapsed.as_secs_f64();
            let peak = st.peak.map_or(rate, |p| rate.max(p * PEAK_DECAY));
            st.peak = Some(peak);
            st.limit = ((peak / SLOT_RATE as f64).round() as usize + 1)
                .clamp(MIN_MEASURED.min(self.max), self.max);
        } else if st.peak.is_none() {
            // Nobody waited: the slots were never the limit.
            st.limit = self.max;
        }
        st.window_start = now;
        st.window_bytes = 0;
        st.window_contended = false;
    }

    /// Slots now.
    #[cfg(test)]
    fn limit(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limit
    }

    /// Whether `peer` may have a block sent now. A `false` puts it in line.
    pub(crate) fn admit(&self, peer: PeerId, now: Instant) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.measure(&mut st, now);
        let limit = st.limit;
        let State {
            holders,
            waiting,
            window_contended,
            ..
        } = &mut *st;
        holders.retain(|_, h| now.saturating_duration_since(h.last) < IDLE);
        waiting.retain(|_, (_, last)| now.saturating_duration_since(*last) < FORGET);
        let others_wait = waiting.keys().any(|p| *p != peer);
        if let Some(h) = holders.get_mut(&peer) {
            if others_wait && now.saturating_duration_since(h.since) >= TURN {
                holders.remove(&peer);
                waiting.insert(peer, (now, now));
                return false;
            }
            h.last = now;
            return true;
        }
        let line = waiting.entry(peer).or_insert((now, now));
        line.1 = now;
        let mine = line.0;
        // Free slots go to those who waited longest and still ask.
        let ahead = waiting
            .values()
            .filter(|(first, last)| *first < mine && now.saturating_duration_since(*last) < ASKING)
            .count();
        if holders.len() + ahead < limit {
            waiting.remove(&peer);
            holders.insert(
                peer,
                Holder {
                    since: now,
                    last: now,
                },
            );
            return true;
        }
        *window_contended = true;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn at_most_max_peers_are_served_and_the_rest_wait() {
        let slots = UploadSlots::new(2, 0);
        let p = peers(3);
        let t = Instant::now();
        assert!(slots.admit(p[0], t));
        assert!(slots.admit(p[1], t));
        assert!(!slots.admit(p[2], t));
        // Holders keep asking within their turn and keep their slots.
        assert!(slots.admit(p[0], t + Duration::from_secs(1)));
        assert!(!slots.admit(p[2], t + Duration::from_secs(1)));
    }

    #[test]
    fn a_holder_that_stops_asking_frees_its_slot() {
        let slots = UploadSlots::new(1, 0);
        let p = peers(2);
        let t = Instant::now();
        assert!(slots.admit(p[0], t));
        assert!(!slots.admit(p[1], t));
        assert!(slots.admit(p[1], t + IDLE));
        assert!(!slots.admit(p[0], t + IDLE));
    }

    #[test]
    fn turns_pass_to_the_longest_waiting_peer() {
        let slots = UploadSlots::new(1, 0);
        let p = peers(3);
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        assert!(slots.admit(p[0], t));
        assert!(!slots.admit(p[1], at(1000)));
        assert!(slots.admit(p[0], at(1500)));
        assert!(!slots.admit(p[2], at(2000)));
        // All keep asking, as a downloader told to wait does.
        assert!(slots.admit(p[0], at(2500)));
        assert!(!slots.admit(p[1], at(2500)));
        assert!(!slots.admit(p[2], at(2500)));
        // p0's turn is over: it must wait, and the slot goes to p1, who
        // waited longer than p2, not to whoever asks first.
        let over = t + TURN;
        assert!(!slots.admit(p[0], over));
        assert!(!slots.admit(p[2], over));
        assert!(slots.admit(p[1], over));
        assert!(!slots.admit(p[2], over + Duration::from_millis(1)));
    }

    #[test]
    fn a_capped_upload_has_a_slot_per_block_a_second() {
        let block = p2pvm_content::BLOCK_BYTES;
        assert_eq!(UploadSlots::new(8, 0).max, 8);
        assert_eq!(UploadSlots::new(8, 2 * block).max, 2);
        assert_eq!(UploadSlots::new(8, 100 * block).max, 8);
        assert_eq!(UploadSlots::new(8, block / 2).max, 1);
    }

    #[test]
    fn an_uncapped_upload_sizes_its_slots_by_what_it_sends_while_peers_wait() {
        let block = p2pvm_content::BLOCK_BYTES;
        let slots = UploadSlots::new(8, 0);
        let p = peers(10);
        let t = Instant::now();
        for q in &p {
            slots.admit(*q, t);
        }
        // Five blocks a second leave while peers wait: six slots.
        for s in 1..=RATE_WINDOW.as_secs() {
            slots.sent(5 * block + block / 5, t + Duration::from_secs(s));
        }
        assert_eq!(slots.limit(), 6);
        // Once the old holders have gone idle, six are served at once.
        let later = t + RATE_WINDOW + IDLE;
        for q in [p[8], p[9], p[0], p[1], p[2], p[3]] {
            assert!(slots.admit(q, later));
        }
        assert!(!slots.admit(p[4], later));
        // That window sent one block in six seconds while p4 waited: it
        // keeps 5.2 x 0.75 = 3.9 blocks a second, five slots. A window with
        // nobody waiting says nothing of the line: the slots stay.
        let quiet = later + RATE_WINDOW;
        slots.sent(block, quiet);
        assert_eq!(slots.limit(), 5);
        slots.sent(block, quiet + RATE_WINDOW);
        assert_eq!(slots.limit(), 5);
        // Each window that sends nothing while peers wait lowers them by a
        // quarter (2.9 blocks a second: four), but never below four.
        let mut t = quiet + RATE_WINDOW;
        for _ in 0..2 {
            for q in &p {
                slots.admit(*q, t);
            }
            t += RATE_WINDOW;
            slots.sent(0, t);
            assert_eq!(slots.limit(), 4);
        }
        // A faster window raises them at once.
        for q in &p {
            slots.admit(*q, t);
        }
        slots.sent(6 * RATE_WINDOW.as_secs() * block, t + RATE_WINDOW);
        assert_eq!(slots.limit(), 7);
        // A capped upload knows its rate and is not measured.
        let capped = UploadSlots::new(8, 2 * block);
        capped.admit(p[0], t);
        capped.admit(p[1], t);
        capped.admit(p[2], t);
        capped.sent(1, t + RATE_WINDOW);
        assert_eq!(capped.limit(), 2);
    }

    #[test]
    fn a_waiter_that_stopped_asking_holds_no_free_slot_back() {
        let slots = UploadSlots::new(1, 0);
        let p = peers(3);
        let t = Instant::now();
        assert!(slots.admit(p[0], t));
        // p1 is told to wait, then goes elsewhere.
        assert!(!slots.admit(p[1], t));
        // The holder leaves; p2 comes while p1 has not asked for a while.
        let later = t + IDLE + ASKING;
        assert!(slots.admit(p[2], later));
        // p2 keeps asking through its turn.
        let mut now = later;
        while now < later + TURN {
            now += Duration::from_millis(500);
            slots.admit(p[2], now);
        }
        // p1 comes back within its place in line and gets the next turn.
        assert!(slots.admit(p[1], now + Duration::from_millis(1)));
    }

    #[test]
    fn a_line_that_sends_nothing_while_peers_wait_still_resizes() {
        let block = p2pvm_content::BLOCK_BYTES;
        let slots = UploadSlots::new(8, 0);
        let p = peers(12);
        let t = Instant::now();
        for q in &p {
            slots.admit(*q, t);
        }
        slots.sent(8 * RATE_WINDOW.as_secs() * block, t + RATE_WINDOW);
        assert_eq!(slots.limit(), 8);
        // Its holders keep their slots and ask, others wait, and nothing
        // leaves: the windows close on the askers' calls alone, and the
        // slots shrink step by step, not at once.
        let mut now = t + RATE_WINDOW;
        let mut limits = Vec::new();
        for _ in 0..3 {
            for _ in 0..(RATE_WINDOW.as_millis() / 500) {
                now += Duration::from_millis(500);
                for q in &p {
                    slots.admit(*q, now);
                }
            }
            limits.push(slots.limit());
        }
        assert!(limits.windows(2).all(|w| w[1] < w[0]), "{limits:?}");
        assert!(limits[0] >= 6 && limits[2] >= 3, "{limits:?}");
    }

    #[test]
    fn a_lone_peer_keeps_its_slot_past_its_turn() {
        let slots = UploadSlots::new(1, 0);
        let p = PeerId::random();
        let t = Instant::now();
        for s in 0..30 {
            assert!(slots.admit(p, t + Duration::from_secs(s)));
        }
    }
}
