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

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use prost::Message;

use crate::groups::GroupId;

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

/// A fresh random topic key.
pub fn new_key() -> Result<[u8; KEY_LEN], SealError> {
    let mut k = [0u8; KEY_LEN];
    aws_lc_rs::rand::fill(&mut k).map_err(|_| SealError::Seal)?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

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
