//! Finding an item's providers in the DHT and ranking them by what the
//! credit ledger says of each.

use libp2p::PeerId;
use p2pvm_content::ContentId;
use p2pvm_security::Standing;

use super::ContentService;
use super::types::content_key;

impl ContentService {
    /// What the credit policy says about a peer.
    pub(crate) fn standing(&self, peer: &PeerId) -> Standing {
        self.inner.ctx.ledger.standing(peer)
    }

    /// Providers of `id`, usable ones only, best credit forecast first and
    /// in random order among equals: downloaders that know nothing of the
    /// providers yet spread over all of them instead of all asking the few
    /// the DHT happens to name first.
    pub(crate) async fn find_providers(&self, id: &ContentId, limit: usize) -> Vec<PeerId> {
        let mut found = self.find_providers_raw(id, limit).await;
        rand::seq::SliceRandom::shuffle(found.as_mut_slice(), &mut rand::thread_rng());
        let ledger = &self.inner.ctx.ledger;
        let mut ranked: Vec<(PeerId, p2pvm_security::PeerCredit)> = found
            .drain(..)
            .map(|p| (p, ledger.credit(&p)))
            .filter(|(_, c)| c.standing < Standing::Refused)
            .collect();
        ranked.sort_by(|a, b| {
            a.1.standing
                .cmp(&b.1.standing)
                .then(b.1.score.cmp(&a.1.score))
                .then(b.1.expected_bps.total_cmp(&a.1.expected_bps))
        });
        ranked.into_iter().map(|(p, _)| p).take(limit).collect()
    }

    async fn find_providers_raw(&self, id: &ContentId, limit: usize) -> Vec<PeerId> {
        let key = content_key(id);
        let me = self.inner.ctx.node.peer_id();
        let found = self
            .inner
            .ctx
            .node
            .call_timeout(std::time::Duration::from_secs(10), |reply| {
                crate::node::Command::FindProviders { key, limit, reply }
            })
            .await
            .unwrap_or_default();
        found.into_iter().filter(|p| *p != me).collect()
    }
}
