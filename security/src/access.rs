//! The access policy: who may publish, serve, be served and be believed.
//!
//! It joins the DRM checker (rights in manifests, publishers' X.509 chains
//! to the trusted CAs) with the privacy controller's trusted groups: an item
//! for a group is held only by the group's current members, and served to a
//! peer only on a group session of an allowed group, whose member
//! certificate is checked again (validity, the CRL held) while it is used.
//!
//! ```text
//!  content engine ── check_publish / check_serve / check_accept / may_announce ─► AccessPolicy
//!                                                            │ member(group, peer, session)?
//!                                                            └─► Groups (certificates, CRLs)
//!  group session (mutual TLS) ── take_session_member(peer, group, certificate) ─► presented
//! ```
//!
//! The content engine (`p2pd`) keeps only the glue: which manifest an item
//! has, and when to ask.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p_identity::PeerId;
use p2pvm_content::Manifest;

use crate::drm::{Certification, DrmChecker, DrmError, DrmPolicy, Untrusted};
use crate::groups::{GroupError, GroupId, Groups};
use crate::pki::{self, CertError, TrustList};

/// Member certificates peers have shown; forgotten all at once past this.
const PRESENTED_MAX: usize = 16 << 10;

/// A verified membership is verified again after this long at the latest.
const RECHECK: Duration = Duration::from_secs(30);

/// Whom this node trusts to certify publishers, and what it asks of them.
#[derive(Debug, Clone, Default)]
pub struct PublisherTrust {
    /// Publisher CA certificates (PEM or DER files).
    pub cas: Vec<PathBuf>,
    /// CRLs of those CAs (PEM or DER files).
    pub crls: Vec<PathBuf>,
    /// Refuse items whose publisher no trusted CA certifies...
    pub require_certified: bool,
    /// ...or only items with any of these tags.
    pub require_certified_tags: Vec<String>,
    /// This node's own publisher chain (PEM), which must name this node.
    pub own_chain: Option<PathBuf>,
}

/// A member certificate a peer showed, and when it last verified.
struct Presented {
    cert: Vec<u8>,
    /// (the CRL number it verified under, when, until when the certificate
    /// is valid): the check is repeated when the CRL changes, after
    /// [`RECHECK`], or once the certificate ends.
    checked: Option<(u64, Instant, u64)>,
}

/// The node's access policy. Shared by every transfer; cheap to ask.
pub struct AccessPolicy {
    checker: DrmChecker,
    /// This node's publisher chain, attached to what it publishes.
    chain: Vec<Vec<u8>>,
    groups: Arc<Groups>,
    /// Member certificates peers showed in group sessions, by (peer, group).
    presented: Mutex<HashMap<(PeerId, GroupId), Presented>>,
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl AccessPolicy {
    /// Reads the trusted publisher CAs, their CRLs and this node's own chain,
    /// which must name `local`.
    pub fn load(
        trust: &PublisherTrust,
        local: PeerId,
        groups: Arc<Groups>,
    ) -> Result<Self, CertError> {
        let list = TrustList::load(&trust.cas, &trust.crls)?;
        let chain = match &trust.own_chain {
            Some(path) => {
                let chain = pki::certs_from_file(path)?;
                let named = pki::peer_of(&chain[0])?;
                if named != local {
                    return Err(CertError::WrongPeer {
                        named: named.to_base58(),
                        expected: local.to_base58(),
                    });
                }
                chain
            }
            None => Vec::new(),
        };
        let policy = DrmPolicy {
            require_certified: trust.require_certified,
            require_certified_tags: trust.require_certified_tags.clone(),
        };
        Ok(Self {
            checker: DrmChecker::new(local, list, policy),
            chain,
            groups,
            presented: Mutex::new(HashMap::new()),
        })
    }

    /// This node's publisher chain (empty: it publishes self-signed).
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The trusted groups.
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// Before this node publishes `draft` (all but its id and size).
    pub fn check_publish(&self, draft: &Manifest, now: u64) -> Result<Certification, DrmError> {
        self.checker
            .check_publish(draft, now, &|g, p| self.member(g, p, None, now))
    }

    /// Before serving anything of `m` to `peer`, which asks on a group
    /// session of `session` (or none).
    pub fn check_serve(
        &self,
        m: &Manifest,
        peer: &PeerId,
        session: Option<GroupId>,
        now: u64,
    ) -> Result<(), DrmError> {
        self.checker
            .check_serve(m, peer, now, &|g, p| self.member(g, p, session, now))
    }

    /// Before accepting `m` from `provider`.
    pub fn check_accept(
        &self,
        m: &Manifest,
        provider: &PeerId,
        now: u64,
    ) -> Result<Certification, DrmError> {
        self.checker
            .check_accept(m, provider, now, &|g, p| self.member(g, p, None, now))
    }

    /// Whether this node may tell the network it provides `m`.
    pub fn may_announce(&self, m: &Manifest, now: u64) -> bool {
        self.checker.may_announce(m, now)
    }

    /// How `m`'s publisher is vouched for, for display.
    pub fn certification(&self, m: &Manifest, now: u64) -> Result<Certification, Untrusted> {
        self.checker.certification(m, now)
    }

    /// Of the group ids in `ids`, those this node holds a member
    /// certificate of, once each.
    pub fn own_memberships<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Vec<GroupId> {
        let mut out: Vec<GroupId> = ids
            .filter_map(|w| w.parse().ok())
            .filter(|id| self.groups.own_certificate(*id).is_some())
            .collect();
        out.dedup();
        out
    }

    /// Takes the member certificate `peer` showed in a group session of
    /// `id`, verified here first.
    pub fn take_session_member(
        &self,
        peer: &PeerId,
        id: GroupId,
        cert: &[u8],
    ) -> Result<(), GroupError> {
        self.groups.verify_member(id, peer, cert)?;
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

    /// Whether `peer` (this node when `None`) is a verified current member
    /// of the group `group` names (its id); a peer only on a group session
    /// of that group (`session`).
    pub fn member(
        &self,
        group: &str,
        peer: Option<&PeerId>,
        session: Option<GroupId>,
        now: u64,
    ) -> bool {
        let Ok(id) = group.parse::<GroupId>() else {
            return false;
        };
        match peer {
            None => self.groups.is_member(id),
            Some(_) if session != Some(id) => false,
            Some(p) => self.presented_member(p, id, now),
        }
    }

    /// Serving asks per block: a signature check each time would cost more
    /// than the block, so a membership checked under the CRL held now,
    /// recently, within its validity, stands.
    fn presented_member(&self, peer: &PeerId, id: GroupId, now: u64) -> bool {
        let crl = self.groups.crl_number(id);
        let cert = {
            let presented = self.presented.lock().expect("lock");
            let Some(shown) = presented.get(&(*peer, id)) else {
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
        let ok = self.groups.verify_member(id, peer, &cert).is_ok();
        if let Some(shown) = self.presented.lock().expect("lock").get_mut(&(*peer, id)) {
            shown.checked = ok.then(|| {
                let until = Groups::valid_until(&cert).unwrap_or(0);
                (crl, Instant::now(), until)
            });
        }
        ok
    }
}
