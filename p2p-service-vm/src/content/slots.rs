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
//! peers wait, what was sent over the last [`RATE_WINDOW`] sizes the slots
//! (a block a second each, plus one). With a fixed eight, a 2 Mbit/s line
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
        let elapsed = now.saturating_duration_since(st.window_start);
        if elapsed < RATE_WINDOW {
            return;
        }
        st.limit = if st.window_contended {
            let rate = st.window_bytes as f64 / elapsed.as_secs_f64();
            // One more than the rate fills: room for a faster line to show.
            ((rate / SLOT_RATE as f64).round() as usize + 1).clamp(1, self.max)
        } else {
            self.max
        };
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
        // Free slots go to those who waited longest.
        let ahead = waiting.values().filter(|(first, _)| *first < mine).count();
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
        assert!(slots.admit(p[0], t));
        assert!(!slots.admit(p[1], t + Duration::from_secs(1)));
        assert!(!slots.admit(p[2], t + Duration::from_secs(2)));
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
        // Two blocks a second leave while peers wait: three slots.
        for s in 1..=RATE_WINDOW.as_secs() {
            slots.sent(2 * block, t + Duration::from_secs(s));
        }
        assert_eq!(slots.limit(), 3);
        // Once the old holders have gone idle, three are served at once.
        let later = t + RATE_WINDOW + IDLE;
        assert!(slots.admit(p[8], later));
        assert!(slots.admit(p[9], later));
        assert!(slots.admit(p[0], later));
        assert!(!slots.admit(p[1], later));
        // A window with nobody waiting says nothing of the line: all slots
        // come back.
        let quiet = later + RATE_WINDOW;
        slots.sent(block, quiet);
        slots.sent(block, quiet + RATE_WINDOW);
        assert_eq!(slots.limit(), 8);
        // A capped upload knows its rate and is not measured.
        let capped = UploadSlots::new(8, 2 * block);
        capped.admit(p[0], t);
        capped.admit(p[1], t);
        capped.admit(p[2], t);
        capped.sent(1, t + RATE_WINDOW);
        assert_eq!(capped.limit(), 2);
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
