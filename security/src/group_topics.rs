//! Group topics: pubsub that only a trusted group's members can read and
//! publish on. A message is sealed (ChaCha20-Poly1305, aws-lc-rs) with the
//! group's topic key of the current *epoch* — the number of the group's
//! latest CRL, so every revocation starts a new key — and carries its
//! sender's member certificate. A receiver takes it only if it opens with
//! the key of the epoch the receiver holds (a revoked member knows only older
//! keys) and the certificate proves the gossip message's signed source a
//! current member (so a member cannot pose as another, and a revoked one's
//! certificate is refused even before the new key reaches everyone).
//!
//! The associated data binds the ciphertext to the group, the topic, the
//! epoch and the sender: a sealed message replayed on another topic or under
//! another sender's name does not open.
//!
//! **Where keys come from.** An epoch's key is derived from the group CA's
//! signature over a fixed text naming the group and the epoch
//! ([`epoch_message`]): only the holder of the CA key can make it, and every
//! member checks it against the CA certificate it already holds. So a member
//! can hand a newcomer only the one key the CA made (a lying member's key is
//! refused before use), and a group whose CA is kept outside any node (the
//! `openssl` CLI) gets its keys the same way: its operator signs the text
//! once per epoch (`p2pctl group topic-key`). The signature is a secret
//! among members, like the key; it is never published.

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::signature::{self, EcdsaKeyPair};
use prost::Message;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Cause;
use crate::group_id::GroupId;

/// Topic keys are this long.
pub const KEY_LEN: usize = 32;

/// Why a group message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The bytes are not a group message.
    #[error("not a group message")]
    Malformed,
    /// Sealed under another epoch's key than the one held.
    #[error("sealed under epoch {got}, this node holds epoch {held}")]
    Epoch {
        /// The message's epoch.
        got: u64,
        /// The receiver's.
        held: u64,
    },
    /// It does not open with the key (forged, altered, or for another
    /// topic, group or sender).
    #[error("does not open with the group's key")]
    Forged,
    /// Sealing failed.
    #[error("cannot seal")]
    Seal,
}

/// Why an epoch signature gives no key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochKeyError {
    /// The group CA's key is of a kind epoch signatures are not checked for.
    #[error(
        "the group CA's key is {0}; epoch signatures need an EC P-256 or P-384, RSA or Ed25519 CA key"
    )]
    UnsupportedKey(String),
    /// The CA certificate does not parse.
    #[error("the group CA does not parse")]
    BadCa(#[source] Cause),
    /// The signature is not the group CA's over this group's epoch text.
    #[error(
        "not the group CA's signature over {message:?} (signed with another key, for another epoch or group, or altered)"
    )]
    NotSigned {
        /// The text the CA must sign.
        message: String,
    },
    /// The owner's CA key cannot sign.
    #[error("cannot sign with the group CA key")]
    Sign(#[source] Cause),
    /// A key for an epoch after the CRL this node holds: it comes with a
    /// CRL not yet here, and is taken after it.
    #[error("epoch {epoch} is after the CRL held here (number {held})")]
    NotCurrent {
        /// The epoch offered.
        epoch: u64,
        /// The CRL number held.
        held: u64,
    },
}

/// How a group CA's key signs epoch texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CaKey {
    P256,
    P384,
    Rsa,
    Ed25519,
}

impl CaKey {
    fn of(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<Self, EpochKeyError> {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            return match curve {
                Some(c) if c == OID_EC_P256 => Ok(Self::P256),
                Some(c) if c == OID_NIST_EC_P384 => Ok(Self::P384),
                other => Err(EpochKeyError::UnsupportedKey(format!(
                    "EC on curve {}",
                    other.map(|c| c.to_id_string()).unwrap_or("?".into())
                ))),
            };
        }
        if *alg == OID_PKCS1_RSAENCRYPTION {
            return Ok(Self::Rsa);
        }
        if *alg == OID_SIG_ED25519 {
            return Ok(Self::Ed25519);
        }
        Err(EpochKeyError::UnsupportedKey(alg.to_id_string()))
    }

    fn verifier(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            Self::P256 => &signature::ECDSA_P256_SHA256_ASN1,
            Self::P384 => &signature::ECDSA_P384_SHA384_ASN1,
            Self::Rsa => &signature::RSA_PKCS1_2048_8192_SHA256,
            Self::Ed25519 => &signature::ED25519,
        }
    }

    /// The part of a verified signature the key is derived from: one value
    /// per signature the CA made. ECDSA's `(r, s)` has a twin `(r, n - s)`
    /// that anyone can make from it, so only `r` counts; an Ed25519
    /// signature's `R` likewise; RSA PKCS#1 v1.5 signatures are unique.
    fn key_material(self, sig: &[u8]) -> Option<Vec<u8>> {
        match self {
            Self::P256 | Self::P384 => {
                let (_, seq) = x509_parser::der_parser::parse_der(sig).ok()?;
                let r = seq.as_sequence().ok()?.first()?.as_slice().ok()?;
                let start = r.iter().position(|b| *b != 0).unwrap_or(r.len());
                Some(r[start..].to_vec())
            }
            Self::Ed25519 => sig.get(..32).map(<[u8]>::to_vec),
            Self::Rsa => Some(sig.to_vec()),
        }
    }

    /// The `openssl` command that signs `message` with this kind of key in
    /// `ca.key`, writing `out`.
    /// `umask 077` first: the signature is as secret as the key.
    fn openssl_command(self, message: &str, out: &str) -> String {
        match self {
            Self::Ed25519 => format!(
                "umask 077 && printf '%s' '{message}' > epoch.txt && openssl pkeyutl -sign -rawin -inkey ca.key -in epoch.txt -out {out}"
            ),
            Self::P384 => format!(
                "umask 077 && printf '%s' '{message}' | openssl dgst -sha384 -sign ca.key -out {out}"
            ),
            Self::P256 | Self::Rsa => format!(
                "umask 077 && printf '%s' '{message}' | openssl dgst -sha256 -sign ca.key -out {out}"
            ),
        }
    }
}

/// The text group `group`'s CA signs to make the topic key of `epoch`.
pub fn epoch_message(group: GroupId, epoch: u64) -> String {
    format!("p2pvm group topic key v1: group {group} epoch {epoch}")
}

fn ca_key(ca_der: &[u8]) -> Result<(CaKey, Vec<u8>), EpochKeyError> {
    let (_, ca) =
        X509Certificate::from_der(ca_der).map_err(|e| EpochKeyError::BadCa(Cause::new(e)))?;
    let spki = ca.public_key();
    Ok((CaKey::of(spki)?, spki.subject_public_key.data.to_vec()))
}

/// The topic key of group `group`'s `epoch`, if `signature` is its CA's
/// (`ca_der`) over [`epoch_message`].
pub fn epoch_key(
    ca_der: &[u8],
    group: GroupId,
    epoch: u64,
    signature: &[u8],
) -> Result<[u8; KEY_LEN], EpochKeyError> {
    let (kind, public) = ca_key(ca_der)?;
    let message = epoch_message(group, epoch);
    let not_signed = || EpochKeyError::NotSigned {
        message: message.clone(),
    };
    signature::UnparsedPublicKey::new(kind.verifier(), &public)
        .verify(message.as_bytes(), signature)
        .map_err(|_| not_signed())?;
    let material = kind.key_material(signature).ok_or_else(not_signed)?;
    let mut h = blake3::Hasher::new_derive_key("p2pvm group topic key v1");
    h.update(&group.0);
    h.update(&epoch.to_be_bytes());
    h.update(&material);
    Ok(*h.finalize().as_bytes())
}

/// How the operator of group `group`'s CA (`ca_der`), kept outside any node,
/// signs the epoch text: the `openssl` command, writing `out`.
pub fn openssl_epoch_command(
    ca_der: &[u8],
    group: GroupId,
    epoch: u64,
    out: &str,
) -> Result<String, EpochKeyError> {
    let (kind, _) = ca_key(ca_der)?;
    Ok(kind.openssl_command(&epoch_message(group, epoch), out))
}

/// The owner's signature over epoch `epoch`'s text with its CA key
/// (`ca_key_pkcs8`: the P-256 key groups are created with).
pub fn sign_epoch(
    ca_key_pkcs8: &[u8],
    group: GroupId,
    epoch: u64,
) -> Result<Vec<u8>, EpochKeyError> {
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, ca_key_pkcs8)
        .map_err(|e| EpochKeyError::Sign(Cause::new(e)))?;
    let sig = key
        .sign(
            &aws_lc_rs::rand::SystemRandom::new(),
            epoch_message(group, epoch).as_bytes(),
        )
        .map_err(|e| EpochKeyError::Sign(Cause::new(e)))?;
    Ok(sig.as_ref().to_vec())
}

/// A group message as it travels on gossipsub.
#[derive(Clone, PartialEq, Message)]
pub struct GroupMessage {
    /// The key epoch (the group's CRL number when the key was made).
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// A random nonce.
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    /// The payload, sealed.
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
    /// The sender's member certificate (DER).
    #[prost(bytes = "vec", tag = "4")]
    pub sender_certificate: Vec<u8>,
}

fn aad(group: GroupId, topic: &str, epoch: u64, sender: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(64 + topic.len() + sender.len());
    a.extend_from_slice(b"p2pvm-group-topic-v1\0");
    a.extend_from_slice(&group.0);
    a.extend_from_slice(&epoch.to_be_bytes());
    a.extend_from_slice(&(topic.len() as u32).to_be_bytes());
    a.extend_from_slice(topic.as_bytes());
    a.extend_from_slice(sender.as_bytes());
    a
}

fn key(bytes: &[u8; KEY_LEN]) -> Result<LessSafeKey, SealError> {
    UnboundKey::new(&CHACHA20_POLY1305, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| SealError::Seal)
}

/// Seals `payload` for group `group`'s `topic` from `sender` (its peer id)
/// under the epoch-`epoch` key.
pub fn seal(
    key_bytes: &[u8; KEY_LEN],
    epoch: u64,
    group: GroupId,
    topic: &str,
    sender: &str,
    certificate: Vec<u8>,
    payload: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Seal)?;
    let mut buf = payload.to_vec();
    key(key_bytes)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(group, topic, epoch, sender)),
            &mut buf,
        )
        .map_err(|_| SealError::Seal)?;
    Ok(GroupMessage {
        epoch,
        nonce: nonce.to_vec(),
        ciphertext: buf,
        sender_certificate: certificate,
    }
    .encode_to_vec())
}

/// Decodes a group message (before its sender and epoch are checked).
pub fn decode(bytes: &[u8]) -> Result<GroupMessage, SealError> {
    GroupMessage::decode(bytes).map_err(|_| SealError::Malformed)
}

/// Opens `m` with the key of epoch `held` (refusing other epochs).
pub fn open(
    key_bytes: &[u8; KEY_LEN],
    held: u64,
    group: GroupId,
    topic: &str,
    sender: &str,
    m: &GroupMessage,
) -> Result<Vec<u8>, SealError> {
    if m.epoch != held {
        return Err(SealError::Epoch { got: m.epoch, held });
    }
    let nonce: [u8; NONCE_LEN] = m
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| SealError::Malformed)?;
    let mut buf = m.ciphertext.clone();
    let plain = key(key_bytes)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(group, topic, m.epoch, sender)),
            &mut buf,
        )
        .map_err(|_| SealError::Forged)?;
    Ok(plain.to_vec())
}

/// A fresh random key (tests seal with one; groups derive theirs from
/// epoch signatures).
pub fn new_key() -> Result<[u8; KEY_LEN], SealError> {
    let mut k = [0u8; KEY_LEN];
    aws_lc_rs::rand::fill(&mut k).map_err(|_| SealError::Seal)?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 CA as groups are created with: its certificate (DER) and its
    /// key (PKCS#8).
    fn p256_ca() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&key).unwrap();
        (ca.der().to_vec(), key.serialize_der())
    }

    /// DER of an ECDSA signature `(r, s)`.
    fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
        let int = |v: &[u8]| {
            let v = &v[v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1)..];
            let mut out = vec![0x02];
            let pad = v[0] & 0x80 != 0;
            out.push((v.len() + pad as usize) as u8);
            if pad {
                out.push(0);
            }
            out.extend_from_slice(v);
            out
        };
        let body = [int(r), int(s)].concat();
        [vec![0x30, body.len() as u8], body].concat()
    }

    #[test]
    fn an_epoch_key_comes_only_from_the_ca_signature_over_that_epoch() {
        let (ca, key) = p256_ca();
        let g = GroupId([7; 16]);
        let sig = sign_epoch(&key, g, 3).unwrap();
        let k = epoch_key(&ca, g, 3, &sig).unwrap();
        // Two signatures the CA made are two keys; the owner makes one.
        let again = sign_epoch(&key, g, 3).unwrap();
        assert_eq!(epoch_key(&ca, g, 3, &again).map(|x| x != k), Ok(true));
        let refused = |r: Result<[u8; KEY_LEN], EpochKeyError>| {
            matches!(r, Err(EpochKeyError::NotSigned { .. }))
        };
        assert!(refused(epoch_key(&ca, g, 4, &sig)), "another epoch");
        assert!(
            refused(epoch_key(&ca, GroupId([8; 16]), 3, &sig)),
            "another group"
        );
        let (other_ca, _) = p256_ca();
        assert!(refused(epoch_key(&other_ca, g, 3, &sig)), "another CA");
        let mut bent = sig.clone();
        let last = bent.len() - 1;
        bent[last] ^= 1;
        assert!(refused(epoch_key(&ca, g, 3, &bent)), "altered");
        assert!(refused(epoch_key(&ca, g, 3, &[])), "empty");
        assert!(refused(epoch_key(&ca, g, 3, &[0x30; 300])), "junk");
        assert!(matches!(
            epoch_key(b"not a certificate", g, 3, &sig),
            Err(EpochKeyError::BadCa(_))
        ));
    }

    #[test]
    fn a_member_cannot_make_a_second_key_from_the_signature_it_holds() {
        let (ca, key) = p256_ca();
        let g = GroupId([9; 16]);
        let sig = sign_epoch(&key, g, 1).unwrap();
        let k = epoch_key(&ca, g, 1, &sig).unwrap();
        // ECDSA's twin: (r, n - s) verifies as well.
        let (_, seq) = x509_parser::der_parser::parse_der(&sig).unwrap();
        let seq = seq.as_sequence().unwrap();
        let (r, s) = (seq[0].as_slice().unwrap(), seq[1].as_slice().unwrap());
        let n: [u8; 32] = [
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2,
            0xfc, 0x63, 0x25, 0x51,
        ];
        let mut s32 = [0u8; 32];
        let s = &s[s.len().saturating_sub(32)..];
        s32[32 - s.len()..].copy_from_slice(s);
        let mut twin = [0u8; 32];
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let d = n[i] as i16 - s32[i] as i16 - borrow;
            borrow = (d < 0) as i16;
            twin[i] = d.rem_euclid(256) as u8;
        }
        let twin_sig = ecdsa_der(r, &twin);
        assert_ne!(twin_sig, sig);
        assert_eq!(epoch_key(&ca, g, 1, &twin_sig), Ok(k));
    }

    #[test]
    fn an_ed25519_ca_signs_epochs_too() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&key).unwrap().der().to_vec();
        let g = GroupId([1; 16]);
        let signer = signature::Ed25519KeyPair::from_pkcs8(&key.serialize_der()).unwrap();
        let sig = signer.sign(epoch_message(g, 2).as_bytes());
        assert!(epoch_key(&ca, g, 2, sig.as_ref()).is_ok());
        assert!(epoch_key(&ca, g, 1, sig.as_ref()).is_err());
        let cmd = openssl_epoch_command(&ca, g, 2, "e.sig").unwrap();
        assert!(cmd.contains("pkeyutl -sign -rawin"), "{cmd}");
    }

    #[test]
    fn only_the_right_key_epoch_topic_and_sender_open_a_message() {
        let k = new_key().unwrap();
        let g = GroupId([3; 16]);
        let sealed = seal(&k, 2, g, "chat", "alice", vec![1, 2], b"hello crew").unwrap();
        assert!(
            !sealed.windows(10).any(|w| w == b"hello crew"),
            "the payload travels in clear"
        );
        let m = decode(&sealed).unwrap();
        assert_eq!(open(&k, 2, g, "chat", "alice", &m).unwrap(), b"hello crew");
        let other = new_key().unwrap();
        assert_eq!(
            open(&other, 2, g, "chat", "alice", &m),
            Err(SealError::Forged)
        );
        assert_eq!(
            open(&k, 3, g, "chat", "alice", &m),
            Err(SealError::Epoch { got: 2, held: 3 })
        );
        assert_eq!(open(&k, 2, g, "other", "alice", &m), Err(SealError::Forged));
        assert_eq!(
            open(&k, 2, g, "chat", "mallory", &m),
            Err(SealError::Forged)
        );
        assert_eq!(
            open(&k, 2, GroupId([4; 16]), "chat", "alice", &m),
            Err(SealError::Forged)
        );
        let mut tampered = m.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(
            open(&k, 2, g, "chat", "alice", &tampered),
            Err(SealError::Forged)
        );
        assert_eq!(decode(b"\xff\xff"), Err(SealError::Malformed));
    }
}
