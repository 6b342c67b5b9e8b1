//! The content service's DRM state: the access policy
//! ([`p2pvm_security::AccessPolicy`]) and the manifests of items being
//! served. `drm.rs` is where the service asks it.
//!
//! Where the content engine asks the access policy
//! ([`p2pvm_security::AccessPolicy`]: the DRM checker and the trusted
//! groups): before it publishes, before it serves anything of an item to a
//! peer (manifest, bitfield, block, search hit), before it tells the network
//! it provides an item, and before it accepts a manifest from a provider.
//!
//! Serving asks per request, so the manifests of items being served are
//! kept decoded here (items are immutable; a deleted item's entry is
//! dropped). Group items are served only on a group session (`fastpath.rs`:
//! mutual TLS with member certificates), which the policy checks again while
//! it is used.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use p2pvm_content::{ContentId, Manifest};
use p2pvm_security::Groups;
use p2pvm_security::access::{AccessPolicy, PublisherTrust};

use super::error::{ContentServiceError, LocalError};
use crate::config::DrmConfig;

/// The DRM side of the content service: the node's access policy and the
/// manifests of the items it serves.
pub(crate) struct Rights {
    pub(super) policy: AccessPolicy,
    /// Decoded manifests of items being served (see `drm.rs`).
    pub(super) served: Mutex<HashMap<ContentId, Arc<Manifest>>>,
}

impl Rights {
    /// Reads the trusted publisher CAs, their CRLs and this node's own chain
    /// (which must name `local`).
    pub fn load(
        cfg: &DrmConfig,
        local: PeerId,
        groups: Arc<Groups>,
    ) -> Result<Self, ContentServiceError> {
        let trust = PublisherTrust {
            cas: cfg.publisher_cas.clone(),
            crls: cfg.publisher_crls.clone(),
            require_certified: cfg.require_certified,
            require_certified_tags: cfg.require_certified_tags.clone(),
            own_chain: cfg.publisher_chain.clone(),
        };
        let policy = AccessPolicy::load(&trust, local, groups)
            .map_err(|e| ContentServiceError::from(LocalError::Drm(e)))?;
        Ok(Self {
            policy,
            served: Mutex::new(HashMap::new()),
        })
    }

    /// This node's publisher chain (empty: it publishes self-signed).
    pub fn chain(&self) -> &[Vec<u8>] {
        self.policy.chain()
    }

    /// Forgets a deleted item.
    pub fn forget(&self, id: &ContentId) {
        self.served.lock().expect("lock").remove(id);
    }
}
