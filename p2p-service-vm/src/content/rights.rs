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
//! once it has shown a member certificate naming it on a connection that
//! authenticated it (`Op::Member`), checked again — validity, the CRL held —
//! at every request.

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
    /// Member certificates shown by peers, by (peer, group).
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
    /// of the group `group` names (its id).
    fn member(&self, group: &str, peer: Option<&PeerId>) -> bool {
        let Ok(id) = group.parse::<GroupId>() else {
            return false;
        };
        match peer {
            None => self.groups.is_member(id),
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

    /// Takes a member certificate `peer` showed (on a connection that
    /// authenticated it) for `group`.
    pub fn present(&self, peer: &PeerId, group: &str, cert: &[u8]) -> Result<(), String> {
        let id: GroupId = group
            .parse()
            .map_err(|_| format!("{group:?} is not a group id"))?;
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
        self.rights().checker.check_publish(draft, now_unix())
    }

    /// Before serving anything of `id` to `peer` (reads the store the first
    /// time: call it on a blocking thread). `None`: this node does not know
    /// the item (the caller answers "not found").
    pub(crate) fn drm_serve(&self, id: &ContentId, peer: &PeerId) -> Option<Result<(), DrmError>> {
        let m = self.served_manifest(id)?;
        Some(
            self.rights()
                .checker
                .check_serve(&m, peer, now_unix(), &|g, p| self.rights().member(g, p)),
        )
    }

    /// Whether a stored search hit may be shown to `peer`.
    pub(crate) fn drm_may_list(&self, m: &Manifest, peer: &PeerId) -> bool {
        self.rights()
            .checker
            .check_serve(m, peer, now_unix(), &|g, p| self.rights().member(g, p))
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

    /// Whether this node may announce itself as a provider of `m`.
    pub(crate) fn drm_may_announce(&self, m: &Manifest) -> bool {
        self.rights().checker.may_announce(m, now_unix())
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
                self.rights().member(g, p)
            })
    }

    /// This node's member certificates for the groups `m` is for.
    pub(crate) fn memberships_for(&self, m: &Manifest) -> Vec<(String, Vec<u8>)> {
        let groups = m
            .rights
            .as_ref()
            .map(|r| r.allowed_groups.as_slice())
            .unwrap_or_default();
        groups
            .iter()
            .filter_map(|g| {
                let id: GroupId = g.parse().ok()?;
                Some((g.clone(), self.rights().groups.own_certificate(id)?))
            })
            .collect()
    }

    /// Group ids named in a `DRM_NOT_GROUP_MEMBER` refusal that this node
    /// holds a member certificate for, with it.
    pub(crate) fn memberships_named(&self, message: &str) -> Vec<(String, Vec<u8>)> {
        message
            .split(|c: char| !c.is_ascii_hexdigit())
            .filter_map(|w| {
                let id: GroupId = w.parse().ok()?;
                Some((w.to_owned(), self.rights().groups.own_certificate(id)?))
            })
            .collect()
    }

    /// Whether `peer` has shown a certificate proving it a current member of
    /// the group `group` names.
    pub(crate) fn is_verified_member(&self, group: &str, peer: &PeerId) -> bool {
        self.rights().member(group, Some(peer))
    }

    /// Takes a member certificate a peer showed.
    pub(crate) fn drm_present(
        &self,
        peer: &PeerId,
        group: &str,
        cert: &[u8],
    ) -> Result<(), String> {
        self.rights().present(peer, group, cert)
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
