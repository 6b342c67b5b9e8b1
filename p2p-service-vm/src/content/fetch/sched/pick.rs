//! Which block a freed slot asks for: the readers' playback windows first,
//! then the rarest wanted block, then, in the end game or for a stuck block,
//! a second copy; and what a provider holds for us while it waits in line.

use super::{ENDGAME_AFTER, IN_LINE_FACTOR, PLAYBACK_HEAD, SEEDS_SPARED_FOR, Sched, Slot};
use libp2p::PeerId;
use std::time::{Duration, Instant};

impl Sched {
    /// Whether block `k` is worth fetching: every block for a download that
    /// keeps the item, else only those a reader will soon read. (`pick`'s
    /// candidates are exactly these.)
    pub(super) fn wanted(&self, k: u64) -> bool {
        self.keep || self.in_window(k)
    }

    /// Whether `k` is within some reader's memory window.
    pub(in crate::content::fetch) fn in_window(&self, k: u64) -> bool {
        self.readers
            .iter()
            .any(|r| r.next <= k && k < r.end.min(r.next + self.ram_ahead))
    }

    pub(super) fn take(&mut self, peer: PeerId, k: u64, now: Instant) -> u64 {
        let i = k as usize;
        self.slots[i] = match self.slots[i] {
            Slot::Missing => Slot::Pending(1),
            Slot::Pending(n) => Slot::Pending(n.saturating_add(1)),
            Slot::Held => Slot::Held,
        };
        self.since[i].get_or_insert(now);
        self.provider(peer).asked.insert(k);
        k
    }

    /// The next block to ask `peer` for, or `None`. `urgent`: the peer may
    /// serve playback windows.
    pub(in crate::content::fetch) fn pick(
        &mut self,
        peer: &PeerId,
        now: Instant,
        urgent: bool,
    ) -> Option<u64> {
        let n = self.slots.len() as u64;
        let start = if n == 0 { 0 } else { self.random() % n };
        let p = self.providers.get(peer)?;
        let (have, asked) = (&p.have, &p.asked);
        // A seed is asked only for what no known peer holds, while peers
        // deliver: its upload is the swarm's scarcest, and every block it
        // sends twice is one new block fewer in the swarm.
        let spare = p.seed && self.keep && self.sparing_seeds(now);
        let spared = |k: u64| spare && self.shared[k as usize] > 0;
        let better_has = |k: u64| {
            p.throttled
                && self
                    .providers
                    .values()
                    .any(|o| o.active && !o.throttled && o.have.has(k))
        };
        // 1. Playback windows, the most urgent reader first.
        if urgent && !p.throttled {
            let mut windows: Vec<(u64, u64)> = self
                .readers
                .iter()
                .map(|r| {
                    (
                        r.next,
                        (r.next + self.window.min(self.ram_ahead)).min(r.end),
                    )
                })
                .collect();
            windows.sort_unstable();
            let late = self.late_after();
            for (from, to) in windows {
                for k in from..to {
                    let i = k as usize;
                    if !have.has(k) {
                        continue;
                    }
                    if self.slots[i] == Slot::Missing {
                        return Some(self.take(*peer, k, now));
                    }
                    // The next blocks a reader plays, late at one provider:
                    // playback waits on them whatever else arrives, so a
                    // second provider is asked at once rather than after the
                    // stuck delay (libtorrent's time-critical pieces do the same).
                    let late_head = k < from + PLAYBACK_HEAD
                        && self.slots[i] == Slot::Pending(1)
                        && !asked.contains(&k)
                        && self.since[i].is_some_and(|t| now.saturating_duration_since(t) > late);
                    if late_head {
                        return Some(self.take(*peer, k, now));
                    }
                }
            }
        }
        // Where wanted blocks can be: anywhere for a download that keeps the
        // item (from a random place, to break ties), else only in the readers'
        // memory windows (a scan of the whole item per request cost 2 % of a
        // stream's CPU).
        let candidates = || -> Box<dyn Iterator<Item = u64> + '_> {
            if self.keep {
                Box::new((0..n).map(move |i| (start + i) % n))
            } else {
                Box::new(
                    self.readers
                        .iter()
                        .flat_map(|r| r.next..r.end.min(r.next + self.ram_ahead)),
                )
            }
        };
        // 2. Rarest wanted block.
        let mut best: Option<(u16, u64)> = None;
        for k in candidates() {
            let rarity = self.rarity[k as usize];
            if self.slots[k as usize] == Slot::Missing
                && have.has(k)
                && !better_has(k)
                && !spared(k)
                && best.is_none_or(|(r, _)| rarity < r)
            {
                best = Some((rarity, k));
                if rarity <= 1 {
                    break;
                }
            }
        }
        if let Some((_, k)) = best {
            return Some(self.take(*peer, k, now));
        }
        // 3. Duplicate the longest-waiting block held up elsewhere.
        let after = if self.in_end_game() {
            ENDGAME_AFTER
        } else {
            self.stuck_after()
        };
        let mut oldest: Option<(Instant, u64)> = None;
        for k in candidates() {
            let i = k as usize;
            if self.slots[i] == Slot::Pending(1)
                && have.has(k)
                && !asked.contains(&k)
                && !better_has(k)
                && !spared(k)
                && let Some(t) = self.since[i]
                && now.saturating_duration_since(t) > after
                && oldest.is_none_or(|(o, _)| t < o)
            {
                oldest = Some((t, k));
            }
        }
        oldest.map(|(_, k)| self.take(*peer, k, now))
    }

    /// `peer`'s request for `k` ended without the block (refused, dropped,
    /// failed verification, or a duplicate another copy beat).
    pub(in crate::content::fetch) fn release(&mut self, peer: PeerId, k: u64) {
        let asked = self
            .providers
            .get_mut(&peer)
            .is_some_and(|p| p.asked.remove(&k));
        let i = k as usize;
        if !asked || i >= self.slots.len() {
            return;
        }
        self.slots[i] = match self.slots[i] {
            Slot::Pending(n) if n > 1 => Slot::Pending(n - 1),
            Slot::Pending(_) => {
                self.since[i] = None;
                Slot::Missing
            }
            other => other,
        };
    }

    /// Whether seeds are spared the blocks known peers hold: peers have
    /// delivered lately, so they are trading.
    pub(in crate::content::fetch) fn sparing_seeds(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_from_peer) < SEEDS_SPARED_FOR
    }

    /// `peer` delivered `k`, verified. True when the block is newly held.
    pub(in crate::content::fetch) fn hold(&mut self, peer: PeerId, k: u64, now: Instant) -> bool {
        let seed = match self.providers.get_mut(&peer) {
            Some(p) => {
                p.asked.remove(&k);
                p.seed
            }
            None => false,
        };
        let i = k as usize;
        if self.slots[i] == Slot::Held {
            return false;
        }
        if !seed {
            self.last_from_peer = now;
        }
        if let Some(t) = self.since[i] {
            let took = now.saturating_duration_since(t);
            // A fifth of each new block: smooth, yet slow lines show within
            // a few blocks.
            self.block_time = Some(self.block_time.map_or(took, |avg| (avg * 4 + took) / 5));
        }
        self.slots[i] = Slot::Held;
        self.since[i] = None;
        self.held += 1;
        self.last_progress = now;
        true
    }

    /// Block `k` was held before this download started (an unfinished
    /// download of the item, resumed).
    pub(in crate::content::fetch) fn resumed(&mut self, k: u64) {
        let i = k as usize;
        if self.slots.get(i).is_some_and(|s| *s != Slot::Held) {
            self.slots[i] = Slot::Held;
            self.held += 1;
        }
    }

    /// A held block was dropped from memory: it is missing again (or still
    /// pending at whoever duplicated it).
    pub(in crate::content::fetch) fn unhold(&mut self, k: u64, now: Instant) {
        let i = k as usize;
        if self.slots[i] != Slot::Held {
            return;
        }
        self.held -= 1;
        let pending = self
            .providers
            .values()
            .filter(|p| p.asked.contains(&k))
            .count();
        self.slots[i] = match u8::try_from(pending) {
            Ok(0) => Slot::Missing,
            Ok(n) => Slot::Pending(n),
            Err(_) => Slot::Pending(u8::MAX),
        };
        if pending > 0 {
            self.since[i] = Some(now);
        }
    }

    /// Whether every block wanted now is held: the whole item for a keeping
    /// download, else each reader's memory window (a paused reader owes
    /// nothing more until it reads on).
    pub(in crate::content::fetch) fn satisfied(&self) -> bool {
        if self.keep {
            return self.held == self.slots.len() as u64;
        }
        self.readers.iter().all(|r| {
            (r.next..r.end.min(r.next + self.ram_ahead))
                .all(|k| self.slots[k as usize] == Slot::Held)
        })
    }

    /// A provider that holds a block we asked for serves others first (all
    /// its upload slots are taken): we are in line, not stalled.
    pub(in crate::content::fetch) fn in_line(&mut self, now: Instant) {
        self.last_in_line = Some(now);
    }

    /// True when something is owed and nothing arrived for `limit`, or for
    /// [`IN_LINE_FACTOR`] times `limit` while providers keep saying we are in
    /// line for their upload slots. Nothing owed restarts the clock: readers
    /// paused with full windows stall no one.
    pub(in crate::content::fetch) fn stalled(&mut self, now: Instant, limit: Duration) -> bool {
        if self.satisfied() {
            self.last_progress = now;
            return false;
        }
        let quiet = now.saturating_duration_since(self.last_progress);
        let queued = self
            .last_in_line
            .is_some_and(|t| now.saturating_duration_since(t) <= limit);
        quiet
            > if queued {
                limit * IN_LINE_FACTOR
            } else {
                limit
            }
    }
}
