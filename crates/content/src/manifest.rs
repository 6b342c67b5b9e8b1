//! Signed manifests: what an item is and the rights it carries, signed by its
//! publisher's Ed25519 peer key. Every manifest received is verified before use;
//! the DRM checker (`p2pvm-security`) enforces `rights` and checks the
//! publisher's certificate chain, if it carries one.
//!
//! The signature covers a domain tag and the manifest's protobuf encoding, so a
//! signature made for anything else can never pass as a manifest signature.

use libp2p_identity::{Keypair, PeerId, PublicKey};
use prost::Message;

use crate::ContentId;

/// Prefix of every signed message, separating manifest signatures from any other
/// use of the same key.
const SIGNING_DOMAIN: &[u8] = b"p2pvm-manifest-v1\0";

/// Why a manifest is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not a signed manifest.
    #[error("Malformed manifest")]
    Malformed(#[source] prost::DecodeError),
    /// The publisher field is not a peer id carrying a public key.
    #[error("Manifest publisher {0:?} is not an inline-key peer id")]
    BadPublisher(String),
    /// The signature does not verify with the publisher's key.
    #[error("Manifest signature does not verify for publisher {0}")]
    BadSignature(String),
    /// The content id field is not 32 bytes.
    #[error("Manifest content id has {0} bytes, not 32")]
    BadContentId(usize),
    /// Signing failed.
    #[error("Cannot sign the manifest")]
    Signing(#[source] libp2p_identity::SigningError),
}

/// Usage rights, enforced by the DRM checker.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Rights {
    /// SPDX id or free text, e.g. "CC-BY-4.0".
    #[prost(string, tag = "1")]
    pub licence: String,
    /// Whether receivers may serve the item to others.
    #[prost(bool, tag = "2")]
    pub redistribution_allowed: bool,
    /// Unix seconds after which the item must not be shared; 0 = never expires.
    #[prost(uint64, tag = "3")]
    pub expires_unix: u64,
    /// Trusted groups allowed to receive it; empty = everyone.
    #[prost(string, repeated, tag = "4")]
    pub allowed_groups: Vec<String>,
}

/// What an item is.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Manifest {
    /// BLAKE3 of the bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub content_id: Vec<u8>,
    /// Human name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// MIME type.
    #[prost(string, tag = "3")]
    pub mime_type: String,
    /// Size in bytes.
    #[prost(uint64, tag = "4")]
    pub size: u64,
    /// Publisher's peer id (base58).
    #[prost(string, tag = "5")]
    pub publisher: String,
    /// Unix seconds.
    #[prost(uint64, tag = "6")]
    pub created_unix: u64,
    /// Search tags.
    #[prost(string, repeated, tag = "7")]
    pub tags: Vec<String>,
    /// Rights section.
    #[prost(message, optional, tag = "8")]
    pub rights: Option<Rights>,
    /// The publisher's X.509 chain (DER, leaf first) binding its peer id to an
    /// identity issued by a publisher CA; empty when self-signed. Inside the
    /// signed bytes, so the publisher's signature covers it.
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub publisher_certificates: Vec<Vec<u8>>,
}

/// A manifest with its publisher's signature, as stored and sent.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct SignedManifest {
    /// The encoded [`Manifest`], exactly as signed.
    #[prost(bytes = "vec", tag = "1")]
    pub manifest: Vec<u8>,
    /// Ed25519 signature over `SIGNING_DOMAIN || manifest`.
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_DOMAIN.len() + manifest.len());
    msg.extend_from_slice(SIGNING_DOMAIN);
    msg.extend_from_slice(manifest);
    msg
}

impl Manifest {
    /// The content id as a typed value.
    pub fn id(&self) -> Result<ContentId, ManifestError> {
        let bytes: [u8; 32] = self
            .content_id
            .as_slice()
            .try_into()
            .map_err(|_| ManifestError::BadContentId(self.content_id.len()))?;
        Ok(ContentId(bytes))
    }

    /// Signs with the publisher's key, setting `publisher` to match it.
    pub fn sign(mut self, key: &Keypair) -> Result<SignedManifest, ManifestError> {
        self.publisher = key.public().to_peer_id().to_base58();
        let manifest = self.encode_to_vec();
        let signature = key
            .sign(&signed_message(&manifest))
            .map_err(ManifestError::Signing)?;
        Ok(SignedManifest {
            manifest,
            signature,
        })
    }
}

/// The public key a peer id carries inline (Ed25519 ids do: "identity"
/// multihashes of the protobuf-encoded key), if it maps back to that id.
pub fn inline_public_key(peer: &PeerId) -> Option<PublicKey> {
    // Code 0x00, a one-byte length, then the protobuf-encoded key.
    let bytes = peer.to_bytes();
    match bytes.as_slice() {
        [0x00, len, key @ ..] if usize::from(*len) == key.len() && *len < 0x80 => {
            let public = PublicKey::try_decode_protobuf(key).ok()?;
            // Guard against an id whose embedded key does not map back to it.
            (public.to_peer_id() == *peer).then_some(public)
        }
        _ => None,
    }
}

fn publisher_key(publisher: &str) -> Result<PublicKey, ManifestError> {
    let bad = || ManifestError::BadPublisher(publisher.into());
    let peer: PeerId = publisher.parse().map_err(|_| bad())?;
    inline_public_key(&peer).ok_or_else(bad)
}

impl SignedManifest {
    /// Decodes and verifies a signed manifest received from anywhere.
    pub fn verify_bytes(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let signed = SignedManifest::decode(bytes).map_err(ManifestError::Malformed)?;
        signed.verify()
    }

    /// Verifies the signature against the publisher named inside, and the fields.
    pub fn verify(&self) -> Result<Manifest, ManifestError> {
        let manifest =
            Manifest::decode(self.manifest.as_slice()).map_err(ManifestError::Malformed)?;
        let key = publisher_key(&manifest.publisher)?;
        if !key.verify(&signed_message(&self.manifest), &self.signature) {
            return Err(ManifestError::BadSignature(manifest.publisher));
        }
        manifest.id()?;
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            content_id: blake3::hash(b"film").as_bytes().to_vec(),
            name: "big-buck-bunny.mp4".into(),
            mime_type: "video/mp4".into(),
            size: 4,
            publisher: String::new(),
            created_unix: 1_790_000_000,
            tags: vec!["film".into(), "cc".into()],
            rights: Some(Rights {
                licence: "CC-BY-3.0".into(),
                redistribution_allowed: true,
                expires_unix: 0,
                allowed_groups: vec![],
            }),
            publisher_certificates: vec![b"not really a certificate".to_vec()],
        }
    }

    #[test]
    fn signed_manifest_verifies_and_names_its_publisher() {
        let key = Keypair::generate_ed25519();
        let signed = sample().sign(&key).unwrap();
        let m = SignedManifest::verify_bytes(&signed.encode_to_vec()).unwrap();
        assert_eq!(m.publisher, key.public().to_peer_id().to_base58());
        assert_eq!(m.id().unwrap(), ContentId::from(blake3::hash(b"film")));
        assert_eq!(m.rights.unwrap().licence, "CC-BY-3.0");
    }

    #[test]
    fn tampering_and_forgery_are_refused() {
        let key = Keypair::generate_ed25519();
        let signed = sample().sign(&key).unwrap();

        // Any change to the signed bytes breaks the signature.
        let mut m = Manifest::decode(signed.manifest.as_slice()).unwrap();
        m.rights.as_mut().unwrap().redistribution_allowed = false;
        let tampered = SignedManifest {
            manifest: m.encode_to_vec(),
            signature: signed.signature.clone(),
        };
        assert!(matches!(
            tampered.verify(),
            Err(ManifestError::BadSignature(_))
        ));

        // Claiming someone else as publisher with one's own signature fails too.
        let victim = Keypair::generate_ed25519();
        let mut m = Manifest::decode(signed.manifest.as_slice()).unwrap();
        m.publisher = victim.public().to_peer_id().to_base58();
        let manifest = m.encode_to_vec();
        let forged = SignedManifest {
            signature: key.sign(&signed_message(&manifest)).unwrap(),
            manifest,
        };
        assert!(matches!(
            forged.verify(),
            Err(ManifestError::BadSignature(_))
        ));

        // A signature over the bare manifest (no domain tag) is not accepted.
        let bare = SignedManifest {
            signature: key.sign(&signed.manifest).unwrap(),
            manifest: signed.manifest.clone(),
        };
        assert!(bare.verify().is_err());

        // A publisher id that carries no usable key.
        let mut m = Manifest::decode(signed.manifest.as_slice()).unwrap();
        m.publisher = PeerId::random().to_base58();
        let keyless = SignedManifest {
            manifest: m.encode_to_vec(),
            signature: signed.signature.clone(),
        };
        assert!(matches!(
            keyless.verify(),
            Err(ManifestError::BadPublisher(_))
        ));

        assert!(matches!(
            SignedManifest::verify_bytes(&[0xff, 0xff, 0xff]),
            Err(ManifestError::Malformed(_))
        ));
        let mut m = sample();
        m.content_id = vec![1, 2, 3];
        let short = m.sign(&key).unwrap();
        assert!(matches!(
            short.verify(),
            Err(ManifestError::BadContentId(3))
        ));
    }
}
