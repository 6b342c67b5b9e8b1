//! The privacy controller's trusted peer groups: a group is its CA
//! certificate. Its owner holds the CA key, **invites** a peer by issuing a
//! member certificate bound to that peer's id (a URI SAN
//! `urn:p2pvm:peer:<id>`, as [`crate::pki`] reads it) for a validity period,
//! and **revokes** members with a signed X.509 CRL whose number only grows.
//! A member **joins** by importing an invitation (PEM: the group CA, its
//! member certificate, the current CRL, if any).
//!
//! ```text
//!  owner: create ─► CA key (0600) + ca.pem ─► invite PEER ─► invitation.pem ──► member: join
//!         revoke PEER ─► crl.pem (number n+1) ─────────────── accept_crl (n+1 > n, signed by the CA)
//!  anyone serving group content: verify_member(group, peer, its certificate) = chain to the
//!  group CA, valid now, not revoked, bound to the peer the connection authenticated
//! ```
//!
//! On disk, under the groups directory: one directory per group, named by
//! its id (a BLAKE3 digest of the CA's public key, so two groups with the same
//! name never mix): `name`, `ca.pem`, `member.pem` (this node's own
//! certificate), `crl.pem`, and for groups this node owns `ca.key` (mode
//! 0600, never sent anywhere) and `issued/<peer>.pem`. Certificates and CRLs
//! made with the `openssl` CLI work the same as ours (docs/security.md).
//!
//! The files, by job: this one is the registry (the groups this node knows,
//! by id and local name) and the types; `issue` is the owner's side, `check`
//! joining, CRLs and membership checks, `disk` the on-disk folders,
//! `topic_keys` the per-epoch keys of group topics.

mod check;
mod disk;
mod issue;
mod topic_keys;

use crate::Cause;
pub use crate::group_id::{GroupId, group_id};
use check::{crl_checked, serial_of, validity};
use disk::write_file;
pub use issue::certificate_request;
use issue::{ca_params, pem};

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libp2p_identity::PeerId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};
use webpki::KeyUsage;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::group_topics::{self, EpochKeyError, KEY_LEN};
use crate::pki::{self, CertError, TrustList};

/// Why a group operation failed. Nothing is changed on disk when one does.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// No group by that name or id here.
    #[error("no group {0:?} here")]
    Unknown(String),
    /// A group by that name exists already.
    #[error("a group named {0:?} exists already")]
    Exists(String),
    /// The name is empty, too long or has characters other than letters,
    /// digits, `-`, `_`, `.`.
    #[error(
        "bad group name {0:?}: 1-64 letters, digits, '-', '_' or '.' (choose one with `p2pctl group join FILE --name NAME`)"
    )]
    BadName(String),
    /// Only the group's owner (who holds its CA key) may do this.
    #[error("this node does not own group {0} (it has no CA key for it)")]
    NotOwner(String),
    /// A certificate or CRL is not acceptable.
    #[error("{0}")]
    Certificate(#[from] CertError),
    /// An invitation is missing a part or is for another peer.
    #[error("bad invitation: {0}")]
    Invitation(String),
    /// A CRL is not newer than the one held, or not signed by the group CA.
    #[error("CRL refused: {why}")]
    Crl {
        /// Why it was refused.
        why: String,
        /// The parser's or the signature check's error, when one failed.
        #[source]
        source: Option<Cause>,
    },
    /// An epoch signature gives no topic key.
    #[error("topic key refused: {0}")]
    EpochKey(#[from] EpochKeyError),
    /// The peer was never invited (nothing to revoke).
    #[error("peer {0} holds no certificate of this group")]
    NotInvited(String),
    /// Making a key, certificate, CRL or TLS configuration failed.
    #[error("cannot make {what}")]
    Make {
        /// What could not be made.
        what: String,
        /// The library's error, when one failed.
        #[source]
        source: Option<Cause>,
    },
    /// Reading or writing the group's files failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GroupError {
    let what = what.into();
    move |source| GroupError::Io { what, source }
}

fn make(e: rcgen::Error) -> GroupError {
    GroupError::made("a certificate", e)
}

impl GroupError {
    /// Making `what` failed in a library.
    pub fn made(what: &str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        GroupError::Make {
            what: what.to_owned(),
            source: Some(Cause::new(source)),
        }
    }

    /// `what` cannot be made, for a reason of ours.
    pub fn cannot_make(what: &str) -> Self {
        GroupError::Make {
            what: what.to_owned(),
            source: None,
        }
    }

    /// A CRL refused, for a reason of ours.
    pub fn crl(why: impl Into<String>) -> Self {
        GroupError::Crl {
            why: why.into(),
            source: None,
        }
    }

    /// A CRL refused because `source` failed on it.
    pub fn crl_failed(
        why: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        GroupError::Crl {
            why: why.to_owned(),
            source: Some(Cause::new(source)),
        }
    }
}

/// The file that marks a group whose CRL this node passes on although it
/// does not own the group.
const RELAY_CRL: &str = "relay-crl";

/// id-kp-clientAuth: member certificates are TLS client and server
/// certificates of group sessions; one that lists usages must allow this.
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// A group as this node knows it.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    /// Its id.
    pub id: GroupId,
    /// Its local name.
    pub name: String,
    /// Whether this node holds its CA key.
    pub owner: bool,
    /// The CA's subject.
    pub ca_subject: String,
    /// This node's own membership: valid until (unix seconds), if it has one.
    pub member_until: Option<u64>,
    /// The number of the CRL held (0: none).
    pub crl_number: u64,
    /// Whether this node sends the group's CRL on to its members: it owns
    /// the group, or its operator handed it a CRL to publish.
    pub relays_crl: bool,
}

/// A member certificate the owner issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The peer it binds.
    pub peer: String,
    /// Its serial number (hex).
    pub serial: String,
    /// Valid from, until (unix seconds).
    pub not_before: u64,
    /// Until.
    pub not_after: u64,
    /// Listed in the group's CRL.
    pub revoked: bool,
}

/// One group's parsed state.
struct Group {
    name: String,
    dir: PathBuf,
    ca_der: Vec<u8>,
    member_der: Option<Vec<u8>>,
    crl_der: Option<Vec<u8>>,
    /// The held CRL's number (0: none), checked when it was taken.
    crl_number: u64,
    /// Topic keys held, by epoch (kept in memory: they are read for every
    /// group message). An epoch has one key unless its CA signed it more
    /// than once (ECDSA signatures differ each time): every such key is the
    /// CA's, so each is kept and tried; the first seals and is handed out.
    epochs: BTreeMap<u64, Vec<Epoch>>,
    owner: bool,
    /// The operator handed this node a CRL to pass on (`relay-crl`).
    relays_crl: bool,
}

/// One epoch's topic key and the CA signature it is derived from (what
/// members hand each other).
#[derive(Clone)]
struct Epoch {
    key: [u8; KEY_LEN],
    signature: Vec<u8>,
}

/// The groups of one node.
pub struct Groups {
    dir: PathBuf,
    local: PeerId,
    groups: Mutex<BTreeMap<GroupId, Group>>,
    clock: Clock,
}

/// Where [`Groups`] reads the time (Unix seconds) it issues and checks
/// certificates at: the system clock, or one a test moves, so that expiry is
/// tested without waiting for it.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Arc::new(now_unix))
    }

    /// A clock that reads `now`.
    pub fn from_fn(now: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    fn now(&self) -> u64 {
        (self.0)()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}

impl fmt::Debug for Groups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Groups").field("dir", &self.dir).finish()
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn at(unix: u64) -> Result<time::OffsetDateTime, GroupError> {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .map_err(|e| GroupError::made("a time for the certificate", e))
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The local name a joined group gets when the operator gives none: the
/// CA's common name made into a valid name (any other character becomes
/// '-': "p2pvm test group" is "p2pvm-test-group"), with the group id's
/// start appended if another group has that name, or the id itself when
/// the CA has no usable common name.
fn local_name(cn: Option<&str>, id: GroupId, taken: &dyn Fn(&str) -> bool) -> String {
    let mut name = String::new();
    for c in cn.unwrap_or_default().chars() {
        let c = if c.is_ascii_alphanumeric() || "-_.".contains(c) {
            c
        } else {
            '-'
        };
        if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
            name.push(c);
        }
    }
    let name: String = name.chars().take(48).collect();
    let name = name.trim_end_matches('-');
    let id = id.to_string();
    if name.is_empty() {
        return id;
    }
    if taken(name) {
        return format!("{name}-{}", &id[..id.len().min(12)]);
    }
    name.to_owned()
}

impl Groups {
    /// The groups under `dir` of the node `local`.
    pub fn open(dir: &Path, local: PeerId) -> Result<Self, GroupError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut groups = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))?;
        for e in entries.flatten() {
            let path = e.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<GroupId>().ok())
            else {
                continue;
            };
            match Group::load(&path) {
                Ok(g) => {
                    groups.insert(id, g);
                }
                Err(e) => {
                    tracing::warn!(group = %id, error = %e, "skipping a group that does not load")
                }
            }
        }
        let this = Self {
            dir: dir.to_owned(),
            local,
            groups: Mutex::new(groups),
            clock: Clock::system(),
        };
        for g in this.list() {
            if g.owner
                && this.topic_key_at(g.id, g.crl_number).is_none()
                && let Err(e) = this.sign_epoch(g.id, g.crl_number)
            {
                tracing::warn!(group = %g.id, error = %e, "cannot sign the group's current topic key");
            }
        }
        Ok(this)
    }

    /// The same groups, reading the time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupId, Group>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the group named `name_or_id` here.
    pub fn resolve(&self, name_or_id: &str) -> Result<GroupId, GroupError> {
        let groups = self.lock();
        if let Ok(id) = name_or_id.parse::<GroupId>()
            && groups.contains_key(&id)
        {
            return Ok(id);
        }
        groups
            .iter()
            .find(|(_, g)| g.name == name_or_id)
            .map(|(id, _)| *id)
            .ok_or_else(|| GroupError::Unknown(name_or_id.into()))
    }

    /// Every group this node knows.
    pub fn list(&self) -> Vec<GroupInfo> {
        self.lock().iter().map(|(id, g)| g.info(*id)).collect()
    }

    fn info(&self, id: GroupId) -> Result<GroupInfo, GroupError> {
        self.lock()
            .get(&id)
            .map(|g| g.info(id))
            .ok_or_else(|| GroupError::Unknown(id.to_string()))
    }

    /// The number of the CRL held for group `id` (0: none): it changes
    /// whenever a revocation arrives, so a membership checked under one
    /// number stays checked until it changes.
    pub fn crl_number(&self, id: GroupId) -> u64 {
        self.lock().get(&id).map(|g| g.crl_number).unwrap_or(0)
    }

    /// A member certificate's end of validity (unix seconds).
    pub fn valid_until(cert_der: &[u8]) -> Option<u64> {
        validity(cert_der).ok().map(|(_, until)| until)
    }

    /// The CRL held for group `id` (DER), if any.
    pub fn crl(&self, id: GroupId) -> Option<Vec<u8>> {
        self.lock().get(&id).and_then(|g| g.crl_der.clone())
    }

    /// This node's own member certificate (DER) in group `id`.
    pub fn own_certificate(&self, id: GroupId) -> Option<Vec<u8>> {
        self.lock().get(&id).and_then(|g| g.member_der.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

    #[test]
    fn a_refused_crl_keeps_the_parsers_error_as_its_source() {
        use std::error::Error;
        let e = crl_checked(b"not a CRL", b"not a CA").unwrap_err();
        assert!(matches!(e, GroupError::Crl { .. }), "{e:?}");
        assert_eq!(e.to_string(), "CRL refused: the group CA does not parse");
        let parser = e.source().expect("the parser's error");
        assert!(!parser.to_string().is_empty());
    }

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn node() -> (Groups, PeerId, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let me = peer();
        (Groups::open(dir.path(), me).unwrap(), me, dir)
    }

    #[test]
    fn a_joined_group_gets_a_valid_local_name_from_any_ca_name() {
        let id = GroupId([0xab; 16]);
        let free = |_: &str| false;
        let name = |cn: Option<&str>| local_name(cn, id, &free);
        assert_eq!(name(Some("p2pvm test group")), "p2pvm-test-group");
        assert_eq!(name(Some("film club (Berlin)")), "film-club-Berlin");
        assert_eq!(name(Some("Ünïcode CA!!")), "n-code-CA");
        assert_eq!(name(Some("crew")), "crew");
        assert_eq!(name(Some("   ")), id.to_string());
        assert_eq!(name(None), id.to_string());
        assert!(valid_name(&name(Some(&"x".repeat(300)))));
        let cut = name(Some(&format!("{} tail", "y".repeat(47))));
        assert_eq!(cut, "y".repeat(47), "no '-' left where the name was cut");
        let crew_taken = |n: &str| n == "crew";
        assert_eq!(
            local_name(Some("crew"), id, &crew_taken),
            "crew-abababababab"
        );
    }

    fn member_cert(invitation: &str) -> Vec<u8> {
        pki::certs_from_bytes(invitation.as_bytes()).unwrap()[1].clone()
    }

    #[test]
    fn a_certificate_request_is_signed_by_the_peers_own_key_and_names_it() {
        use x509_parser::certification_request::X509CertificationRequest;
        let k = Keypair::generate_ed25519();
        let id = k.public().to_peer_id();
        let ed = k.clone().try_into_ed25519().unwrap();
        let pem = certificate_request(&k).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
            .unwrap();
        let (_, req) = X509CertificationRequest::from_der(&der).unwrap();
        req.verify_signature().unwrap();
        let spki = &req.certification_request_info.subject_pki;
        assert_eq!(
            &spki.subject_public_key.data[..],
            &ed.public().to_bytes()[..]
        );
        let uri = format!("{}{id}", pki::PEER_URI_PREFIX);
        assert!(der.windows(uri.len()).any(|w| w == uri.as_bytes()));
    }

    #[test]
    fn a_member_certificate_for_another_key_is_refused() {
        let (owner, _, _d) = node();
        let (member, member_id, _m) = node();
        let g = owner.create("crew", 86_400).unwrap();
        let invitation = owner.invite("crew", &member_id, 3600).unwrap();
        member.join(invitation.as_bytes(), None).unwrap();
        // A valid certificate of the group naming member_id, but for a key
        // member_id does not hold: the CA signs it, yet it is refused.
        let (ca, ca_key) = owner.lock().get(&g.id).unwrap().issuer().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            format!("{}{member_id}", pki::PEER_URI_PREFIX)
                .try_into()
                .unwrap(),
        )];
        let other = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let forged = p.signed_by(&other, &ca, &ca_key).unwrap().der().to_vec();
        let e = owner.verify_member(g.id, &member_id, &forged).unwrap_err();
        assert!(e.to_string().contains("not the libp2p key"), "{e}");
        let good = member.own_certificate(g.id).unwrap();
        owner.verify_member(g.id, &member_id, &good).unwrap();
    }

    #[test]
    fn an_epoch_signed_twice_keeps_both_keys_and_no_key_comes_before_its_crl() {
        let (owner, owner_id, owner_dir) = node();
        let g = owner.create("crew", 86_400).unwrap();
        let first = owner.topic_key_at(g.id, 0).unwrap();
        // The CA signs epoch 0 again (ECDSA: another signature, another
        // key): both are the CA's, both are kept, the first still seals.
        let pkcs8 = owner.lock().get(&g.id).unwrap().ca_key_pkcs8().unwrap();
        let again = group_topics::sign_epoch(&pkcs8, g.id, 0).unwrap();
        let second = owner.take_epoch_signature(g.id, 0, &again).unwrap();
        assert_ne!(first, second);
        assert_eq!(owner.topic_keys_at(g.id, 0), vec![first, second]);
        assert_eq!(owner.take_epoch_signature(g.id, 0, &again).unwrap(), second);
        assert_eq!(owner.topic_keys_at(g.id, 0).len(), 2, "kept once");
        // No key for an epoch whose CRL is not here yet.
        let ahead = group_topics::sign_epoch(&pkcs8, g.id, 1).unwrap();
        assert!(matches!(
            owner.take_epoch_signature(g.id, 1, &ahead),
            Err(GroupError::EpochKey(EpochKeyError::NotCurrent {
                epoch: 1,
                held: 0
            }))
        ));
        // One left on disk from before (a crash, an older version) is
        // deleted when the group is opened, as are raw key files.
        let keys = owner_dir.path().join(g.id.to_string()).join("keys");
        std::fs::write(keys.join("1.sig"), &ahead).unwrap();
        std::fs::write(keys.join("0"), [7u8; KEY_LEN]).unwrap();
        let reopened = Groups::open(owner_dir.path(), owner_id).unwrap();
        assert_eq!(reopened.topic_keys_at(g.id, 0), vec![first, second]);
        assert!(reopened.topic_key_at(g.id, 1).is_none());
        assert!(!keys.join("1.sig").exists() && !keys.join("0").exists());
        // A CRL numbered as the one held but different is refused.
        let (other, other_id, _o) = node();
        other
            .join(
                owner.invite("crew", &other_id, 3600).unwrap().as_bytes(),
                None,
            )
            .unwrap();
        let crl = owner.revoke("crew", &other_id).unwrap();
        assert_eq!(
            owner.topic_keys_at(g.id, 1).len(),
            1,
            "signed after its CRL"
        );
        let (third, third_id, _t) = node();
        third
            .join(
                owner.invite("crew", &third_id, 3600).unwrap().as_bytes(),
                None,
            )
            .unwrap();
        let p = owner.lock().get(&g.id).unwrap().issuer().unwrap();
        let forked = CertificateRevocationListParams {
            this_update: at(now_unix() - 1).unwrap(),
            next_update: at(now_unix() + 86_400).unwrap(),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&p.0, &p.1)
        .unwrap();
        assert!(matches!(
            third.relay_crl(g.id, forked.der()),
            Err(GroupError::Crl { .. })
        ));
        assert!(
            third.relay_crl(g.id, &crl).is_ok(),
            "the same CRL again is fine"
        );
    }

    #[test]
    fn an_invited_peer_joins_and_proves_membership_until_revoked() {
        let (owner, owner_id, owner_dir) = node();
        let (member, member_id, member_dir) = node();
        let g = owner.create("crew", 86_400 * 30).unwrap();
        assert!(g.owner && owner.is_member(g.id));
        // The CA key is the owner's alone.
        let key = owner_dir.path().join(g.id.to_string()).join("ca.key");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let invitation = owner.invite("crew", &member_id, 3600).unwrap();
        // The certificate is for the member's own peer key.
        let cert = member_cert(&invitation);
        let (_, parsed) = X509Certificate::from_der(&cert).unwrap();
        let peer_key = p2pvm_content::inline_public_key(&member_id)
            .unwrap()
            .try_into_ed25519()
            .unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            peer_key.to_bytes().as_slice()
        );
        let joined = member.join(invitation.as_bytes(), None).unwrap();
        assert_eq!(
            (joined.id, joined.name.as_str(), joined.owner),
            (g.id, "crew", false)
        );
        assert!(member.is_member(g.id));
        // The owner checks the member's certificate as it arrives on the
        // member's connection; on anyone else's it proves nothing.
        let cert = member_cert(&invitation);
        owner.verify_member(g.id, &member_id, &cert).unwrap();
        assert!(matches!(
            owner.verify_member(g.id, &peer(), &cert),
            Err(GroupError::Certificate(CertError::WrongPeer { .. }))
        ));
        // Another peer cannot join with the member's invitation.
        let (thief, _, _t) = node();
        assert!(thief.join(invitation.as_bytes(), None).is_err());
        assert!(thief.list().is_empty(), "a refused join left state behind");

        // Revoked: the owner's CRL says so at once; the member learns it from
        // the CRL, which only a newer one replaces.
        let crl = owner.revoke("crew", &member_id).unwrap();
        assert!(matches!(
            owner.verify_member(g.id, &member_id, &cert),
            Err(GroupError::Certificate(CertError::Revoked))
        ));
        assert!(member.accept_crl(g.id, &crl).unwrap());
        assert!(!member.is_member(g.id));
        assert!(
            !member.accept_crl(g.id, &crl).unwrap(),
            "the same CRL twice"
        );
        let members = owner.members("crew").unwrap();
        let row = members
            .iter()
            .find(|m| m.peer == member_id.to_base58())
            .unwrap();
        assert!(row.revoked);
        assert!(
            members
                .iter()
                .any(|m| m.peer == owner_id.to_base58() && !m.revoked)
        );
        // A second revocation numbers its CRL higher, and keeps the first.
        let (other, other_id, _o) = node();
        other
            .join(
                owner.invite("crew", &other_id, 3600).unwrap().as_bytes(),
                None,
            )
            .unwrap();
        let crl2 = owner.revoke("crew", &other_id).unwrap();
        assert!(member.accept_crl(g.id, &crl2).unwrap());
        assert!(
            !member.accept_crl(g.id, &crl).unwrap(),
            "an older CRL replaced a newer one"
        );
        assert_eq!(member.list()[0].crl_number, 2);
        // A CRL the operator hands over to pass on: the CA's, not older than
        // the one held; from then on this node sends it on, across reopens.
        assert!(matches!(
            member.relay_crl(g.id, &crl),
            Err(GroupError::Crl { .. })
        ));
        assert!(member.relay_crl(g.id, b"junk").is_err());
        assert!(!member.list()[0].relays_crl);
        let held = member
            .relay_crl(g.id, pem("X509 CRL", &crl2).as_bytes())
            .unwrap();
        assert_eq!(held, crl2);
        assert!(member.list()[0].relays_crl);
        let reopened = Groups::open(member_dir.path(), member_id).unwrap();
        assert!(reopened.list()[0].relays_crl && reopened.list()[0].crl_number == 2);
        // Everything survives a reopen.
        let again = Groups::open(owner_dir.path(), owner_id).unwrap();
        assert!(
            again
                .members("crew")
                .unwrap()
                .iter()
                .filter(|m| m.revoked)
                .count()
                == 2
        );
        assert!(again.is_member(g.id));
        // A topic key per epoch (one at creation, one per revocation), kept
        // across a reopen; a member holds none until it asks for one.
        let epochs: Vec<u64> = (0..4)
            .filter(|e| again.topic_key_at(g.id, *e).is_some())
            .collect();
        assert_eq!(epochs, [0, 1, 2]);
        assert_eq!(again.topic_key(g.id).map(|(e, _)| e), Some(2));
        assert!(member.topic_key(g.id).is_none());
        // A member takes the owner's epoch signature, and gets the owner's
        // key from it; a signature of another epoch, or altered, gives none
        // and leaves nothing behind.
        let sig = again.epoch_signature(g.id, 2).unwrap();
        assert!(matches!(
            member.take_epoch_signature(g.id, 1, &sig),
            Err(GroupError::EpochKey(EpochKeyError::NotSigned { .. }))
        ));
        let mut bent = sig.clone();
        bent[10] ^= 0x40;
        assert!(member.take_epoch_signature(g.id, 2, &bent).is_err());
        assert!(member.topic_key(g.id).is_none());
        assert_eq!(
            member.take_epoch_signature(g.id, 2, &sig).unwrap(),
            again.topic_key_at(g.id, 2).unwrap()
        );
        assert_eq!(member.topic_key(g.id).map(|(e, _)| e), Some(2));
        let key_file = owner_dir
            .path()
            .join(g.id.to_string())
            .join("keys")
            .join("2.sig");
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn bad_certificates_and_crls_are_refused_and_change_nothing() {
        let (owner, _, _d) = node();
        let (stranger_owner, _, _s) = node();
        let (member, member_id, _m) = node();
        let g = owner.create("crew", 86_400).unwrap();
        let other = stranger_owner.create("crew", 86_400).unwrap();
        assert_ne!(g.id, other.id, "same name, different CA, different group");
        // An expired membership does not join (validity: one second, then
        // checked by a member whose clock is two seconds on), and joins while
        // it is valid.
        let short = owner.invite("crew", &member_id, 1).unwrap();
        let later = now_unix() + 2;
        let member_later = Groups::open(_m.path(), member_id)
            .unwrap()
            .with_clock(Clock::from_fn(move || later));
        assert!(matches!(
            member_later.join(short.as_bytes(), None),
            Err(GroupError::Certificate(CertError::Expired))
        ));
        assert!(
            member_later.list().is_empty(),
            "a refused join kept something"
        );
        // A member certificate from another CA, with this group's CA.
        let foreign = stranger_owner.invite("crew", &member_id, 3600).unwrap();
        let mixed = format!(
            "{}{}",
            pem(
                "CERTIFICATE",
                &pki::certs_from_bytes(owner.invite("crew", &member_id, 3600).unwrap().as_bytes())
                    .unwrap()[0]
            ),
            pem("CERTIFICATE", &member_cert(&foreign)),
        );
        assert!(matches!(
            member.join(mixed.as_bytes(), None),
            Err(GroupError::Certificate(
                CertError::UnknownIssuer | CertError::BadSignature
            ))
        ));
        assert!(member.list().is_empty());
        // Join properly, then: a CRL from the wrong CA, and garbage.
        member
            .join(
                owner.invite("crew", &member_id, 3600).unwrap().as_bytes(),
                None,
            )
            .unwrap();
        let (x, x_id, _x) = node();
        let _ = x;
        stranger_owner.invite("crew", &x_id, 3600).unwrap();
        let wrong = stranger_owner.revoke("crew", &x_id).unwrap();
        assert!(matches!(
            member.accept_crl(g.id, &wrong),
            Err(GroupError::Crl { .. })
        ));
        assert!(member.accept_crl(g.id, b"not a crl").is_err());
        assert_eq!(member.list()[0].crl_number, 0);
        assert!(member.is_member(g.id));
        // Only the owner invites, revokes and lists members.
        assert!(matches!(
            member.invite("crew", &x_id, 60),
            Err(GroupError::NotOwner(_))
        ));
        assert!(matches!(
            member.revoke("crew", &x_id),
            Err(GroupError::NotOwner(_))
        ));
        assert!(matches!(
            owner.revoke("crew", &x_id),
            Err(GroupError::NotInvited(_))
        ));
        assert!(matches!(
            owner.create("crew", 60),
            Err(GroupError::Exists(_))
        ));
        assert!(matches!(
            owner.create("no spaces", 60),
            Err(GroupError::BadName(_))
        ));
    }
}
