//! The DRM checker: a manifest's rights and its publisher's certification,
//! checked before this node shares an item (publishing it, and every request
//! it serves) and before it accepts one (every fetch into the node).
//!
//! ```text
//!  publish ──► check_publish ─┐
//!  peer asks ─► check_serve ──┼─ rights (expiry, redistribution, groups)
//!  fetch ────► check_accept ──┘  + publisher chain (trusted publisher CAs, CRLs)
//! ```
//!
//! A manifest is *certified* when it carries a chain (inside the signed
//! manifest, so the publisher's signature covers it) that verifies to a
//! trusted publisher CA and binds the publisher's peer id
//! ([`crate::pki::PEER_URI_PREFIX`]); otherwise it is *self-signed* (its
//! Ed25519 signature still proves who published it). Each failure names the
//! check that failed ([`DrmError::code`]), the same word over the API.

use libp2p_identity::PeerId;
use p2pvm_content::Manifest;
use webpki::KeyUsage;

use crate::pki::{self, CertError, TrustList};

/// id-kp-codeSigning (1.3.6.1.5.5.7.3.3), DER value bytes: a publisher
/// certificate that lists extended key usages must list this one.
const EKU_CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];

/// Why the DRM checker refused an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrmError {
    /// Its rights ended.
    #[error("DRM_EXPIRED: its rights expired at {expires_unix} (unix seconds)")]
    Expired {
        /// When.
        expires_unix: u64,
    },
    /// Only its publisher may serve it.
    #[error("DRM_NOT_REDISTRIBUTABLE: only its publisher {publisher} may serve it")]
    NotRedistributable {
        /// The publisher.
        publisher: String,
    },
    /// Its publisher's certification is missing where policy requires it, or
    /// does not verify.
    #[error("DRM_UNTRUSTED_PUBLISHER: {0}")]
    UntrustedPublisher(#[source] Untrusted),
    /// Its signature, encoding or publisher does not verify.
    #[error("DRM_FORGED_MANIFEST: {0}")]
    ForgedManifest(String),
    /// It is for members of trusted groups this peer is not a verified
    /// member of.
    #[error("DRM_NOT_GROUP_MEMBER: it is for members of {} only", .groups.join(", "))]
    NotGroupMember {
        /// The groups its rights allow.
        groups: Vec<String>,
    },
}

impl DrmError {
    /// The failed check's name, as apps see it.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Expired { .. } => "DRM_EXPIRED",
            Self::NotRedistributable { .. } => "DRM_NOT_REDISTRIBUTABLE",
            Self::UntrustedPublisher(_) => "DRM_UNTRUSTED_PUBLISHER",
            Self::ForgedManifest(_) => "DRM_FORGED_MANIFEST",
            Self::NotGroupMember { .. } => "DRM_NOT_GROUP_MEMBER",
        }
    }

    /// Parses the text a peer sent back (`CODE: reason`) into the code.
    pub fn code_in(message: &str) -> Option<&'static str> {
        [
            "DRM_EXPIRED",
            "DRM_NOT_REDISTRIBUTABLE",
            "DRM_UNTRUSTED_PUBLISHER",
            "DRM_FORGED_MANIFEST",
            "DRM_NOT_GROUP_MEMBER",
        ]
        .into_iter()
        .find(|c| message.starts_with(c))
    }
}

/// Why a publisher is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    /// No chain, and policy requires one for this item.
    #[error("the publisher is not certified, and this node requires certified publishers{}", if .tags.is_empty() { String::new() } else { format!(" for tags {}", .tags.join(", ")) })]
    Uncertified {
        /// The item's tags that made certification required (empty: all items).
        tags: Vec<String>,
    },
    /// A chain that does not verify (a forged or expired certificate, an
    /// unknown CA, a revoked or wrong-peer certificate).
    #[error("its publisher certificate: {0}")]
    Certificate(#[source] CertError),
}

/// How the publisher of a manifest is vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Certification {
    /// Only by its own peer key (the manifest signature).
    SelfSigned,
    /// It carries a chain, and this node trusts no publisher CA to check it
    /// against (not certified, as far as this node can tell).
    Unverified {
        /// The leaf's subject, as claimed.
        subject: String,
        /// The leaf's issuer, as claimed.
        issuer: String,
    },
    /// By a trusted publisher CA.
    Certified {
        /// The leaf's subject (who the publisher is).
        subject: String,
        /// The leaf's issuer (who says so).
        issuer: String,
    },
}

impl Certification {
    /// The issuer, for display; empty when self-signed.
    pub fn issuer(&self) -> &str {
        match self {
            Self::SelfSigned => "",
            Self::Certified { issuer, .. } | Self::Unverified { issuer, .. } => issuer,
        }
    }

    /// Whether a trusted CA vouches for the publisher.
    pub fn is_certified(&self) -> bool {
        matches!(self, Self::Certified { .. })
    }
}

/// When certified manifests are required.
#[derive(Debug, Clone, Default)]
pub struct DrmPolicy {
    /// For every item.
    pub require_certified: bool,
    /// For items with any of these tags.
    pub require_certified_tags: Vec<String>,
}

/// How long after an item's expiry a provider that served it is not blamed
/// for it (clock skew between the two nodes and transfer time).
pub const EXPIRY_GRACE_SECS: u64 = 600;

/// The DRM checker of one node.
#[derive(Debug)]
pub struct DrmChecker {
    local: PeerId,
    trust: TrustList,
    policy: DrmPolicy,
}

/// Group membership as the privacy controller knows it: whether `peer` (this
/// node when `None`) is a verified current member of `group`.
pub type Membership<'a> = &'a dyn Fn(&str, Option<&PeerId>) -> bool;

impl DrmChecker {
    /// The checker of the node `local`, trusting the publisher CAs in `trust`.
    pub fn new(local: PeerId, trust: TrustList, policy: DrmPolicy) -> Self {
        Self {
            local,
            trust,
            policy,
        }
    }

    /// How `m`'s publisher is vouched for at `now` (a chain that does not
    /// verify is an error, not "self-signed").
    pub fn certification(&self, m: &Manifest, now: u64) -> Result<Certification, Untrusted> {
        let Some(leaf) = m.publisher_certificates.first() else {
            return Ok(Certification::SelfSigned);
        };
        if self.trust.is_empty() {
            return Ok(Certification::Unverified {
                subject: pki::subject_of(leaf),
                issuer: pki::issuer_of(leaf),
            });
        }
        let publisher: PeerId = m.publisher.parse().map_err(|_| {
            Untrusted::Certificate(CertError::WrongPeer {
                named: String::new(),
                expected: m.publisher.clone(),
            })
        })?;
        self.trust
            .verify_peer(
                &m.publisher_certificates,
                &publisher,
                now,
                KeyUsage::required_if_present(EKU_CODE_SIGNING),
            )
            .map_err(Untrusted::Certificate)?;
        Ok(Certification::Certified {
            subject: pki::subject_of(leaf),
            issuer: pki::issuer_of(leaf),
        })
    }

    /// The tags of `m` that make certification required (`Some(vec![])`:
    /// required for everything), or `None`.
    fn certification_required(&self, m: &Manifest) -> Option<Vec<String>> {
        if self.policy.require_certified {
            return Some(Vec::new());
        }
        let tags: Vec<String> = m
            .tags
            .iter()
            .filter(|t| {
                self.policy
                    .require_certified_tags
                    .iter()
                    .any(|r| r.eq_ignore_ascii_case(t))
            })
            .cloned()
            .collect();
        (!tags.is_empty()).then_some(tags)
    }

    fn certified_as_policy_requires(
        &self,
        m: &Manifest,
        now: u64,
    ) -> Result<Certification, DrmError> {
        let c = self
            .certification(m, now)
            .map_err(DrmError::UntrustedPublisher)?;
        if !c.is_certified()
            && let Some(tags) = self.certification_required(m)
        {
            return Err(DrmError::UntrustedPublisher(Untrusted::Uncertified {
                tags,
            }));
        }
        Ok(c)
    }

    fn not_expired(m: &Manifest, now: u64) -> Result<(), DrmError> {
        match &m.rights {
            Some(r) if r.expires_unix != 0 && r.expires_unix <= now => Err(DrmError::Expired {
                expires_unix: r.expires_unix,
            }),
            _ => Ok(()),
        }
    }

    fn allowed_groups(m: &Manifest) -> &[String] {
        m.rights
            .as_ref()
            .map(|r| r.allowed_groups.as_slice())
            .unwrap_or_default()
    }

    fn member(m: &Manifest, peer: Option<&PeerId>, membership: Membership<'_>) -> bool {
        let groups = Self::allowed_groups(m);
        groups.is_empty() || groups.iter().any(|g| membership(g, peer))
    }

    /// Whether anyone but the publisher may serve `m`. No rights section
    /// means no restriction.
    pub fn redistributable(m: &Manifest) -> bool {
        m.rights.as_ref().is_none_or(|r| r.redistribution_allowed)
    }

    /// Whether `peer` may serve `m` to anyone.
    pub fn may_be_served_by(m: &Manifest, peer: &PeerId) -> bool {
        Self::redistributable(m) || m.publisher == peer.to_base58()
    }

    /// Before this node publishes `m`: not already expired, for a group
    /// only while this node is a verified member of it (a revoked member
    /// must not hold, nor hand out, the group's items), and certified where
    /// policy requires (this node's own chain must verify here too).
    pub fn check_publish(
        &self,
        m: &Manifest,
        now: u64,
        membership: Membership<'_>,
    ) -> Result<Certification, DrmError> {
        Self::not_expired(m, now)?;
        if !Self::member(m, None, membership) {
            return Err(DrmError::NotGroupMember {
                groups: Self::allowed_groups(m).to_vec(),
            });
        }
        self.certified_as_policy_requires(m, now)
    }

    /// Before this node serves `m` (a block, its manifest, its bitfield) to
    /// `peer`.
    pub fn check_serve(
        &self,
        m: &Manifest,
        peer: &PeerId,
        now: u64,
        membership: Membership<'_>,
    ) -> Result<(), DrmError> {
        Self::not_expired(m, now)?;
        if !Self::may_be_served_by(m, &self.local) {
            return Err(DrmError::NotRedistributable {
                publisher: m.publisher.clone(),
            });
        }
        if !Self::member(m, Some(peer), membership) {
            return Err(DrmError::NotGroupMember {
                groups: Self::allowed_groups(m).to_vec(),
            });
        }
        Ok(())
    }

    /// Whether this node may tell the network it provides `m`.
    pub fn may_announce(&self, m: &Manifest, now: u64) -> bool {
        Self::not_expired(m, now).is_ok() && Self::may_be_served_by(m, &self.local)
    }

    /// Before this node accepts `m` (its manifest already signature-checked)
    /// from `provider`: the provider may serve it, it has not expired, this
    /// node may hold it, and its publisher is certified where required.
    pub fn check_accept(
        &self,
        m: &Manifest,
        provider: &PeerId,
        now: u64,
        membership: Membership<'_>,
    ) -> Result<Certification, DrmError> {
        if !Self::may_be_served_by(m, provider) {
            return Err(DrmError::NotRedistributable {
                publisher: m.publisher.clone(),
            });
        }
        Self::not_expired(m, now)?;
        if !Self::member(m, None, membership) {
            return Err(DrmError::NotGroupMember {
                groups: Self::allowed_groups(m).to_vec(),
            });
        }
        self.certified_as_policy_requires(m, now)
    }

    /// Whether a failure of [`Self::check_accept`] at `now` is the
    /// provider's doing (it served what it must not: the provider loses
    /// credit) rather than this node's policy. An item that expired less than
    /// [`EXPIRY_GRACE_SECS`] ago is refused but not held against anyone: the
    /// provider checked it against its own clock when it served it, and
    /// clocks and the network disagree by that much.
    pub fn provider_at_fault(e: &DrmError, now: u64) -> bool {
        match e {
            DrmError::NotRedistributable { .. } | DrmError::ForgedManifest(_) => true,
            DrmError::Expired { expires_unix } => {
                expires_unix.saturating_add(EXPIRY_GRACE_SECS) <= now
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;
    use p2pvm_content::Rights;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, RevokedCertParams, SanType,
        SerialNumber,
    };

    const NOW: u64 = 1_800_000_000;

    fn at(unix: u64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(unix as i64).unwrap()
    }

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.not_before = at(NOW - 86_400);
        p.not_after = at(NOW + 86_400 * 365);
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    fn leaf(ca: &Ca, peer: &PeerId, serial: u64, from: u64, until: u64) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "Studio One");
        p.subject_alt_names = vec![SanType::URI(
            format!("{}{peer}", pki::PEER_URI_PREFIX)
                .try_into()
                .unwrap(),
        )];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        p.serial_number = Some(SerialNumber::from(serial));
        p.not_before = at(from);
        p.not_after = at(until);
        p.signed_by(&key, &ca.cert, &ca.key).unwrap().der().to_vec()
    }

    fn manifest(publisher: &PeerId, rights: Option<Rights>, chain: Vec<Vec<u8>>) -> Manifest {
        Manifest {
            content_id: vec![7; 32],
            name: "film.mp4".into(),
            publisher: publisher.to_base58(),
            tags: vec!["film".into()],
            rights,
            publisher_certificates: chain,
            ..Default::default()
        }
    }

    fn rights(redistribute: bool, expires: u64, groups: &[&str]) -> Option<Rights> {
        Some(Rights {
            licence: "CC-BY-4.0".into(),
            redistribution_allowed: redistribute,
            expires_unix: expires,
            allowed_groups: groups.iter().map(|g| g.to_string()).collect(),
        })
    }

    fn checker(local: PeerId, cas: &[&Ca], crls: &[Vec<u8>], policy: DrmPolicy) -> DrmChecker {
        let cas: Vec<Vec<u8>> = cas.iter().map(|c| c.cert.der().to_vec()).collect();
        DrmChecker::new(local, TrustList::from_der(&cas, crls).unwrap(), policy)
    }

    /// A checker that trusts no CA and requires certification of everything.
    fn strict_checker(local: PeerId) -> DrmChecker {
        checker(
            local,
            &[],
            &[],
            DrmPolicy {
                require_certified: true,
                ..Default::default()
            },
        )
    }

    fn nobody(_: &str, _: Option<&PeerId>) -> bool {
        false
    }

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    #[test]
    fn rights_decide_who_serves_and_until_when() {
        let (publisher, me, other) = (peer(), peer(), peer());
        let c = checker(me, &[], &[], DrmPolicy::default());
        let open = manifest(&publisher, rights(true, 0, &[]), vec![]);
        assert_eq!(c.check_serve(&open, &other, NOW, &nobody), Ok(()));
        assert!(c.may_announce(&open, NOW));
        // Not redistributable: we are not the publisher, so we never serve it,
        // and a provider that is not the publisher must not have served it.
        let closed = manifest(&publisher, rights(false, 0, &[]), vec![]);
        let e = c.check_serve(&closed, &other, NOW, &nobody).unwrap_err();
        assert_eq!(e.code(), "DRM_NOT_REDISTRIBUTABLE");
        assert!(!c.may_announce(&closed, NOW));
        assert!(c.check_accept(&closed, &publisher, NOW, &nobody).is_ok());
        let e = c.check_accept(&closed, &other, NOW, &nobody).unwrap_err();
        assert!(DrmChecker::provider_at_fault(&e, NOW), "{e}");
        // The publisher serves its own closed item.
        let pc = checker(publisher, &[], &[], DrmPolicy::default());
        assert_eq!(pc.check_serve(&closed, &other, NOW, &nobody), Ok(()));
        // Expiry: served and accepted until the second it names.
        let expiring = manifest(&publisher, rights(true, NOW + 1, &[]), vec![]);
        assert!(c.check_serve(&expiring, &other, NOW, &nobody).is_ok());
        let e = c
            .check_serve(&expiring, &other, NOW + 1, &nobody)
            .unwrap_err();
        assert_eq!(e.code(), "DRM_EXPIRED");
        let e = c
            .check_accept(&expiring, &publisher, NOW + 5, &nobody)
            .unwrap_err();
        assert_eq!(e.code(), "DRM_EXPIRED");
        // Refused, but a provider is blamed only once the item expired
        // longer ago than clocks may disagree.
        assert!(!DrmChecker::provider_at_fault(&e, NOW + 5));
        assert!(!DrmChecker::provider_at_fault(&e, NOW + EXPIRY_GRACE_SECS));
        assert!(DrmChecker::provider_at_fault(
            &e,
            NOW + 1 + EXPIRY_GRACE_SECS
        ));
        assert_eq!(
            c.check_publish(&expiring, NOW + 1, &nobody)
                .unwrap_err()
                .code(),
            "DRM_EXPIRED"
        );
        // No rights section: no restriction.
        let none = manifest(&publisher, None, vec![]);
        assert!(c.check_serve(&none, &other, NOW, &nobody).is_ok());
    }

    #[test]
    fn group_items_go_to_verified_members_only() {
        let (publisher, me, member, stranger) = (peer(), peer(), peer(), peer());
        let c = checker(me, &[], &[], DrmPolicy::default());
        let m = manifest(&publisher, rights(true, 0, &["crew"]), vec![]);
        let members = |g: &str, p: Option<&PeerId>| g == "crew" && p.is_none_or(|p| *p == member);
        assert!(c.check_serve(&m, &member, NOW, &members).is_ok());
        let e = c.check_serve(&m, &stranger, NOW, &members).unwrap_err();
        assert_eq!(e.code(), "DRM_NOT_GROUP_MEMBER");
        assert!(e.to_string().contains("crew"), "{e}");
        assert!(c.check_accept(&m, &publisher, NOW, &members).is_ok());
        let e = c.check_accept(&m, &publisher, NOW, &nobody).unwrap_err();
        assert!(!DrmChecker::provider_at_fault(&e, NOW));
        // Publishing for a group needs this node's own membership.
        assert!(c.check_publish(&m, NOW, &members).is_ok());
        let e = c.check_publish(&m, NOW, &nobody).unwrap_err();
        assert_eq!(e.code(), "DRM_NOT_GROUP_MEMBER");
    }

    #[test]
    fn a_chain_to_a_trusted_ca_certifies_its_publisher() {
        let (publisher, me) = (peer(), peer());
        let studio_ca = ca("Studio CA");
        let chain = vec![leaf(&studio_ca, &publisher, 2, NOW - 60, NOW + 3600)];
        let c = checker(me, &[&studio_ca], &[], DrmPolicy::default());
        let m = manifest(&publisher, None, chain.clone());
        match c.check_accept(&m, &publisher, NOW, &nobody).unwrap() {
            Certification::Certified { subject, issuer } => {
                assert!(subject.contains("Studio One"), "{subject}");
                assert!(issuer.contains("Studio CA"), "{issuer}");
            }
            other => panic!("{other:?}"),
        }
        // The same chain claimed by someone else's manifest binds the wrong peer.
        let thief = peer();
        let stolen = manifest(&thief, None, chain.clone());
        let e = c.certification(&stolen, NOW).unwrap_err();
        assert!(
            matches!(e, Untrusted::Certificate(CertError::WrongPeer { .. })),
            "{e}"
        );
        // Outside its validity, or from a CA this node does not trust.
        assert_eq!(
            c.certification(&m, NOW + 7200).unwrap_err(),
            Untrusted::Certificate(CertError::Expired)
        );
        assert_eq!(
            c.certification(&m, NOW - 3600).unwrap_err(),
            Untrusted::Certificate(CertError::NotYetValid)
        );
        // A node that trusts no publisher CA cannot tell, and says so; where
        // policy requires certification, that is not enough.
        let blind = checker(me, &[], &[], DrmPolicy::default());
        assert!(matches!(
            blind.certification(&m, NOW),
            Ok(Certification::Unverified { .. })
        ));
        let strict_blind = strict_checker(me);
        assert_eq!(
            strict_blind
                .check_accept(&m, &publisher, NOW, &nobody)
                .unwrap_err()
                .code(),
            "DRM_UNTRUSTED_PUBLISHER"
        );
        let stranger_ca = ca("Someone Else");
        let other = checker(me, &[&stranger_ca], &[], DrmPolicy::default());
        assert_eq!(
            other.certification(&m, NOW).unwrap_err(),
            Untrusted::Certificate(CertError::UnknownIssuer)
        );
        // A garbled certificate is refused, not trusted and not a panic.
        let mut bad = chain[0].clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        let garbled = manifest(&publisher, None, vec![bad]);
        assert!(c.certification(&garbled, NOW).is_err());
    }

    #[test]
    fn a_revoked_publisher_certificate_does_not_certify() {
        let (publisher, me) = (peer(), peer());
        let studio_ca = ca("Studio CA");
        let chain = vec![leaf(&studio_ca, &publisher, 42, NOW - 60, NOW + 3600)];
        let crl = CertificateRevocationListParams {
            this_update: at(NOW - 10),
            next_update: at(NOW + 86_400),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(42u64),
                revocation_time: at(NOW - 10),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&studio_ca.cert, &studio_ca.key)
        .unwrap();
        let c = checker(
            me,
            &[&studio_ca],
            &[crl.der().to_vec()],
            DrmPolicy::default(),
        );
        let m = manifest(&publisher, None, chain);
        assert_eq!(
            c.certification(&m, NOW).unwrap_err(),
            Untrusted::Certificate(CertError::Revoked)
        );
    }

    #[test]
    fn policy_requires_certification_for_all_items_or_for_tags() {
        let (publisher, me) = (peer(), peer());
        let self_signed = manifest(&publisher, None, vec![]);
        let lax = checker(me, &[], &[], DrmPolicy::default());
        assert_eq!(
            lax.check_accept(&self_signed, &publisher, NOW, &nobody),
            Ok(Certification::SelfSigned)
        );
        let strict = strict_checker(me);
        let e = strict
            .check_accept(&self_signed, &publisher, NOW, &nobody)
            .unwrap_err();
        assert_eq!(e.code(), "DRM_UNTRUSTED_PUBLISHER");
        let films = checker(
            me,
            &[],
            &[],
            DrmPolicy {
                require_certified_tags: vec!["FILM".into()],
                ..Default::default()
            },
        );
        let e = films
            .check_accept(&self_signed, &publisher, NOW, &nobody)
            .unwrap_err();
        assert!(e.to_string().contains("film"), "{e}");
        let mut untagged = self_signed.clone();
        untagged.tags.clear();
        assert!(
            films
                .check_accept(&untagged, &publisher, NOW, &nobody)
                .is_ok()
        );
    }

    #[test]
    fn codes_read_back_from_a_peers_message() {
        let e = DrmError::NotRedistributable {
            publisher: "x".into(),
        };
        assert_eq!(DrmError::code_in(&e.to_string()), Some(e.code()));
        assert_eq!(DrmError::code_in("not found"), None);
    }
}
