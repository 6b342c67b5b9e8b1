//! Where the content service asks its DRM state ([`super::rights::Rights`]):
//! before it publishes, serves anything of an item to a peer, announces an
//! item, or accepts a manifest from a provider; refusals are counted in the
//! node's figures.

use std::sync::Arc;

use libp2p::PeerId;
use p2pvm_content::{ContentId, Manifest, SignedManifest};
use p2pvm_security::{Certification, DrmChecker, DrmError, GroupError, GroupId, Groups};
use prost::Message;

use super::rights::Rights;
use super::{ContentService, VerifiedManifest, now_unix};

/// Decoded manifests of items being served; cleared when it grows past this.
const SERVED_CACHE_ITEMS: usize = 4096;

impl ContentService {
    pub(super) fn rights(&self) -> &Rights {
        &self.inner.rights
    }

    /// Before publishing `draft` (all but its id and size).
    pub(crate) fn drm_publish(&self, draft: &Manifest) -> Result<Certification, DrmError> {
        self.counted(
            "publish",
            self.rights().policy.check_publish(draft, now_unix()),
        )
    }

    /// A DRM decision, its refusals counted by stage and reason.
    fn counted<T>(&self, stage: &'static str, r: Result<T, DrmError>) -> Result<T, DrmError> {
        if let Err(e) = &r {
            self.inner
                .ctx
                .metrics
                .drm_refused(stage, e.code(), e.to_string());
        }
        r
    }

    /// Before serving anything of `id` to `peer` (reads the store the first
    /// time: call it on a blocking thread). `None`: this node does not know
    /// the item (the caller answers "not found").
    /// `session`: the group of the group session the request came on.
    pub(crate) fn drm_serve(
        &self,
        id: &ContentId,
        peer: &PeerId,
        session: Option<GroupId>,
    ) -> Option<Result<(), DrmError>> {
        let m = self.served_manifest(id)?;
        Some(
            self.counted(
                "serve",
                self.rights()
                    .policy
                    .check_serve(&m, peer, session, now_unix()),
            ),
        )
    }

    /// Whether a stored search hit may be shown to `peer`.
    pub(crate) fn drm_may_list(
        &self,
        m: &Manifest,
        peer: &PeerId,
        session: Option<GroupId>,
    ) -> bool {
        self.rights()
            .policy
            .check_serve(m, peer, session, now_unix())
            .is_ok()
    }

    fn served_manifest(&self, id: &ContentId) -> Option<Arc<Manifest>> {
        if let Some(m) = self.rights().served.lock().expect("lock").get(id) {
            return Some(m.clone());
        }
        let dl = self.inner.downloads.lock().expect("lock").get(id).cloned();
        if let Some(dl) = dl {
            return Some(Arc::new(dl.manifest.manifest.clone()));
        }
        // Verified when it was stored; decoding is enough.
        let signed = self.inner.ctx.store.manifest(id).ok().flatten()?;
        let m = SignedManifest::decode(signed.as_slice())
            .ok()
            .and_then(|s| Manifest::decode(s.manifest.as_slice()).ok())?;
        let m = Arc::new(m);
        let mut served = self.rights().served.lock().expect("lock");
        if served.len() >= SERVED_CACHE_ITEMS {
            served.clear();
        }
        served.insert(*id, m.clone());
        Some(m)
    }

    /// Whether this node announces itself as a provider of `m`: not when
    /// the node keeps out of the DHT (`content.announce = false`), nor when
    /// the DRM checker says the item is not this node's to offer.
    pub(crate) fn may_announce(&self, m: &Manifest) -> bool {
        self.inner.config.announce && self.rights().policy.may_announce(m, now_unix())
    }

    /// Whether `peer` may serve `m` at all (only its publisher, for an item
    /// that is not redistributable).
    pub(crate) fn drm_may_serve_us(m: &Manifest, peer: &PeerId) -> bool {
        DrmChecker::may_be_served_by(m, peer)
    }

    /// Before accepting `m` from `provider`.
    pub(crate) fn drm_accept(
        &self,
        m: &VerifiedManifest,
        provider: &PeerId,
    ) -> Result<Certification, DrmError> {
        self.counted(
            "accept",
            self.rights()
                .policy
                .check_accept(&m.manifest, provider, now_unix()),
        )
    }

    /// The groups `m` is for that this node holds a member certificate of.
    pub(crate) fn memberships_for(&self, m: &Manifest) -> Vec<GroupId> {
        let groups = m
            .rights
            .as_ref()
            .map(|r| r.allowed_groups.as_slice())
            .unwrap_or_default();
        self.ours(groups.iter().map(String::as_str))
    }

    /// The group ids named in a `DRM_NOT_GROUP_MEMBER` refusal that this
    /// node holds a member certificate of.
    pub(crate) fn memberships_named(&self, message: &str) -> Vec<GroupId> {
        self.ours(message.split(|c: char| !c.is_ascii_hexdigit()))
    }

    fn ours<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Vec<GroupId> {
        self.rights().policy.own_memberships(ids)
    }

    /// Whether `peer`, on a group session of `session`, is a current member
    /// of the group `group` names.
    pub(crate) fn is_verified_member(
        &self,
        group: &str,
        peer: &PeerId,
        session: Option<GroupId>,
    ) -> bool {
        self.rights()
            .policy
            .member(group, Some(peer), session, now_unix())
    }

    /// Takes the member certificate a peer showed in a group session.
    pub(crate) fn drm_session_member(
        &self,
        peer: &PeerId,
        group: GroupId,
        cert: &[u8],
    ) -> Result<(), GroupError> {
        self.rights().policy.take_session_member(peer, group, cert)
    }

    /// A certificate signing request for this node's own key (see
    /// [`p2pvm_security::groups::certificate_request`]).
    pub fn certificate_request(&self) -> Result<String, p2pvm_security::GroupError> {
        p2pvm_security::groups::certificate_request(&self.inner.ctx.key)
    }

    /// The privacy controller's groups.
    pub fn groups(&self) -> &Groups {
        self.rights().policy.groups()
    }

    /// How `m`'s publisher is vouched for, for display.
    pub fn certification(&self, m: &Manifest) -> Result<Certification, p2pvm_security::Untrusted> {
        self.rights().policy.certification(m, now_unix())
    }
}
