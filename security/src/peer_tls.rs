//! The TLS policy of the content fast path: who may open a session with
//! this node and who this node accepts at the other end.
//!
//! ```text
//!  p2pd fast path (TCP dial / accept) ──ClientHello──► PeerTls::server_config_for
//!                                                        ├─ no group ALPN: libp2p certificates
//!                                                        └─ p2pvm-group/1/<id>: GroupTls
//!  handshake done ──► crate::sealed (keys exported from it)
//! ```
//!
//! Identity is libp2p's own: each side presents the self-signed certificate
//! of libp2p's TLS handshake (the host key signs the certificate key in an
//! X.509 extension), so the provider knows which peer asks (its credit
//! policy applies) and the downloader knows it reached the provider it
//! chose; a certificate without a valid extension, or naming another peer
//! than the one dialled, ends the handshake. A client that offers the ALPN
//! protocol of a group gets that group's member-certificate handshake
//! ([`crate::group_tls`]) instead. TLS 1.3 only, AES-GCM first.

use std::sync::Arc;

use libp2p_identity::{Keypair, PeerId};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::group_tls::{self, GroupTls};
use crate::groups::{GroupError, GroupId, Groups};
use crate::tls13::{CertPolicy, Verifier};

/// ALPN of fast-path connections.
pub const ALPN: &[u8] = b"p2pvm-content/2";

/// Why a fast-path TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    /// The certificate could not be made from the node key.
    #[error("fast-path certificate")]
    Certificate(#[source] libp2p_tls::certificate::GenError),
    /// rustls refused the configuration.
    #[error("fast-path TLS")]
    Tls(#[from] rustls::Error),
    /// The client asked for a group session in an ALPN that names no group.
    #[error("a group session for no valid group")]
    NoValidGroup,
    /// The client asked for a group session; this node has none.
    #[error("group sessions are off")]
    GroupsOff,
    /// The group's own TLS configuration (not a member, no certificate, ...).
    #[error(transparent)]
    Group(#[from] GroupError),
}

/// The node's TLS identity for the fast path, and its group sessions.
pub struct PeerTls {
    server: Arc<rustls::ServerConfig>,
    cert: Arc<OwnCert>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    groups: Option<GroupTls>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("groups", &self.groups.is_some())
            .finish_non_exhaustive()
    }
}

/// Our certificate, offered as it is: webpki would refuse libp2p's critical
/// extension, and nothing here chains to a CA anyway.
#[derive(Debug)]
struct OwnCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The fast path's algorithms: AES-GCM first (it runs in hardware on every
/// CPU that runs this), ChaCha20 for the rest; TLS 1.3 only.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

impl PeerTls {
    /// The fast-path identity of the node with `key`.
    pub fn new(key: &Keypair) -> Result<Self, PeerTlsError> {
        let (cert, key) =
            libp2p_tls::certificate::generate(key).map_err(PeerTlsError::Certificate)?;
        let provider = provider();
        let signing = provider.key_provider.load_private_key(key)?;
        let cert = Arc::new(OwnCert(Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert],
            signing,
        ))));
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(peer_verifier(None))
            .with_cert_resolver(cert.clone());
        server.alpn_protocols = vec![ALPN.to_vec()];
        // After the handshake the TLS session carries nothing (sealed frames
        // take over), so no resumption tickets either.
        server.send_tls13_tickets = 0;
        Ok(Self {
            server: Arc::new(server),
            cert,
            provider,
            groups: None,
        })
    }

    /// Adds group sessions for the node with `key`, a member of `groups`.
    pub fn with_groups(mut self, groups: Arc<Groups>, key: &Keypair) -> Result<Self, PeerTlsError> {
        self.groups = Some(GroupTls::new(groups, key, self.provider.clone())?);
        Ok(self)
    }

    /// The server configuration for a connection whose client said `hello`:
    /// a group session's when it asks for one of our groups, the plain fast
    /// path's otherwise; with the group it is for.
    pub fn server_config_for(
        &self,
        hello: &rustls::server::ClientHello<'_>,
    ) -> Result<(Arc<rustls::ServerConfig>, Option<GroupId>), PeerTlsError> {
        let asked = hello
            .alpn()
            .and_then(|mut protos| protos.find_map(group_tls::group_in_alpn));
        match asked {
            None => Ok((self.server.clone(), None)),
            Some(Err(())) => Err(PeerTlsError::NoValidGroup),
            Some(Ok(g)) => {
                let tls = self.groups.as_ref().ok_or(PeerTlsError::GroupsOff)?;
                Ok((tls.server_config(g)?, Some(g)))
            }
        }
    }

    /// The client configuration for dialling `peer`: the handshake fails
    /// unless the other end proves it is `peer`.
    pub fn client_config(&self, peer: PeerId) -> Result<Arc<rustls::ClientConfig>, PeerTlsError> {
        let mut client = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(peer_verifier(Some(peer)))
            .with_client_cert_resolver(self.cert.clone());
        client.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(client))
    }

    /// The client configuration for a session in `group` with `peer`: both
    /// ends show member certificates; the other end must be `peer` and a
    /// current member.
    pub fn group_client_config(
        &self,
        group: GroupId,
        peer: PeerId,
    ) -> Result<Arc<rustls::ClientConfig>, PeerTlsError> {
        let tls = self.groups.as_ref().ok_or(PeerTlsError::GroupsOff)?;
        Ok(tls.client_config(group, peer)?)
    }
}

/// The peer a fast-path session's other end proved to be, from the
/// certificates the connection presents (after a plain, not a group,
/// handshake).
pub fn session_peer(certs: Option<&[CertificateDer<'_>]>) -> Option<PeerId> {
    peer_of(certs?.first()?, &[]).ok()
}

/// The peer id a presented certificate proves, if it is a valid libp2p one.
fn peer_of(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PeerId, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General(
            "a libp2p certificate comes alone, without a chain".into(),
        ));
    }
    libp2p_tls::certificate::parse(end_entity)
        .map(|c| c.peer_id())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

/// Checks libp2p certificates: the extension's signature, and (as a client)
/// that the server is the peer we meant to reach.
#[derive(Debug)]
pub struct PeerCert {
    expect: Option<PeerId>,
}

/// [`PeerCert`] as a rustls verifier (both sides of a fast-path handshake):
/// any valid libp2p certificate, or only `expect`'s.
pub fn peer_verifier(expect: Option<PeerId>) -> Arc<Verifier<PeerCert>> {
    Arc::new(Verifier(PeerCert { expect }))
}

impl CertPolicy for PeerCert {
    const SESSIONS: &'static str = "fast-path connections";

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let peer = peer_of(end_entity, intermediates)?;
        if self.expect.is_some_and(|e| e != peer) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(())
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let c = libp2p_tls::certificate::parse(cert)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        c.verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ED25519,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA512,
        ]
    }
}
