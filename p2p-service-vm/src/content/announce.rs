//! Provider records: this node tells the DHT which items (and keywords) it
//! holds, when it gets them and again as the network around it grows.
//!
//! Kademlia stores a provider record at the peers closest to the key *that
//! the announcing node can find at the time*. A node that publishes while it
//! has few peers (the first node of a swarm, a publisher whose peers join
//! after it) leaves its records with those few or only with itself, and a
//! later lookup walks to the real closest peers, which know nothing: 25 to
//! 32 of 59 downloads of a fresh item in a 60-node swarm failed "not found"
//! this way. libp2p republishes provider records only every 12 hours, so the
//! node announces everything again each time its peer count has more than
//! doubled since the last round.

use std::time::Duration;

use tracing::{debug, warn};

use super::{ContentService, VerifiedManifest, content_key, keyword_key};
use crate::node::Command;
use crate::report::chain;

/// How often the peer count is looked at.
const GROWTH_CHECK: Duration = Duration::from_secs(2);
/// The least time between two growth rounds: a swarm forming around a
/// publisher doubles its peer count every few seconds at first, and the
/// rounds in between would be overtaken by the next at once.
const GROWTH_ROUND_GAP: Duration = Duration::from_secs(5);

/// Whether `now` connected peers warrant announcing again, given `last` at
/// the previous round: more than double. A count that fell below half of
/// `last` lowers the mark, so a node that lost its peers and finds new ones
/// announces to them.
pub(super) fn grown(last: &mut usize, now: usize) -> bool {
    if now < *last / 2 {
        *last = now;
    }
    now > 2 * *last
}

impl ContentService {
    /// Announces every stored item at start-up, then again whenever the
    /// network has grown enough to have moved the closest peers of its keys.
    pub(super) async fn announce_as_the_network_grows(&self) {
        let mut last = self.inner.ctx.node.status().1;
        self.announce_all().await;
        let mut tick = tokio::time::interval(GROWTH_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_round = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.inner.ctx.shutdown.cancelled() => return,
            }
            let now = self.inner.ctx.node.status().1;
            if last_round.elapsed() < GROWTH_ROUND_GAP || !grown(&mut last, now) {
                continue;
            }
            debug!(
                peers = now,
                before = last,
                "the network grew: announcing stored items again"
            );
            last = now;
            last_round = tokio::time::Instant::now();
            self.announce_all().await;
        }
    }

    async fn announce_all(&self) {
        let items = match self.blocking(|svc| svc.inner.ctx.store.manifests()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                warn!(error = %chain(&e), "cannot list stored items to announce");
                return;
            }
            Err(e) => {
                warn!(error = %chain(&e), "cannot list stored items to announce");
                return;
            }
        };
        for (_, signed) in items {
            if let Ok(m) = VerifiedManifest::parse(&signed) {
                self.announce(&m).await;
            }
        }
    }

    /// Announces `m`'s id and keywords (unless it is not to be announced).
    pub(crate) async fn announce(&self, m: &VerifiedManifest) {
        if !self.may_announce(&m.manifest) {
            return;
        }
        let _ = self
            .inner
            .ctx
            .node
            .send(Command::Announce(content_key(&m.id)))
            .await;
        for word in p2pvm_content::keywords::manifest_keywords(&m.manifest) {
            let _ = self
                .inner
                .ctx
                .node
                .send(Command::Announce(keyword_key(&word)))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::grown;

    #[test]
    fn rounds_come_at_each_doubling_and_after_a_loss() {
        let mut last = 0;
        let rounds: Vec<usize> = (0..=60)
            .filter(|&n| {
                let r = grown(&mut last, n);
                if r {
                    last = n;
                }
                r
            })
            .collect();
        assert_eq!(rounds, [1, 3, 7, 15, 31]);
        // Down to 4 peers, then growing again: announced anew at 9.
        assert!(!grown(&mut last, 4));
        assert_eq!(last, 4);
        assert!(!grown(&mut last, 8));
        assert!(grown(&mut last, 9));
    }
}
