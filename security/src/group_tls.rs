//! Group sessions' TLS: the rustls configurations with which two members of a
//! trusted group authenticate each other before group content or a group
//! topic key passes between them.
//!
//! A group session is a TLS 1.3 handshake in which both sides present their
//! member certificate of the group, issued by the group CA for the member's
//! own libp2p Ed25519 key, and sign the handshake with that key. Each side
//! accepts the other only if its certificate chains to the group CA (the one
//! trust anchor), is valid now, is not on the group's current CRL, names a
//! peer id in its URI SAN and certifies that peer's key — so a session is
//! bound to the libp2p identity the rest of the node deals with (credit,
//! DRM). The server side learns which group a client asks for from the
//! ALPN protocol `p2pvm-group/1/<group id>`.
//!
//! The content engine runs these handshakes on its fast path (p2pd dials
//! and accepts; [`crate::peer_tls`] picks this configuration when a client
//! asks for a group), beside the libp2p connection
//! whose transport security is its own; [`GroupTls`] is plain configuration,
//! testable and measurable without a network.

use std::sync::Arc;

use libp2p_identity::PeerId;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::groups::{GroupError, GroupId, Groups};
use crate::pki::{self, CertError};
use crate::tls13::{CertPolicy, Verifier};

/// ALPN protocols of group sessions start with this; the group id follows.
const ALPN_PREFIX: &[u8] = b"p2pvm-group/1/";

/// The ALPN protocol a client offers to open a session in `group`.
pub fn alpn(group: GroupId) -> Vec<u8> {
    let mut p = ALPN_PREFIX.to_vec();
    p.extend_from_slice(group.to_string().as_bytes());
    p
}

/// The group an offered ALPN protocol asks for: `None` when it is not a
/// group session's, `Some(Err)` when it is one that names no valid group.
pub fn group_in_alpn(proto: &[u8]) -> Option<Result<GroupId, ()>> {
    let id = proto.strip_prefix(ALPN_PREFIX)?;
    Some(
        std::str::from_utf8(id)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(()),
    )
}

/// Builds the TLS configurations of this node's group sessions.
pub struct GroupTls {
    groups: Arc<Groups>,
    key: Arc<dyn SigningKey>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for GroupTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupTls").finish_non_exhaustive()
    }
}

impl GroupTls {
    /// Sessions of the node with libp2p key `node_key` (Ed25519) whose
    /// groups are `groups`, with the TLS algorithms of `provider`.
    pub fn new(
        groups: Arc<Groups>,
        node_key: &libp2p_identity::Keypair,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, GroupError> {
        let pkcs8 = pki::node_key_pkcs8(node_key).ok_or_else(|| {
            GroupError::cannot_make("group sessions: the node key is not an Ed25519 key")
        })?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
        let key = provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| GroupError::made("the node key for TLS", e))?;
        Ok(Self {
            groups,
            key,
            provider,
        })
    }

    /// This node's member certificate of `group` with its key.
    fn certified(&self, group: GroupId) -> Result<Arc<CertifiedKey>, GroupError> {
        let cert = self
            .groups
            .own_certificate(group)
            .ok_or_else(|| GroupError::Unknown(group.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(cert)],
            self.key.clone(),
        )))
    }

    fn verifier(&self, group: GroupId, expect: Option<PeerId>) -> Arc<Verifier<MemberVerifier>> {
        Arc::new(Verifier(MemberVerifier {
            groups: self.groups.clone(),
            group,
            expect,
            algs: self.provider.signature_verification_algorithms,
        }))
    }

    /// The server side of a session in `group`: it answers with this node's
    /// member certificate and accepts only a current member.
    pub fn server_config(&self, group: GroupId) -> Result<Arc<rustls::ServerConfig>, GroupError> {
        let certified = self.certified(group)?;
        let mut c = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(self.verifier(group, None))
            .with_cert_resolver(Arc::new(Own(certified)));
        c.alpn_protocols = vec![alpn(group)];
        // Each session is one connection; nothing to resume.
        c.send_tls13_tickets = 0;
        Ok(Arc::new(c))
    }

    /// The client side of a session in `group` with `server`: the handshake
    /// fails unless the other end is `server` and a current member.
    pub fn client_config(
        &self,
        group: GroupId,
        server: PeerId,
    ) -> Result<Arc<rustls::ClientConfig>, GroupError> {
        let certified = self.certified(group)?;
        let mut c = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .dangerous()
            .with_custom_certificate_verifier(self.verifier(group, Some(server)))
            .with_client_cert_resolver(Arc::new(Own(certified)));
        c.alpn_protocols = vec![alpn(group)];
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    }
}

/// The peer a session's other end proved to be (its member certificate, as
/// the handshake verified it), from what the connection presents.
pub fn session_peer(certs: Option<&[CertificateDer<'_>]>) -> Option<(PeerId, Vec<u8>)> {
    let leaf = certs?.first()?;
    pki::peer_of(leaf).ok().map(|p| (p, leaf.to_vec()))
}

fn tls(e: rustls::Error) -> GroupError {
    GroupError::made("a TLS configuration", e)
}

/// Offers one certificate, ours.
#[derive(Debug)]
struct Own(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Own {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Own {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts a current member of one group (as a server: anyone's; as a
/// client: the peer it meant to reach).
#[derive(Debug)]
struct MemberVerifier {
    groups: Arc<Groups>,
    group: GroupId,
    expect: Option<PeerId>,
    algs: WebPkiSupportedAlgorithms,
}

impl CertPolicy for MemberVerifier {
    const SESSIONS: &'static str = "group sessions";

    fn check(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        // Member certificates come straight from the group CA.
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        }
        let peer = pki::peer_of(leaf).map_err(refused)?;
        if self.expect.is_some_and(|e| e != peer) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        // Chain to the group CA, validity now, the CRL held now, the peer's
        // own key.
        self.groups
            .verify_member(self.group, &peer, leaf)
            .map_err(|e| match e {
                GroupError::Certificate(c) => refused(c),
                e => rustls::Error::General(e.to_string()),
            })
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        // Member certificates certify libp2p Ed25519 keys.
        vec![SignatureScheme::ED25519]
    }
}

/// A refused member certificate, as TLS reports it (the reason reaches the
/// other side as an alert, and this side's log in full).
fn refused(e: CertError) -> rustls::Error {
    let kind = match e {
        CertError::Expired => CertificateError::Expired,
        CertError::NotYetValid => CertificateError::NotValidYet,
        CertError::Revoked => CertificateError::Revoked,
        CertError::UnknownIssuer => CertificateError::UnknownIssuer,
        CertError::BadSignature => CertificateError::BadSignature,
        CertError::Malformed { .. } => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(kind)
}

/// Runs a TLS handshake between two in-memory connections; the error of
/// whichever side failed first. (Tests and the handshake benchmark.)
pub fn handshake_in_memory(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    let mut buf = Vec::with_capacity(16 << 10);
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).map_err(io)?;
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            server.read_tls(&mut rd).map_err(io)?;
        }
        server.process_new_packets()?;
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).map_err(io)?;
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            client.read_tls(&mut rd).map_err(io)?;
        }
        client.process_new_packets()?;
    }
    Err(rustls::Error::General(
        "the handshake did not finish".into(),
    ))
}

fn io(e: std::io::Error) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;
    use rustls::pki_types::ServerName;

    struct Node {
        groups: Arc<Groups>,
        tls: GroupTls,
        id: PeerId,
        _dir: tempfile::TempDir,
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let k = Keypair::generate_ed25519();
        let id = k.public().to_peer_id();
        let groups = Arc::new(Groups::open(dir.path(), id).unwrap());
        let tls = GroupTls::new(groups.clone(), &k, provider()).unwrap();
        Node {
            groups,
            tls,
            id,
            _dir: dir,
        }
    }

    fn session(client: &Node, server: &Node, g: GroupId) -> Result<PeerId, rustls::Error> {
        let cc = client.tls.client_config(g, server.id).unwrap();
        let sc = server.tls.server_config(g).unwrap();
        let name = ServerName::try_from("group.p2pvm").unwrap();
        let mut c = rustls::ClientConnection::new(cc, name).unwrap();
        let mut s = rustls::ServerConnection::new(sc).unwrap();
        handshake_in_memory(&mut c, &mut s)?;
        let (peer, _) = session_peer(s.peer_certificates()).unwrap();
        let (srv, _) = session_peer(c.peer_certificates()).unwrap();
        assert_eq!(srv, server.id);
        Ok(peer)
    }

    #[test]
    fn members_open_sessions_and_a_revoked_one_cannot() {
        let (owner, member, other) = (node(), node(), node());
        let g = owner.groups.create("crew", 86_400).unwrap();
        for n in [&member, &other] {
            let inv = owner.groups.invite("crew", &n.id, 3600).unwrap();
            n.groups.join(inv.as_bytes(), None).unwrap();
        }
        assert_eq!(session(&member, &owner, g.id).unwrap(), member.id);
        assert_eq!(session(&owner, &member, g.id).unwrap(), owner.id);
        assert_eq!(session(&member, &other, g.id).unwrap(), member.id);

        // Revoked at the owner: the owner refuses it at once, as server and
        // as client; `other` does once it holds the new CRL.
        let crl = owner.groups.revoke("crew", &member.id).unwrap();
        let e = session(&member, &owner, g.id).unwrap_err();
        assert!(format!("{e:?}").contains("Revoked"), "{e:?}");
        let e = session(&owner, &member, g.id).unwrap_err();
        assert!(format!("{e:?}").contains("Revoked"), "{e:?}");
        assert!(session(&member, &other, g.id).is_ok());
        assert!(other.groups.accept_crl(g.id, &crl).unwrap());
        assert!(session(&member, &other, g.id).is_err());
    }

    #[test]
    fn a_non_member_and_the_wrong_server_are_refused() {
        let (owner, member, stranger) = (node(), node(), node());
        let g = owner.groups.create("crew", 86_400).unwrap();
        let inv = owner.groups.invite("crew", &member.id, 3600).unwrap();
        member.groups.join(inv.as_bytes(), None).unwrap();
        // A stranger has no certificate of the group to offer at all.
        assert!(stranger.tls.client_config(g.id, owner.id).is_err());
        // A stranger with a group of the same name (another CA, so another
        // id), asking for a session in the real one with its certificate.
        let fake = stranger.groups.create("crew", 86_400).unwrap();
        assert_ne!(fake.id, g.id);
        let mut cc = (*stranger.tls.client_config(fake.id, owner.id).unwrap()).clone();
        cc.alpn_protocols = vec![alpn(g.id)];
        let mut c = rustls::ClientConnection::new(
            Arc::new(cc),
            ServerName::try_from("group.p2pvm").unwrap(),
        )
        .unwrap();
        let mut s = rustls::ServerConnection::new(owner.tls.server_config(g.id).unwrap()).unwrap();
        assert!(handshake_in_memory(&mut c, &mut s).is_err());
        assert!(s.peer_certificates().is_none() || s.is_handshaking());
        // Reaching the member while expecting the owner: refused.
        let cc = member.tls.client_config(g.id, owner.id).unwrap();
        let sc = member.tls.server_config(g.id).unwrap();
        let mut c = rustls::ClientConnection::new(cc, ServerName::try_from("group.p2pvm").unwrap())
            .unwrap();
        let mut s = rustls::ServerConnection::new(sc).unwrap();
        let e = handshake_in_memory(&mut c, &mut s).unwrap_err();
        assert!(
            format!("{e:?}").contains("ApplicationVerificationFailure"),
            "{e:?}"
        );
    }

    #[test]
    fn alpn_names_the_group() {
        let id: GroupId = "00112233445566778899aabbccddeeff".parse().unwrap();
        assert_eq!(group_in_alpn(&alpn(id)), Some(Ok(id)));
        assert_eq!(group_in_alpn(b"p2pvm-group/1/zz"), Some(Err(())));
        assert_eq!(group_in_alpn(b"p2pvm-content/2"), None);
    }
}
