//! The items this node holds, and what it can learn of others': list, pin,
//! delete and stat.

use libp2p::PeerId;
use p2pvm_content::ContentId;
use p2pvm_security::Standing;

use super::types::{ContentInfo, VerifiedManifest, content_key};
use super::{ContentService, ContentServiceError, fetch};

impl ContentService {
    /// Items in the local store.
    pub async fn list(&self) -> Result<Vec<ContentInfo>, ContentServiceError> {
        self.blocking(|svc| {
            let me = svc.inner.ctx.node.peer_id();
            let mut out = Vec::new();
            for item in svc.inner.ctx.store.list()? {
                if let Some(m) = svc.local_manifest_blocking(&item.id)? {
                    out.push(ContentInfo {
                        manifest: m,
                        local: Some(item),
                        providers: vec![me],
                    });
                }
            }
            out.sort_by(|a, b| a.manifest.manifest.name.cmp(&b.manifest.manifest.name));
            Ok(out)
        })
        .await?
    }

    /// The verified manifest of a stored item (reads the index: call it on a
    /// blocking thread).
    pub(crate) fn local_manifest_blocking(
        &self,
        id: &ContentId,
    ) -> Result<Option<VerifiedManifest>, ContentServiceError> {
        match self.inner.ctx.store.manifest(id)? {
            Some(bytes) => Ok(Some(VerifiedManifest::parse(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Pins or unpins a stored item.
    pub async fn pin(&self, id: &ContentId, pinned: bool) -> Result<(), ContentServiceError> {
        let id = *id;
        self.blocking(move |svc| svc.inner.ctx.store.set_pinned(&id, pinned))
            .await??;
        Ok(())
    }

    /// Deletes a stored item and stops providing it.
    pub async fn delete(&self, id: &ContentId) -> Result<(), ContentServiceError> {
        let item = *id;
        self.blocking(move |svc| svc.inner.ctx.store.delete(&item))
            .await??;
        self.inner.rights.forget(id);
        let _ = self
            .inner
            .ctx
            .node
            .send(crate::node::Command::StopProviding(content_key(id)))
            .await;
        Ok(())
    }

    /// Everything known about an item: local first, else from providers.
    pub async fn stat(&self, id: &ContentId) -> Result<ContentInfo, ContentServiceError> {
        self.stat_from(id, &[]).await
    }

    /// [`Self::stat`], asking `sources` (peers known to hold the item, such
    /// as the requester of a compute job for its inputs) before the DHT,
    /// whose records of an item published a moment ago may not have spread.
    pub async fn stat_from(
        &self,
        id: &ContentId,
        sources: &[PeerId],
    ) -> Result<ContentInfo, ContentServiceError> {
        let item = *id;
        let local = self
            .blocking(move |svc| {
                let Some(m) = svc.local_manifest_blocking(&item)? else {
                    return Ok(None);
                };
                Ok::<_, ContentServiceError>(Some((m, svc.inner.ctx.store.get(&item)?)))
            })
            .await??;
        if let Some((manifest, local)) = local {
            return Ok(ContentInfo {
                manifest,
                local,
                providers: vec![self.inner.ctx.node.peer_id()],
            });
        }
        let sources: Vec<PeerId> = sources
            .iter()
            .filter(|p| self.standing(p) < Standing::Refused)
            .copied()
            .collect();
        if !sources.is_empty()
            && let Ok(proven) = fetch::manifest_from(self, id, &sources).await
        {
            return Ok(ContentInfo {
                manifest: proven.manifest,
                local: None,
                providers: sources,
            });
        }
        let providers = fetch::first_providers(self, id, 4).await;
        let manifest = fetch::manifest_from(self, id, &providers).await?.manifest;
        Ok(ContentInfo {
            manifest,
            local: None,
            providers,
        })
    }
}
