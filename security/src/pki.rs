//! X.509 as the security checker uses it: trust lists read from files (PEM or
//! DER, made by rcgen or the `openssl` CLI alike), chains verified with
//! rustls-webpki against those anchors (CRLs checked when the operator gave
//! them), and the one binding that matters here — a certificate names a libp2p
//! peer id in a URI subject alternative name:
//!
//! ```text
//! subjectAltName = URI:urn:p2pvm:peer:12D3KooW...
//! ```
//!
//! Used by the DRM checker (publisher certificates); the privacy controller's
//! group certificates use the same binding.

use crate::Cause;
use std::path::{Path, PathBuf};

use libp2p_identity::PeerId;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, TrustAnchor, UnixTime};
use webpki::{
    BorrowedCertRevocationList, CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Where a certificate names the peer it is bound to: a URI SAN with this prefix.
pub const PEER_URI_PREFIX: &str = "urn:p2pvm:peer:";

/// Why a certificate, a chain or a trust file is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The bytes are not a certificate (or CRL) in PEM or DER.
    #[error("not a valid {what}")]
    Malformed {
        /// "certificate" or "CRL".
        what: &'static str,
        /// The parser's error.
        #[source]
        source: Cause,
    },
    /// The chain is empty.
    #[error("no certificate")]
    Empty,
    /// The certificate's validity period has ended.
    #[error("the certificate expired")]
    Expired,
    /// The certificate's validity period has not begun.
    #[error("the certificate is not valid yet")]
    NotYetValid,
    /// No trusted CA issued it (or an intermediate is missing).
    #[error("not issued by a trusted CA")]
    UnknownIssuer,
    /// A signature in the chain does not verify.
    #[error("a signature in the chain does not verify")]
    BadSignature,
    /// Its issuer revoked it.
    #[error("the certificate is revoked")]
    Revoked,
    /// It is not meant for this use (a CA certificate as a leaf, a wrong
    /// extended key usage).
    #[error("the certificate is not valid for this use: {0}")]
    WrongUse(String),
    /// Any other reason the chain does not verify.
    #[error("the chain does not verify: {0}")]
    Invalid(String),
    /// It names no peer id.
    #[error("the certificate names no peer id (a URI SAN {PEER_URI_PREFIX}<peer id>)")]
    NoPeerId,
    /// It names another peer.
    #[error("the certificate is bound to peer {named}, not {expected}")]
    WrongPeer {
        /// The peer it names.
        named: String,
        /// The peer it should name.
        expected: String,
    },
    /// No anchors configured.
    #[error("no trusted CA is configured")]
    NoAnchors,
    /// Its key is not the libp2p key of the peer it names.
    #[error(
        "the certificate's key is not the libp2p key of peer {0} (issue it from the node's own request: `p2pctl group csr`)"
    )]
    NotPeersKey(String),
}

impl From<webpki::Error> for CertError {
    fn from(e: webpki::Error) -> Self {
        use webpki::Error as E;
        match e {
            E::CertExpired { .. } => Self::Expired,
            E::CertNotValidYet { .. } => Self::NotYetValid,
            E::UnknownIssuer => Self::UnknownIssuer,
            E::CertRevoked => Self::Revoked,
            E::InvalidSignatureForPublicKey | E::InvalidCrlSignatureForPublicKey => {
                Self::BadSignature
            }
            E::CaUsedAsEndEntity
            | E::EndEntityUsedAsCa
            | E::RequiredEkuNotFoundContext(_)
            | E::EmptyEkuExtension => Self::WrongUse(format!("{e:?}")),
            E::BadDer | E::BadDerTime | E::TrailingData(_) => Self::Malformed {
                what: "certificate",
                source: Cause::new(e),
            },
            e => Self::Invalid(format!("{e:?}")),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::Read {
        path: path.to_owned(),
        source: Cause::new(e),
    })
}

/// PEM (possibly after comment lines, as openssl and invitations write),
/// rather than DER.
fn is_pem(bytes: &[u8]) -> bool {
    bytes.windows(10).any(|w| w == b"-----BEGIN")
}

/// Every certificate in `bytes`: PEM (any number) or one DER certificate.
pub fn certs_from_bytes(bytes: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let malformed = |source: Cause| CertError::Malformed {
        what: "certificate",
        source,
    };
    let certs: Vec<Vec<u8>> = if is_pem(bytes) {
        CertificateDer::pem_slice_iter(bytes)
            .map(|c| c.map(|c| c.to_vec()).map_err(|e| malformed(Cause::new(e))))
            .collect::<Result<_, _>>()?
    } else {
        vec![bytes.to_vec()]
    };
    if certs.is_empty() {
        return Err(CertError::Empty);
    }
    for c in &certs {
        X509Certificate::from_der(c).map_err(|e| malformed(Cause::new(e)))?;
    }
    Ok(certs)
}

/// Every CRL in `bytes`: PEM (any number) or one DER CRL.
pub fn crls_from_bytes(bytes: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let malformed = |source: Cause| CertError::Malformed {
        what: "CRL",
        source,
    };
    let crls: Vec<Vec<u8>> = if is_pem(bytes) {
        CertificateRevocationListDer::pem_slice_iter(bytes)
            .map(|c| c.map(|c| c.to_vec()).map_err(|e| malformed(Cause::new(e))))
            .collect::<Result<_, _>>()?
    } else {
        vec![bytes.to_vec()]
    };
    for c in &crls {
        BorrowedCertRevocationList::from_der(c).map_err(|e| malformed(Cause::new(e)))?;
    }
    Ok(crls)
}

/// The certificates in a file.
pub fn certs_from_file(path: &Path) -> Result<Vec<Vec<u8>>, CertError> {
    certs_from_bytes(&read(path)?)
}

/// The CRLs in a file.
pub fn crls_from_file(path: &Path) -> Result<Vec<Vec<u8>>, CertError> {
    crls_from_bytes(&read(path)?)
}

/// The peer id a certificate is bound to (its URI SAN).
pub fn peer_of(cert_der: &[u8]) -> Result<PeerId, CertError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| CertError::Malformed {
        what: "certificate",
        source: Cause::new(e),
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Malformed {
            what: "certificate",
            source: Cause::new(e),
        })?
        .ok_or(CertError::NoPeerId)?;
    let named = san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u.strip_prefix(PEER_URI_PREFIX),
        _ => None,
    });
    let named = named.ok_or(CertError::NoPeerId)?;
    named.parse().map_err(|_| CertError::WrongPeer {
        named: named.to_owned(),
        expected: "a peer id".into(),
    })
}

/// Checks that the certificate certifies `peer`'s own libp2p key: its
/// subject key is the Ed25519 key `peer`'s id carries. A certificate of that
/// kind can only be used by the peer it names (a TLS handshake with it is
/// signed by the peer's key).
pub fn certifies_key_of(cert_der: &[u8], peer: &PeerId) -> Result<(), CertError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| CertError::Malformed {
        what: "certificate",
        source: Cause::new(e),
    })?;
    let spki = cert.public_key();
    let ed25519 = spki.algorithm.algorithm == x509_parser::oid_registry::OID_SIG_ED25519;
    let key = ed25519
        .then(|| {
            libp2p_identity::ed25519::PublicKey::try_from_bytes(&spki.subject_public_key.data).ok()
        })
        .flatten()
        .map(libp2p_identity::PublicKey::from);
    match key {
        Some(k) if k.to_peer_id() == *peer => Ok(()),
        _ => Err(CertError::NotPeersKey(peer.to_base58())),
    }
}

/// A libp2p node key as PKCS#8 v1 DER (RFC 8410), the form TLS stacks and
/// rcgen load; `None` unless it is an Ed25519 key.
pub fn node_key_pkcs8(key: &libp2p_identity::Keypair) -> Option<Vec<u8>> {
    let ed = key.clone().try_into_ed25519().ok()?;
    let seed: [u8; 32] = ed.secret().as_ref().try_into().ok()?;
    Some(ed25519_pkcs8(&seed))
}

/// An Ed25519 private key (its 32-byte seed, as libp2p keeps it) as PKCS#8
/// v1 DER (RFC 8410).
pub fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING {
    // OCTET STRING seed } }
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(seed);
    der
}

/// A certificate's subject, as `CN=..., O=...`.
pub fn subject_of(cert_der: &[u8]) -> String {
    X509Certificate::from_der(cert_der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_default()
}

/// A certificate's issuer, as `CN=..., O=...`.
pub fn issuer_of(cert_der: &[u8]) -> String {
    X509Certificate::from_der(cert_der)
        .map(|(_, c)| c.issuer().to_string())
        .unwrap_or_default()
}

/// Trusted CAs and the CRLs that revoke what they issued.
#[derive(Debug, Default)]
pub struct TrustList {
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
}

impl TrustList {
    /// Anchors from CA certificates, and CRLs, all DER.
    pub fn from_der(cas: &[Vec<u8>], crls: &[Vec<u8>]) -> Result<Self, CertError> {
        let mut anchors = Vec::with_capacity(cas.len());
        for ca in cas {
            let der = CertificateDer::from(ca.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&der)?;
            anchors.push(anchor.to_owned());
        }
        let mut lists = Vec::with_capacity(crls.len());
        for crl in crls {
            let owned = BorrowedCertRevocationList::from_der(crl)
                .and_then(|c| c.to_owned())
                .map_err(|e| CertError::Malformed {
                    what: "CRL",
                    source: Cause::new(e),
                })?;
            lists.push(CertRevocationList::from(owned));
        }
        Ok(Self {
            anchors,
            crls: lists,
        })
    }

    /// Anchors and CRLs from files (PEM or DER).
    pub fn load(ca_files: &[PathBuf], crl_files: &[PathBuf]) -> Result<Self, CertError> {
        let mut cas = Vec::new();
        for f in ca_files {
            cas.extend(certs_from_file(f)?);
        }
        let mut crls = Vec::new();
        for f in crl_files {
            crls.extend(crls_from_file(f)?);
        }
        Self::from_der(&cas, &crls)
    }

    /// Whether any CA is trusted.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// Verifies `chain` (leaf first, then intermediates) at `now` (unix
    /// seconds) for `usage`, and that the leaf is bound to `peer`.
    pub fn verify_peer(
        &self,
        chain: &[Vec<u8>],
        peer: &PeerId,
        now: u64,
        usage: KeyUsage,
    ) -> Result<(), CertError> {
        if self.anchors.is_empty() {
            return Err(CertError::NoAnchors);
        }
        let (leaf, rest) = chain.split_first().ok_or(CertError::Empty)?;
        let leaf_der = CertificateDer::from(leaf.as_slice());
        let ee = EndEntityCert::try_from(&leaf_der)?;
        let intermediates: Vec<CertificateDer<'_>> = rest
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        // A CA with no CRL configured revokes nothing we know of; a stale CRL
        // still revokes what it lists (an operator who forgets to refresh one
        // must not un-revoke anything).
        let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Allow)
                .with_expiration_policy(ExpirationPolicy::Ignore)
                .build()
        });
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
            usage,
            revocation,
            None,
        )?;
        let named = peer_of(leaf)?;
        if named != *peer {
            return Err(CertError::WrongPeer {
                named: named.to_base58(),
                expected: peer.to_base58(),
            });
        }
        Ok(())
    }
}
