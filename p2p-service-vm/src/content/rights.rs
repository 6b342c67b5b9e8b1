//! Where the content engine asks the DRM checker (`p2pvm_security::drm`):
//! before it publishes, before it serves anything of an item to a peer
//! (manifest, bitfield, block, search hit), before it tells the network it
//! provides an item, and before it accepts a manifest from a provider.
//!
//! Serving asks per request, so the rights of items being served are kept
//! decoded here (items are immutable; a deleted item's entry is dropped).
//!
//! Group items: this node may hold one if it is a current member of an
//! allowed group (the privacy controller's [`Groups`]); a peer is served one
//! only on a group session of an allowed group (`fastpath.rs`: mutual TLS
//! with member certificates), whose member certificate is checked again —
//! validity, the CRL held — at every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use p2pvm_content::{ContentId, Manifest, SignedManifest};
use p2pvm_security::{
    CertError, Certification, DrmChecker, DrmError, DrmPolicy, GroupId, Groups, TrustList, pki,
};
use prost::Message;

use super::{ContentService, ContentServiceError, LocalError, VerifiedManifest, now_unix};
use crate::config::DrmConfig;

/// Decoded manifests of items being served; cleared when it grows past this.
const SERVED_CACHE_ITEMS: usize = 4096;

/// Member certificates peers have shown; cleared when it grows past this.
const PRESENTED_MAX: usize = 16 << 10;

/// The DRM side of the content service.
pub(crate) struct Rights {
    checker: DrmChecker,
    /// This node's publisher chain, attached to what it publishes.
    chain: Vec<Vec<u8>>,
    served: Mutex<HashMap<ContentId, Arc<Manifest>>>,
    /// The privacy controller's groups.
    pub groups: Arc<Groups>,
    /// Member certificates peers showed in group sessions, by (peer, group).
    presented: Mutex<HashMap<(PeerId, GroupId), Presented>>,
}

/// A member certificate a peer showed, and when it last verified.
struct Presented {
    cert: Vec<u8>,
    /// (the CRL number it verified under, when, until when the certificate
    /// is valid): the check is repeated when the CRL changes, after
    /// [`RECHECK`], or once the certificate ends.
    checked: Option<(u64, std::time::Instant, u64)>,
}

/// A verified membership is verified again after this long at the latest.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

impl Rights {
    /// Reads the trusted publisher CAs, their CRLs and this node's own chain
    /// (which must name `local`).
    pub fn load(
        cfg: &DrmConfig,
        local: PeerId,
        groups: Arc<Groups>,
    ) -> Result<Self, ContentServiceError> {
        let bad = |e: CertError| ContentServiceError::from(LocalError::Drm(e));
        let trust = TrustList::load(&cfg.publisher_cas, &cfg.publisher_crls).map_err(bad)?;
        let chain = match &cfg.publisher_chain {
            Some(path) => {
                let chain = pki::certs_from_file(path).map_err(bad)?;
                let named = pki::peer_of(&chain[0]).map_err(bad)?;
                if named != local {
                    return Err(bad(CertError::WrongPeer {
                        named: named.to_base58(),
                        expected: local.to_base58(),
                    }));
                }
                chain
            }
            None => Vec::new(),
        };
        let policy = DrmPolicy {
            require_certified: cfg.require_certified,
            require_certified_tags: cfg.require_certified_tags.clone(),
        };
        Ok(Self {
            checker: DrmChecker::new(local, trust, policy),
            chain,
            served: Mutex::new(HashMap::new()),
            groups,
            presented: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `peer` (this node when `None`) is a verified current member
    /// of the group `group` names (its id); a peer only on a group session
    /// of that group (`session`).
    fn member(&self, group: &str, peer: Option<&PeerId>, session: Option<GroupId>) -> bool {
        let Ok(id) = group.parse::<GroupId>() else {
            return false;
        };
        match peer {
            None => self.groups.is_member(id),
            Some(_) if session != Some(id) => false,
            Some(p) => {
                // Serving asks per block: a signature check each time would
                // cost more than the block; a membership checked under the
                // CRL held now, recently, within its validity, stands.
                let crl = self.groups.crl_number(id);
                let now = now_unix();
                let cert = {
                    let presented = self.presented.lock().expect("lock");
                    let Some(shown) = presented.get(&(*p, id)) else {
                        return false;
                    };
                    if let Some((n, at, until)) = shown.checked
                        && n == crl
                        && at.elapsed() < RECHECK
                        && now < until
                    {
                        return true;
                    }
                    shown.cert.clone()
                };
                let ok = self.groups.verify_member(id, p, &cert).is_ok();
                if let Some(shown) = self.presented.lock().expect("lock").get_mut(&(*p, id)) {
                    shown.checked = ok.then(|| {
                        let until = Groups::valid_until(&cert).unwrap_or(0);
                        (crl, std::time::Instant::now(), until)
                    });
                }
                ok
            }
        }
    }

    /// Takes the member certificate `peer` showed in a group session of
    /// `id` (verified again here).
    pub fn session_member(&self, peer: &PeerId, id: GroupId, cert: &[u8]) -> Result<(), String> {
        self.groups
            .verify_member(id, peer, cert)
            .map_err(|e| format!("DRM_NOT_GROUP_MEMBER: {e}"))?;
        let mut presented = self.presented.lock().expect("lock");
        if presented.len() >= PRESENTED_MAX {
            presented.clear();
        }
        presented.insert(
            (*peer, id),
            Presented {
                cert: cert.to_vec(),
                checked: None,
            },
        );
        Ok(())
    }

    /// This node's publisher chain (empty: it publishes self-signed).
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// Forgets a deleted item.
    pub fn forget(&self, id: &ContentId) {
        self.served.lock().expect("lock").remove(id);
    }
}

impl ContentService {
    fn rights(&self) -> &Rights {
        &self.inner.rights
    }

    /// Before publishing `draft` (all but its id and size).
    pub(crate) fn drm_publish(&self, draft: &Manifest) -> Result<Certification, DrmError> {
        self.rights()
            .checker
            .check_publish(draft, now_unix(), &|g, p| self.rights().member(g, p, None))
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
            self.rights()
                .checker
                .check_serve(&m, peer, now_unix(), &|g, p| {
                    self.rights().member(g, p, session)
                }),
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
            .checker
            .check_serve(m, peer, now_unix(), &|g, p| {
                self.rights().member(g, p, session)
            })
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
        let signed = self.inner.store.manifest(id).ok().flatten()?;
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
        self.inner.config.announce && self.rights().checker.may_announce(m, now_unix())
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
        self.rights()
            .checker
            .check_accept(&m.manifest, provider, now_unix(), &|g, p| {
                self.rights().member(g, p, None)
            })
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
        let mut out: Vec<GroupId> = ids
            .filter_map(|w| w.parse().ok())
            .filter(|id| self.rights().groups.own_certificate(*id).is_some())
            .collect();
        out.dedup();
        out
    }

    /// Whether `peer`, on a group session of `session`, is a current member
    /// of the group `group` names.
    pub(crate) fn is_verified_member(
        &self,
        group: &str,
        peer: &PeerId,
        session: Option<GroupId>,
    ) -> bool {
        self.rights().member(group, Some(peer), session)
    }

    /// Takes the member certificate a peer showed in a group session.
    pub(crate) fn drm_session_member(
        &self,
        peer: &PeerId,
        group: GroupId,
        cert: &[u8],
    ) -> Result<(), String> {
        self.rights().session_member(peer, group, cert)
    }

    /// A certificate signing request for this node's own key (see
    /// [`p2pvm_security::groups::certificate_request`]).
    pub fn certificate_request(&self) -> Result<String, p2pvm_security::GroupError> {
        p2pvm_security::groups::certificate_request(&self.inner.key)
    }

    /// The privacy controller's groups.
    pub fn groups(&self) -> &Groups {
        &self.rights().groups
    }

    /// How `m`'s publisher is vouched for, for display.
    pub fn certification(&self, m: &Manifest) -> Result<Certification, p2pvm_security::Untrusted> {
        self.rights().checker.certification(m, now_unix())
    }
}
