//! What the schedule knows of each provider: what it holds, whether it is
//! useful, paused, backing off, throttled or bad, and what its departure
//! gives back to the pool.

use super::{BACKOFF_FIRST, BACKOFF_MAX, Backoff, Have, Provider, Sched, Slot};
use libp2p::PeerId;
use std::collections::HashSet;
use std::time::Instant;

impl Sched {
    /// Providers not fetched from now that last said they hold a block this
    /// download still needs: the first to fetch from again.
    pub(in crate::content::fetch) fn known_useful(&self) -> Vec<PeerId> {
        self.providers
            .iter()
            .filter(|(_, p)| !p.active && self.holds_wanted(&p.have))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `peer` last said it holds a missing block this download wants.
    pub(in crate::content::fetch) fn useful(&self, peer: &PeerId) -> bool {
        self.providers
            .get(peer)
            .is_some_and(|p| self.holds_wanted(&p.have))
    }

    pub(super) fn holds_wanted(&self, have: &Have) -> bool {
        (0..self.slots.len() as u64)
            .any(|k| self.slots[k as usize] == Slot::Missing && have.has(k) && self.wanted(k))
    }

    /// Whether `peer` is not to be asked now: it sent data that did not
    /// verify, it is backing off after saying it does not hold the item, or
    /// it left a request unanswered and its verdict is not in.
    pub(in crate::content::fetch) fn excluded(&self, peer: &PeerId, now: Instant) -> bool {
        self.bad.contains(peer) || self.backoff.get(peer).is_some_and(|b| now < b.until)
    }

    /// `peer` said it does not hold the item. In a swarm that is often only
    /// "not yet" (a peer announced before its first blocks arrived, a DHT
    /// record outlived a deletion), so it is asked again after a pause that
    /// doubles with each refusal, from [`BACKOFF_FIRST`] up to
    /// [`BACKOFF_MAX`]. True on its first refusal in this download: only
    /// that one is charged to its credit.
    pub(in crate::content::fetch) fn back_off(&mut self, peer: PeerId, now: Instant) -> bool {
        self.forget_peer(&peer);
        let b = self.backoff.entry(peer).or_insert(Backoff {
            until: now,
            strikes: 0,
        });
        b.strikes += 1;
        let pause = BACKOFF_FIRST
            .saturating_mul(1 << (b.strikes - 1).min(16))
            .min(BACKOFF_MAX);
        b.until = now + pause;
        b.strikes == 1
    }

    /// `peer` serves this node on as many streams as it allows: not asked
    /// for [`BACKOFF_FIRST`], with no strike (it is no refusal of the item).
    pub(in crate::content::fetch) fn pause(&mut self, peer: PeerId, now: Instant) {
        self.forget_peer(&peer);
        let b = self.backoff.entry(peer).or_insert(Backoff {
            until: now,
            strikes: 0,
        });
        b.until = b.until.max(now + BACKOFF_FIRST);
    }

    /// `peer` left a request unanswered: not asked again until `until`,
    /// when the verdict on its silence is in (a refused peer is not asked
    /// at all; a slow one is, with its record as it is).
    pub(in crate::content::fetch) fn hold_off(&mut self, peer: PeerId, until: Instant) {
        self.forget_peer(&peer);
        let b = self
            .backoff
            .entry(peer)
            .or_insert(Backoff { until, strikes: 0 });
        b.until = b.until.max(until);
    }

    pub(super) fn provider(&mut self, peer: PeerId) -> &mut Provider {
        self.providers.entry(peer).or_insert_with(|| Provider {
            have: Have::Unknown,
            throttled: false,
            asked: HashSet::new(),
            seed: false,
            active: true,
        })
    }

    /// What `peer` holds now (its worker is running).
    pub(crate) fn set_have(&mut self, peer: PeerId, have: Have) {
        let p = self.provider(peer);
        p.active = true;
        let was_seed = p.seed;
        p.seed |= matches!(have, Have::All);
        let is_seed = p.seed;
        let old = std::mem::replace(&mut p.have, have);
        let new = self.providers[&peer].have.clone();
        self.count(&old, was_seed, false);
        self.count(&new, is_seed, true);
    }

    /// Adds (or removes) a provider's holdings to the counts of holders.
    pub(super) fn count(&mut self, have: &Have, seed: bool, add: bool) {
        if matches!(have, Have::Unknown) {
            return;
        }
        for k in 0..self.slots.len() {
            if !have.has(k as u64) {
                continue;
            }
            let step = |c: &mut u16| {
                *c = if add {
                    c.saturating_add(1)
                } else {
                    c.saturating_sub(1)
                }
            };
            step(&mut self.rarity[k]);
            if !seed {
                step(&mut self.shared[k]);
            }
        }
    }

    /// `peer` said it does not hold `k` after all. It is not asked for `k`
    /// again until a new `Have` says it holds it. A peer that claimed the
    /// whole item (an honest one whose copy was deleted meanwhile, or one
    /// lying to hold blocks back from others) gets a bitfield without `k`.
    pub(in crate::content::fetch) fn not_held(&mut self, peer: PeerId, k: u64) {
        self.release(peer, k);
        let n = self.slots.len();
        if let Some(p) = self.providers.get_mut(&peer)
            && matches!(p.have, Have::All)
        {
            p.have = Have::Some(vec![true; n]);
        }
        if let Some(p) = self.providers.get_mut(&peer)
            && let Have::Some(bits) = &mut p.have
            && let Some(b) = bits.get_mut(k as usize)
            && std::mem::replace(b, false)
        {
            let r = &mut self.rarity[k as usize];
            *r = r.saturating_sub(1);
            if !p.seed {
                let s = &mut self.shared[k as usize];
                *s = s.saturating_sub(1);
            }
        }
    }

    pub(in crate::content::fetch) fn set_throttled(&mut self, peer: PeerId) {
        self.provider(peer).throttled = true;
    }

    /// `peer` is out of this download: it sent data that did not verify.
    /// What it said it holds is forgotten with it.
    pub(in crate::content::fetch) fn mark_bad(&mut self, peer: PeerId) {
        self.bad.insert(peer);
        self.forget_peer(&peer);
    }

    /// `peer`'s worker ended: what it had in flight goes back to the pool;
    /// what it said it holds is kept (see [`Provider::active`]). Returns
    /// how many blocks were in flight.
    pub(crate) fn retire_peer(&mut self, peer: &PeerId) -> u32 {
        let Some(p) = self.providers.get(peer) else {
            return 0;
        };
        let asked: Vec<u64> = p.asked.iter().copied().collect();
        for &k in &asked {
            self.release(*peer, k);
        }
        if let Some(p) = self.providers.get_mut(peer) {
            p.active = false;
        }
        asked.len() as u32
    }

    /// `peer` is gone from this download, with all it said it holds.
    pub(crate) fn forget_peer(&mut self, peer: &PeerId) {
        let _ = self.retire_peer(peer);
        if let Some(p) = self.providers.remove(peer) {
            self.count(&p.have, p.seed, false);
        }
    }
}
