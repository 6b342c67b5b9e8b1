//! The one place where a peer-certificate policy becomes rustls's two
//! verifier traits, for TLS 1.3 sessions with mutual authentication.
//!
//! Both of the node's own TLS handshakes — the content fast path (libp2p
//! certificates) and group sessions (member certificates of a group,
//! [`crate::group_tls`]) — accept the same shape of session: TLS 1.3 only,
//! a certificate from both sides, each checked by one rule whichever side
//! presents it. A [`CertPolicy`] is that rule; [`Verifier`] offers it to
//! rustls as a server's verifier (client certificates, mandatory) and as a
//! client's (the server's certificate), so the trait plumbing, and the TLS 1.2
//! refusal, are written once.

use std::fmt::Debug;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Which certificates a session accepts, and how their handshake signatures
/// are checked.
pub trait CertPolicy: Debug + Send + Sync {
    /// Who speaks TLS 1.3 only, for the refusal of a TLS 1.2 peer
    /// (e.g. "group sessions").
    const SESSIONS: &'static str;

    /// Accepts the presented certificate chain, or says why not.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error>;

    /// Checks a TLS 1.3 handshake signature made with `cert`'s key.
    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error>;

    /// The signature schemes offered for that signature.
    fn schemes(&self) -> Vec<SignatureScheme>;
}

/// A [`CertPolicy`] as rustls's client and server certificate verifier.
#[derive(Debug)]
pub struct Verifier<P>(pub P);

impl<P: CertPolicy> Verifier<P> {
    fn no_tls12() -> rustls::Error {
        rustls::Error::General(format!("{} speak TLS 1.3 only", P::SESSIONS))
    }
}

impl<P: CertPolicy> ServerCertVerifier for Verifier<P> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .check(end_entity, intermediates)
            .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(Self::no_tls12())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

impl<P: CertPolicy> ClientCertVerifier for Verifier<P> {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .check(end_entity, intermediates)
            .map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(Self::no_tls12())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts a chain of exactly one certificate whose first byte is 1.
    #[derive(Debug)]
    struct FirstByte;

    impl CertPolicy for FirstByte {
        const SESSIONS: &'static str = "test sessions";
        fn check(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
        ) -> Result<(), rustls::Error> {
            if intermediates.is_empty() && end_entity.first() == Some(&1) {
                Ok(())
            } else {
                Err(rustls::Error::General("refused".into()))
            }
        }
        fn verify13(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    }

    #[test]
    fn both_sides_apply_the_policy() {
        let v = Verifier(FirstByte);
        let good = CertificateDer::from(vec![1u8, 2, 3]);
        let bad = CertificateDer::from(vec![0u8, 2, 3]);
        let now = UnixTime::now();
        let name = ServerName::try_from("peer").unwrap();
        assert!(v.verify_server_cert(&good, &[], &name, &[], now).is_ok());
        assert!(v.verify_server_cert(&bad, &[], &name, &[], now).is_err());
        assert!(
            v.verify_server_cert(&good, std::slice::from_ref(&good), &name, &[], now)
                .is_err()
        );
        assert!(v.verify_client_cert(&good, &[], now).is_ok());
        assert!(v.verify_client_cert(&bad, &[], now).is_err());
        assert!(v.client_auth_mandatory() && v.offer_client_auth());
        assert_eq!(
            ServerCertVerifier::supported_verify_schemes(&v),
            vec![SignatureScheme::ED25519]
        );
    }
}
