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
    #[error("CRL refused: {0}")]
    Crl(String),
    /// An epoch signature gives no topic key.
    #[error("topic key refused: {0}")]
    EpochKey(#[from] EpochKeyError),
    /// The peer was never invited (nothing to revoke).
    #[error("peer {0} holds no certificate of this group")]
    NotInvited(String),
    /// Making a key, certificate or CRL failed.
    #[error("cannot make a certificate: {0}")]
    Make(String),
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
    GroupError::Make(e.to_string())
}

/// A certificate signing request (PEM) for the node `peer` whose libp2p
/// Ed25519 key is `key_pkcs8`: what an operator whose group CA is kept
/// elsewhere (the `openssl` CLI, say) signs into this node's member
/// certificate. It names the peer (URI SAN) and is signed by the node's key,
/// the key the certificate must certify.
pub fn certificate_request(node_key: &libp2p_identity::Keypair) -> Result<String, GroupError> {
    let peer = node_key.public().to_peer_id();
    let pkcs8 = pki::node_key_pkcs8(node_key)
        .ok_or_else(|| GroupError::Make("the node key is not an Ed25519 key".into()))?;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_slice());
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519).map_err(make)?;
    let p = member_params(&peer)?;
    p.serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(make)
}

/// What every member certificate (and request for one) says: the member's
/// name and its peer id as a URI SAN.
fn member_params(peer: &PeerId) -> Result<CertificateParams, GroupError> {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, format!("member {peer}"));
    p.subject_alt_names = vec![SanType::URI(
        format!("{}{peer}", pki::PEER_URI_PREFIX)
            .try_into()
            .map_err(make)?,
    )];
    Ok(p)
}

/// A group's id: a digest of its CA's public key, as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub [u8; 16]);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for GroupId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(());
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ())?;
        }
        Ok(Self(id))
    }
}

/// The id of the group whose CA certificate is `ca_der`.
pub fn group_id(ca_der: &[u8]) -> Result<GroupId, CertError> {
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| CertError::Malformed {
        what: "certificate",
        reason: e.to_string(),
    })?;
    let digest = blake3::hash(ca.public_key().raw);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest.as_bytes()[..16]);
    Ok(GroupId(id))
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
        .map_err(|e| GroupError::Make(e.to_string()))
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

/// PEM text of `der` under `label`.
fn pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it),
/// with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), GroupError> {
    // A name of its own: two writers of one file never share a half-written
    // temporary.
    let tmp = path.with_extension(format!("tmp.{:016x}", rand::random::<u64>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(format!("writing {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}

fn validity(cert_der: &[u8]) -> Result<(u64, u64), CertError> {
    let (_, c) = X509Certificate::from_der(cert_der).map_err(|e| CertError::Malformed {
        what: "certificate",
        reason: e.to_string(),
    })?;
    let v = c.validity();
    Ok((
        v.not_before.timestamp().max(0) as u64,
        v.not_after.timestamp().max(0) as u64,
    ))
}

fn serial_of(cert_der: &[u8]) -> Result<Vec<u8>, CertError> {
    let (_, c) = X509Certificate::from_der(cert_der).map_err(|e| CertError::Malformed {
        what: "certificate",
        reason: e.to_string(),
    })?;
    Ok(c.raw_serial().to_vec())
}

/// The CRL's number and the serials it revokes, if its signature verifies
/// with the CA's key.
fn crl_checked(crl_der: &[u8], ca_der: &[u8]) -> Result<(u64, Vec<Vec<u8>>), GroupError> {
    let (_, ca) = X509Certificate::from_der(ca_der)
        .map_err(|e| GroupError::Crl(format!("the group CA does not parse: {e}")))?;
    let (_, crl) = CertificateRevocationList::from_der(crl_der)
        .map_err(|e| GroupError::Crl(format!("not a CRL: {e}")))?;
    if crl.issuer() != ca.subject() {
        return Err(GroupError::Crl("issued by another CA".into()));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| GroupError::Crl(format!("its signature does not verify: {e}")))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| GroupError::Crl("it has no CRL number".into()))?;
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect();
    Ok((number, serials))
}

impl Group {
    fn load(dir: &Path) -> Result<Self, GroupError> {
        let read = |f: &str| std::fs::read(dir.join(f));
        let name = std::fs::read_to_string(dir.join("name"))
            .map_err(io(format!("reading {}/name", dir.display())))?
            .trim()
            .to_owned();
        let ca = read("ca.pem").map_err(io(format!("reading {}/ca.pem", dir.display())))?;
        let ca_der = pki::certs_from_bytes(&ca)?.remove(0);
        let member_der = match read("member.pem") {
            Ok(b) => Some(pki::certs_from_bytes(&b)?.remove(0)),
            Err(_) => None,
        };
        let crl_der = match read("crl.pem") {
            Ok(b) => Some(pki::crls_from_bytes(&b)?.remove(0)),
            Err(_) => None,
        };
        let crl_number = match &crl_der {
            Some(c) => crl_checked(c, &ca_der)?.0,
            None => 0,
        };
        let id = group_id(&ca_der)?;
        let epochs = load_epochs(&dir.join("keys"), &ca_der, id, crl_number);
        Ok(Self {
            name,
            dir: dir.to_owned(),
            ca_der,
            member_der,
            crl_der,
            crl_number,
            epochs,
            owner: dir.join("ca.key").exists(),
            relays_crl: dir.join(RELAY_CRL).exists(),
        })
    }

    fn crl_number(&self) -> u64 {
        self.crl_number
    }

    /// The keys held for `epoch`, the one that seals first.
    fn keys_at(&self, epoch: u64) -> impl Iterator<Item = &Epoch> {
        self.epochs.get(&epoch).into_iter().flatten()
    }

    fn trust(&self) -> Result<TrustList, CertError> {
        let crls: Vec<Vec<u8>> = self.crl_der.iter().cloned().collect();
        TrustList::from_der(std::slice::from_ref(&self.ca_der), &crls)
    }

    fn info(&self, id: GroupId) -> GroupInfo {
        GroupInfo {
            id,
            name: self.name.clone(),
            owner: self.owner,
            ca_subject: pki::subject_of(&self.ca_der),
            member_until: self
                .member_der
                .as_ref()
                .and_then(|m| validity(m).ok())
                .map(|(_, until)| until),
            crl_number: self.crl_number(),
            relays_crl: self.owner || self.relays_crl,
        }
    }

    /// The CA key (PKCS#8 DER), owner only.
    fn ca_key_pkcs8(&self) -> Result<Vec<u8>, GroupError> {
        if !self.owner {
            return Err(GroupError::NotOwner(self.name.clone()));
        }
        let key_pem = std::fs::read_to_string(self.dir.join("ca.key"))
            .map_err(io(format!("reading {}/ca.key", self.dir.display())))?;
        Ok(KeyPair::from_pem(&key_pem).map_err(make)?.serialize_der())
    }

    /// The CA key and an issuer made from it (same subject, same key: what
    /// rcgen needs to sign as this CA).
    fn issuer(&self) -> Result<(rcgen::Certificate, KeyPair), GroupError> {
        if !self.owner {
            return Err(GroupError::NotOwner(self.name.clone()));
        }
        let key_pem = std::fs::read_to_string(self.dir.join("ca.key"))
            .map_err(io(format!("reading {}/ca.key", self.dir.display())))?;
        let key = KeyPair::from_pem(&key_pem).map_err(make)?;
        let (from, until) = validity(&self.ca_der)?;
        let params = ca_params(&self.name, from, until)?;
        let cert = params.self_signed(&key).map_err(make)?;
        Ok((cert, key))
    }
}

/// The epoch signatures stored in `keys` (`<epoch>.sig`, the first; more
/// as `<epoch>-<digest>.sig`), each checked against the CA again: a file
/// swapped on disk gives no key. Signatures of epochs after the CRL held
/// (`crl_number`) are deleted, never used: a key is only ever made for an
/// epoch whose CRL is current, so a member revoked by that CRL cannot have
/// been handed it. Raw key files of older versions are deleted too (an
/// owner signs its current epoch again on open).
fn load_epochs(
    keys: &Path,
    ca_der: &[u8],
    id: GroupId,
    crl_number: u64,
) -> BTreeMap<u64, Vec<Epoch>> {
    let mut found: Vec<(u64, String, Vec<u8>)> = Vec::new();
    for e in std::fs::read_dir(keys).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let epoch = name
            .strip_suffix(".sig")
            .and_then(|n| n.split('-').next())
            .and_then(|n| n.parse::<u64>().ok());
        match epoch {
            Some(epoch) if epoch <= crl_number => {
                if let Ok(signature) = std::fs::read(e.path()) {
                    found.push((epoch, name, signature));
                }
            }
            Some(_) => {
                tracing::warn!(group = %id, file = %name, "deleting a topic key of an epoch after the CRL held");
                let _ = std::fs::remove_file(e.path());
            }
            None if name.bytes().all(|b| b.is_ascii_digit()) => {
                let _ = std::fs::remove_file(e.path());
            }
            None => {}
        }
    }
    // `<epoch>.sig` sorts before `<epoch>-….sig`: the first key stays first.
    found.sort_by(|a, b| (a.0, a.1.len(), &a.1).cmp(&(b.0, b.1.len(), &b.1)));
    let mut epochs: BTreeMap<u64, Vec<Epoch>> = BTreeMap::new();
    for (epoch, _, signature) in found {
        match group_topics::epoch_key(ca_der, id, epoch, &signature) {
            Ok(key) => epochs
                .entry(epoch)
                .or_default()
                .push(Epoch { key, signature }),
            Err(err) => {
                tracing::warn!(group = %id, epoch, error = %err, "ignoring a stored topic key")
            }
        }
    }
    epochs
}

/// A peer's Ed25519 public key, as rcgen signs a certificate for it.
struct PeerKey([u8; 32]);

impl rcgen::PublicKeyData for PeerKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// The parameters of this node's CA for group `name`, valid from `from`
/// until `until` (unix seconds). Rebuilt from the name and the certificate's
/// validity, they give the same subject and key identifier: what rcgen needs
/// to sign as that CA again.
fn ca_params(name: &str, from: u64, until: u64) -> Result<CertificateParams, GroupError> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "p2pvm trusted group");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    p.not_before = at(from)?;
    p.not_after = at(until)?;
    Ok(p)
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

    /// Creates a group this node owns (and is the first member of), its CA
    /// valid for `valid_secs`.
    pub fn create(&self, name: &str, valid_secs: u64) -> Result<GroupInfo, GroupError> {
        if !valid_name(name) {
            return Err(GroupError::BadName(name.into()));
        }
        if self.lock().values().any(|g| g.name == name) {
            return Err(GroupError::Exists(name.into()));
        }
        let key = KeyPair::generate().map_err(make)?;
        let now = self.clock.now();
        let ca = ca_params(name, now - 60, now + valid_secs)?
            .self_signed(&key)
            .map_err(make)?;
        let ca_der = ca.der().to_vec();
        let id = group_id(&ca_der)?;
        // Written under a temporary name and renamed: a crash leaves no half
        // group behind.
        let tmp = self.dir.join(format!(".new-{id}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("issued")).map_err(io("creating the group"))?;
        write_file(&tmp.join("name"), name.as_bytes(), 0o644)?;
        write_file(
            &tmp.join("ca.pem"),
            pem("CERTIFICATE", &ca_der).as_bytes(),
            0o644,
        )?;
        write_file(&tmp.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
        let dir = self.dir.join(id.to_string());
        std::fs::rename(&tmp, &dir).map_err(io("creating the group"))?;
        let g = Group::load(&dir)?;
        self.lock().insert(id, g);
        // The first topic key (epoch 0: no CRL yet).
        self.sign_epoch(id, 0)?;
        // The owner is a member like any other.
        let own = self.issue(id, &self.local, valid_secs)?;
        write_file(
            &dir.join("member.pem"),
            pem("CERTIFICATE", &own).as_bytes(),
            0o644,
        )?;
        if let Some(g) = self.lock().get_mut(&id) {
            g.member_der = Some(own);
        }
        self.info(id)
    }

    fn info(&self, id: GroupId) -> Result<GroupInfo, GroupError> {
        self.lock()
            .get(&id)
            .map(|g| g.info(id))
            .ok_or_else(|| GroupError::Unknown(id.to_string()))
    }

    /// Issues a member certificate for `peer`, valid for `valid_secs`.
    fn issue(&self, id: GroupId, peer: &PeerId, valid_secs: u64) -> Result<Vec<u8>, GroupError> {
        let (issuer, dir) = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            (g.issuer()?, g.dir.clone())
        };
        let (ca, ca_key) = issuer;
        // The certificate is for the peer's own Ed25519 key (its id carries
        // it): the member holds the private key, so the certificate is a
        // credential it can prove, not only a name.
        let key = p2pvm_content::inline_public_key(peer)
            .and_then(|k| k.try_into_ed25519().ok())
            .map(|k| PeerKey(k.to_bytes()))
            .ok_or_else(|| {
                GroupError::Invitation(format!(
                    "peer {peer} does not carry an Ed25519 key in its id"
                ))
            })?;
        let now = self.clock.now();
        let mut p = member_params(peer)?;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        // Random, positive, unique: what a CRL names a certificate by.
        let mut serial: [u8; 16] = rand::random();
        serial[0] = (serial[0] & 0x7f) | 0x01;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.not_before = at(now - 60)?;
        p.not_after = at(now + valid_secs)?;
        let cert = p.signed_by(&key, &ca, &ca_key).map_err(make)?;
        let der = cert.der().to_vec();
        write_file(
            &dir.join("issued").join(format!("{peer}.pem")),
            pem("CERTIFICATE", &der).as_bytes(),
            0o644,
        )?;
        Ok(der)
    }

    /// Invites `peer` into the group `name_or_id` (owner only): an
    /// invitation (PEM: the group CA, the member certificate, the current
    /// CRL) that peer imports with [`Groups::join`].
    pub fn invite(
        &self,
        name_or_id: &str,
        peer: &PeerId,
        valid_secs: u64,
    ) -> Result<String, GroupError> {
        let id = self.resolve(name_or_id)?;
        let member = self.issue(id, peer, valid_secs)?;
        let groups = self.lock();
        let g = groups
            .get(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        let mut out = format!(
            "# p2pvm group invitation: group {} ({id}) for peer {peer}\n",
            g.name
        );
        out.push_str(&pem("CERTIFICATE", &g.ca_der));
        out.push_str(&pem("CERTIFICATE", &member));
        if let Some(crl) = &g.crl_der {
            out.push_str(&pem("X509 CRL", crl));
        }
        Ok(out)
    }

    /// Joins a group from an invitation (PEM: the group CA first, then this
    /// node's member certificate, then optionally a CRL), under `name` or the
    /// CA's common name. The certificate must chain to that CA, be valid now,
    /// not be revoked, and name this node.
    pub fn join(&self, invitation: &[u8], name: Option<&str>) -> Result<GroupInfo, GroupError> {
        let certs = pki::certs_from_bytes(invitation)?;
        let [ca_der, member_der, ..] = certs.as_slice() else {
            return Err(GroupError::Invitation(
                "it needs the group CA and a member certificate".into(),
            ));
        };
        // A CRL that does not parse refuses the invitation; none is fine.
        let crl = pki::crls_from_bytes(invitation)?.into_iter().next();
        if let Some(c) = &crl {
            crl_checked(c, ca_der)?;
        }
        let trust = TrustList::from_der(std::slice::from_ref(ca_der), crl.as_slice())?;
        trust.verify_peer(
            std::slice::from_ref(member_der),
            &self.local,
            self.clock.now(),
            KeyUsage::required_if_present(EKU_CLIENT_AUTH),
        )?;
        pki::certifies_key_of(member_der, &self.local)?;
        let id = group_id(ca_der)?;
        let taken = |n: &str| self.lock().iter().any(|(gid, g)| g.name == n && *gid != id);
        let name = match name {
            Some(n) => n.to_owned(),
            None => {
                let cn = X509Certificate::from_der(ca_der).ok().and_then(|(_, c)| {
                    c.subject()
                        .iter_common_name()
                        .next()
                        .and_then(|cn| cn.as_str().ok().map(str::to_owned))
                });
                local_name(cn.as_deref(), id, &taken)
            }
        };
        if !valid_name(&name) {
            return Err(GroupError::BadName(name));
        }
        if taken(&name) {
            return Err(GroupError::Exists(name));
        }
        let dir = self.dir.join(id.to_string());
        let tmp = self.dir.join(format!(".join-{id}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("joining the group"))?;
        // An owner re-joining its own group keeps its key and records.
        if dir.exists() {
            for f in ["ca.key"] {
                if dir.join(f).exists() {
                    std::fs::copy(dir.join(f), tmp.join(f)).map_err(io("joining the group"))?;
                }
            }
            if dir.join("issued").exists() {
                std::fs::rename(dir.join("issued"), tmp.join("issued"))
                    .map_err(io("joining the group"))?;
            }
        }
        write_file(&tmp.join("name"), name.as_bytes(), 0o644)?;
        write_file(
            &tmp.join("ca.pem"),
            pem("CERTIFICATE", ca_der).as_bytes(),
            0o644,
        )?;
        write_file(
            &tmp.join("member.pem"),
            pem("CERTIFICATE", member_der).as_bytes(),
            0o644,
        )?;
        if let Some(c) = &crl {
            write_file(&tmp.join("crl.pem"), pem("X509 CRL", c).as_bytes(), 0o644)?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io("joining the group"))?;
        let g = Group::load(&dir)?;
        self.lock().insert(id, g);
        self.info(id)
    }

    /// Revokes every certificate `peer` holds in the group (owner only):
    /// a new CRL, numbered one above the last, replaces the group's. Returns
    /// it (DER), for distribution to members.
    pub fn revoke(&self, name_or_id: &str, peer: &PeerId) -> Result<Vec<u8>, GroupError> {
        let id = self.resolve(name_or_id)?;
        let (issuer, dir, held, number) = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            let held = match &g.crl_der {
                Some(c) => crl_checked(c, &g.ca_der)?.1,
                None => Vec::new(),
            };
            (g.issuer()?, g.dir.clone(), held, g.crl_number())
        };
        let issued = dir.join("issued").join(format!("{peer}.pem"));
        let cert = std::fs::read(&issued).map_err(|_| GroupError::NotInvited(peer.to_string()))?;
        let serial = serial_of(&pki::certs_from_bytes(&cert)?[0])?;
        let now = self.clock.now();
        let mut revoked: Vec<Vec<u8>> = held;
        if !revoked.contains(&serial) {
            revoked.push(serial);
        }
        let (ca, ca_key) = issuer;
        let crl = CertificateRevocationListParams {
            this_update: at(now - 1)?,
            next_update: at(now + 30 * 86_400)?,
            crl_number: SerialNumber::from(number + 1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| -> Result<RevokedCertParams, GroupError> {
                    Ok(RevokedCertParams {
                        serial_number: SerialNumber::from_slice(s),
                        revocation_time: at(now - 1)?,
                        reason_code: None,
                        invalidity_date: None,
                    })
                })
                .collect::<Result<_, _>>()?,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca, &ca_key)
        .map_err(make)?;
        let der = crl.der().to_vec();
        // The CRL first, then the new epoch's key: a key exists only for an
        // epoch whose CRL is current, so members refuse it to the revoked
        // peer from the moment it exists. (A crash in between leaves the
        // epoch unsigned; the owner signs it when it opens the group.)
        self.accept_crl(id, &der)?;
        self.sign_epoch(id, number + 1)?;
        Ok(der)
    }

    /// Takes a group's CRL from anywhere: it replaces the one held only if
    /// the group CA signed it and its number is higher. `Ok(false)`: not newer.
    pub fn accept_crl(&self, id: GroupId, crl_der: &[u8]) -> Result<bool, GroupError> {
        let mut groups = self.lock();
        let g = groups
            .get_mut(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        let (number, _) = crl_checked(crl_der, &g.ca_der)?;
        let held = g.crl_number();
        if number <= held {
            return Ok(false);
        }
        write_file(
            &g.dir.join("crl.pem"),
            pem("X509 CRL", crl_der).as_bytes(),
            0o644,
        )?;
        g.crl_der = Some(crl_der.to_vec());
        g.crl_number = number;
        Ok(true)
    }

    /// Takes a CRL (PEM or DER) the operator hands this node to pass on to
    /// group `id`'s members — how a CA kept outside any node revokes: it
    /// must be the group CA's and not older than the one held. From then on
    /// this node sends the group's CRL on as an owner does
    /// ([`GroupInfo::relays_crl`]). Returns the CRL now held (DER).
    pub fn relay_crl(&self, id: GroupId, crl: &[u8]) -> Result<Vec<u8>, GroupError> {
        let der = pki::crls_from_bytes(crl)?
            .into_iter()
            .next()
            .ok_or_else(|| GroupError::Crl("no CRL in it".into()))?;
        let (ca, dir, held) = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            (g.ca_der.clone(), g.dir.clone(), g.crl_number())
        };
        let (number, _) = crl_checked(&der, &ca)?;
        if number < held {
            return Err(GroupError::Crl(format!(
                "its number {number} is older than the CRL held here ({held})"
            )));
        }
        if number == held && self.crl(id).as_deref() != Some(der.as_slice()) {
            return Err(GroupError::Crl(format!(
                "it is numbered {number}, as the CRL held here, but differs from it: a CA numbers each new CRL higher (`openssl ca -gencrl` does)"
            )));
        }
        self.accept_crl(id, &der)?;
        write_file(&dir.join(RELAY_CRL), b"", 0o644)?;
        let mut groups = self.lock();
        let g = groups
            .get_mut(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        g.relays_crl = true;
        g.crl_der
            .clone()
            .ok_or_else(|| GroupError::Crl("no CRL held".into()))
    }

    /// The members the owner issued certificates to, with their status.
    pub fn members(&self, name_or_id: &str) -> Result<Vec<MemberInfo>, GroupError> {
        let id = self.resolve(name_or_id)?;
        let groups = self.lock();
        let g = groups
            .get(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        if !g.owner {
            return Err(GroupError::NotOwner(g.name.clone()));
        }
        let revoked = match &g.crl_der {
            Some(c) => crl_checked(c, &g.ca_der)?.1,
            None => Vec::new(),
        };
        let mut out = Vec::new();
        let entries = std::fs::read_dir(g.dir.join("issued")).map_err(io("listing members"))?;
        for e in entries.flatten() {
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            let Some(der) = pki::certs_from_bytes(&bytes)
                .ok()
                .and_then(|c| c.into_iter().next())
            else {
                continue;
            };
            let (not_before, not_after) = validity(&der)?;
            let serial = serial_of(&der)?;
            out.push(MemberInfo {
                peer: pki::peer_of(&der)
                    .map(|p| p.to_base58())
                    .unwrap_or_default(),
                serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
                not_before,
                not_after,
                revoked: revoked.contains(&serial),
            });
        }
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        Ok(out)
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

    /// The newest group-topic key this node holds for group `id`: (epoch,
    /// key). Only current members hold one.
    pub fn topic_key(&self, id: GroupId) -> Option<(u64, [u8; KEY_LEN])> {
        let groups = self.lock();
        let (epoch, keys) = groups.get(&id)?.epochs.last_key_value()?;
        Some((*epoch, keys.first()?.key))
    }

    /// Group `id`'s topic key of `epoch` that this node seals with, if held.
    pub fn topic_key_at(&self, id: GroupId, epoch: u64) -> Option<[u8; KEY_LEN]> {
        Some(self.lock().get(&id)?.keys_at(epoch).next()?.key)
    }

    /// Every key of group `id`'s `epoch` held (more than one when its CA
    /// signed the epoch more than once): what a message is opened with.
    pub fn topic_keys_at(&self, id: GroupId, epoch: u64) -> Vec<[u8; KEY_LEN]> {
        self.lock()
            .get(&id)
            .map(|g| g.keys_at(epoch).map(|e| e.key).collect())
            .unwrap_or_default()
    }

    /// The CA signature group `id`'s sealing key of `epoch` comes from, if
    /// held: what a member hands another.
    pub fn epoch_signature(&self, id: GroupId, epoch: u64) -> Option<Vec<u8>> {
        Some(
            self.lock()
                .get(&id)?
                .keys_at(epoch)
                .next()?
                .signature
                .clone(),
        )
    }

    /// Takes group `id`'s epoch signature of `epoch` (from a member, or from
    /// the operator of a CA kept elsewhere) if the group CA made it and
    /// `epoch` is not after the CRL held, and keeps it (mode 0600: it reads
    /// the group's topics). Returns the key. A key already held stays first;
    /// another the CA signed for the same epoch is kept beside it.
    pub fn take_epoch_signature(
        &self,
        id: GroupId,
        epoch: u64,
        signature: &[u8],
    ) -> Result<[u8; KEY_LEN], GroupError> {
        let ca = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            g.ca_der.clone()
        };
        let key = group_topics::epoch_key(&ca, id, epoch, signature)?;
        // Checked, written and kept under one lock: memory and disk hold
        // the same keys in the same order.
        let mut groups = self.lock();
        let g = groups
            .get_mut(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        if epoch > g.crl_number {
            return Err(GroupError::EpochKey(EpochKeyError::NotCurrent {
                epoch,
                held: g.crl_number,
            }));
        }
        if g.keys_at(epoch).any(|e| e.key == key) {
            return Ok(key);
        }
        let dir = g.dir.join("keys");
        std::fs::create_dir_all(&dir).map_err(io("storing a topic key"))?;
        let name = if g.keys_at(epoch).next().is_none() {
            format!("{epoch}.sig")
        } else {
            format!("{epoch}-{}.sig", &blake3::hash(&key).to_hex()[..16])
        };
        write_file(&dir.join(name), signature, 0o600)?;
        g.epochs.entry(epoch).or_default().push(Epoch {
            key,
            signature: signature.to_vec(),
        });
        Ok(key)
    }

    /// Signs group `id`'s epoch `epoch` with its CA key (owner only).
    fn sign_epoch(&self, id: GroupId, epoch: u64) -> Result<(), GroupError> {
        let pkcs8 = {
            let groups = self.lock();
            groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?
                .ca_key_pkcs8()?
        };
        let signature = group_topics::sign_epoch(&pkcs8, id, epoch)?;
        self.take_epoch_signature(id, epoch, &signature).map(|_| ())
    }

    /// The `openssl` command with which the operator of group `id`'s CA
    /// (kept outside any node) signs `epoch`, writing `out`.
    pub fn openssl_epoch_command(
        &self,
        id: GroupId,
        epoch: u64,
        out: &str,
    ) -> Result<String, GroupError> {
        let ca = self
            .lock()
            .get(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?
            .ca_der
            .clone();
        Ok(group_topics::openssl_epoch_command(&ca, id, epoch, out)?)
    }

    /// The CRL held for group `id` (DER), if any.
    pub fn crl(&self, id: GroupId) -> Option<Vec<u8>> {
        self.lock().get(&id).and_then(|g| g.crl_der.clone())
    }

    /// This node's own member certificate (DER) in group `id`.
    pub fn own_certificate(&self, id: GroupId) -> Option<Vec<u8>> {
        self.lock().get(&id).and_then(|g| g.member_der.clone())
    }

    /// Whether `cert_der` proves `peer` a current member of group `id`: it
    /// chains to the group CA, is valid now, is not in the CRL held, and
    /// names `peer` (whom the connection it came on authenticated).
    pub fn verify_member(
        &self,
        id: GroupId,
        peer: &PeerId,
        cert_der: &[u8],
    ) -> Result<(), GroupError> {
        let trust = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            g.trust()?
        };
        trust.verify_peer(
            &[cert_der.to_vec()],
            peer,
            self.clock.now(),
            KeyUsage::required_if_present(EKU_CLIENT_AUTH),
        )?;
        pki::certifies_key_of(cert_der, peer)?;
        Ok(())
    }

    /// Whether this node is itself a current member of group `id`.
    pub fn is_member(&self, id: GroupId) -> bool {
        self.own_certificate(id)
            .is_some_and(|c| self.verify_member(id, &self.local, &c).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

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
            Err(GroupError::Crl(_))
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
            Err(GroupError::Crl(_))
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
            Err(GroupError::Crl(_))
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
