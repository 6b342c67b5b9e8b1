//! Blocks a viewer plays next leave before other answers.
//!
//! A holder's upload is shared by every peer it serves: on a 10 Mbit/s home
//! line with six peers in its upload slots, each 256 KiB block takes over a
//! second, and a player that waits for the first second of media waits for
//! the slowest of a few such blocks. A downloader marks the next blocks a
//! reader plays as urgent (`BlockRequest::urgent`); while one is being
//! written, the node's other streams hold their next block back, so the
//! urgent one has the line to itself but for what is already in the sockets.
//!
//! A peer that marks everything urgent gains little: only one urgent answer
//! per peer at a time counts as urgent (the rest wait their turn like any
//! other), an urgent answer holds others back for [`URGENT_FOR`] at most (one
//! whose peer does not read it is not waited for longer), and a held-back
//! answer waits at most [`HOLD_AT_MOST`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The longest a non-urgent answer is held back for urgent ones: urgent
/// answers from many peers in a row must not starve everyone else.
pub(crate) const HOLD_AT_MOST: Duration = Duration::from_millis(1500);
/// How long an urgent answer holds others back: a 256 KiB block leaves a
/// 2 Mbit/s line in about a second. A peer that asks urgently and does not
/// read holds the node back no longer than this.
const URGENT_FOR: Duration = Duration::from_secs(1);

/// The node's urgent answers being written.
#[derive(Debug, Default)]
pub(crate) struct UrgentGate {
    /// Urgent answers being written: by peer (at most one each), since when.
    sending: Mutex<HashMap<PeerId, Instant>>,
    cleared: Notify,
}

/// An urgent answer being written; dropping it lets held-back answers go.
#[derive(Debug)]
pub(crate) struct Sending<'a> {
    gate: &'a UrgentGate,
    peer: PeerId,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        let mut sending = self.gate.lock();
        sending.remove(&self.peer);
        if sending.is_empty() {
            self.gate.cleared.notify_waiters();
        }
    }
}

impl UrgentGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Instant>> {
        self.sending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An urgent answer to `peer` starts; `None` when one to `peer` is
    /// already being written (this one then goes as any other).
    pub(crate) fn enter(&self, peer: PeerId) -> Option<Sending<'_>> {
        let mut sending = self.lock();
        if sending.contains_key(&peer) {
            return None;
        }
        sending.insert(peer, Instant::now());
        Some(Sending { gate: self, peer })
    }

    /// Until when urgent answers hold others back (`None`: they do not).
    fn holding_until(&self) -> Option<Instant> {
        let now = Instant::now();
        self.lock()
            .values()
            .map(|since| *since + URGENT_FOR)
            .filter(|until| *until > now)
            .max()
    }

    /// Waits, at most `limit`, until no urgent answer holds others back.
    pub(crate) async fn clear(&self, limit: Duration) {
        let give_up = Instant::now() + limit;
        loop {
            let cleared = self.cleared.notified();
            tokio::pin!(cleared);
            // Registered before the check, so a drop in between wakes us.
            cleared.as_mut().enable();
            let Some(until) = self.holding_until() else {
                return;
            };
            if Instant::now() >= give_up {
                return;
            }
            tokio::select! {
                _ = cleared => {}
                _ = tokio::time::sleep_until(until.min(give_up)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_urgent_answer_per_peer_counts_as_urgent() {
        let gate = UrgentGate::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let first = gate.enter(a).expect("a's first");
        assert!(gate.enter(a).is_none(), "a second of a's is not urgent");
        let other = gate.enter(b).expect("b's");
        assert!(gate.holding_until().is_some());
        drop(first);
        assert!(gate.holding_until().is_some(), "b's is still being written");
        drop(other);
        assert!(gate.holding_until().is_none());
        assert!(gate.enter(a).is_some(), "a's next may be urgent again");
    }

    #[tokio::test(start_paused = true)]
    async fn held_back_answers_go_when_the_urgent_one_is_written_or_after_the_limit() {
        let gate = UrgentGate::default();
        let peer = PeerId::random();
        // Nothing urgent: no wait at all.
        let t = tokio::time::Instant::now();
        gate.clear(HOLD_AT_MOST).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        // Written in 200 ms: the held-back answer goes then.
        let sending = gate.enter(peer).expect("urgent");
        let t = tokio::time::Instant::now();
        tokio::join!(gate.clear(HOLD_AT_MOST), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(sending);
        });
        assert_eq!(t.elapsed(), Duration::from_millis(200));
        // One that is never written (its peer does not read) holds others
        // back only for a while, and only once.
        let _stuck = gate.enter(peer).expect("urgent");
        let t = tokio::time::Instant::now();
        gate.clear(HOLD_AT_MOST).await;
        assert_eq!(t.elapsed(), URGENT_FOR);
        let t = tokio::time::Instant::now();
        gate.clear(HOLD_AT_MOST).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        // Urgent answers in a row hold others back at most the limit.
        let mut peers = Vec::new();
        let ((), held) = tokio::join!(
            async {
                for _ in 0..4 {
                    peers.push(gate.enter(PeerId::random()).expect("urgent"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
            async {
                let t = tokio::time::Instant::now();
                gate.clear(HOLD_AT_MOST).await;
                t.elapsed()
            }
        );
        assert_eq!(held, HOLD_AT_MOST);
    }
}
