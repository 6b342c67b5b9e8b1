//! Group topics on this node: an app of a member node subscribes to topic
//! `T` of group `G`; the node subscribes to the gossipsub topic
//! `p2pvm/group/<G>/topic/<digest of G and T>` (the name tells a relay
//! nothing of `T`), publishes messages sealed with the group's topic key of
//! the current epoch (`p2pvm_security::group_topics`), and opens what arrives
//! — checking the sender's member certificate against the gossip message's
//! signed source — before apps see it as topic `group:<G>/<T>`.
//!
//! Keys: one per epoch (the group's CRL number: each revocation starts a new
//! one), derived from the group CA's signature over the epoch
//! (`group_topics::epoch_key`): the owner node signs at creation and at each
//! revocation; the operator of a CA kept elsewhere signs with `openssl` and
//! hands the signature to any member (`p2pctl group topic-key`). A member
//! without the current key asks a member that has it — the message's sender,
//! or the topic's other peers — over the content protocol, after showing its
//! own member certificate there (`Op::GroupKey`); a member answers only peers
//! whose membership it verified, and the asker keeps the answer only if the
//! group CA signed it, so a lying member can neither hand out a key of its
//! own nor seal messages others will take with one.

use libp2p::PeerId;
use p2pvm_content::transfer::{self, Op, Status};
use p2pvm_security::GroupId;
use p2pvm_security::group_topics::{self, KEY_LEN, SealError};
use p2pvm_security::groups::GroupError;
use prost::Message;
use tracing::{debug, warn};

use super::ContentEvent;
use super::ContentService;
use super::fetch::{group_session, open_stream, request_response};
use crate::node::{Command, NodeError, PubsubMessage};
use crate::report::chain;

/// An epoch signature is at most this long (an RSA-8192 signature, with
/// room to spare).
const MAX_EPOCH_SIGNATURE: u64 = 2048;

/// What apps see group topic `topic` of `group` as.
pub fn app_topic(group: GroupId, topic: &str) -> String {
    format!("group:{group}/{topic}")
}

/// The gossipsub topic group topic `topic` of `group` travels on.
pub fn wire_topic(group: GroupId, topic: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"p2pvm/group-topic/v1\0");
    h.update(&group.0);
    h.update(topic.as_bytes());
    format!("p2pvm/group/{group}/topic/{}", &h.finalize().to_hex()[..32])
}

/// The wire topic of an app topic `group:<G>/<T>`, if it is one.
pub fn wire_of_app_topic(app: &str) -> Option<String> {
    let (group, topic) = app.strip_prefix("group:")?.split_once('/')?;
    Some(wire_topic(group.parse().ok()?, topic))
}

fn group_of_wire(topic: &str) -> Option<GroupId> {
    let rest = topic.strip_prefix("p2pvm/group/")?;
    let (group, tail) = rest.split_once('/')?;
    tail.starts_with("topic/").then_some(())?;
    group.parse().ok()
}

/// The sealed payload: the app's topic name travels inside.
#[derive(Clone, PartialEq, Message)]
struct Payload {
    #[prost(string, tag = "1")]
    topic: String,
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
}

/// Why a group-topic publish failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupTopicError {
    /// This node is not a current member.
    #[error("DRM_NOT_GROUP_MEMBER: this node is not a current member of group {0}")]
    NotMember(GroupId),
    /// No member could give this node the current key.
    #[error(
        "no member gave this node the group's topic key of epoch {0}: members hold it once the group's CA signs the epoch (the owner node does when it creates the group or revokes; for a CA kept elsewhere, `p2pctl group topic-key GROUP` on any member says how), and one must be online"
    )]
    NoKey(u64),
    /// Sealing failed.
    #[error("sealing: {0}")]
    Seal(#[from] p2pvm_security::group_topics::SealError),
    /// The node refused to publish.
    #[error("{0}")]
    Node(#[from] NodeError),
}

/// Why a member did not hand this node a topic key.
#[derive(Debug, thiserror::Error)]
enum KeyFetchError {
    /// The member could not be reached, or no group session opened.
    #[error(transparent)]
    Provider(#[from] super::ProviderError),
    /// The exchange broke off.
    #[error("the key request failed: {0}")]
    Io(#[from] std::io::Error),
    /// The member refused, with its reason.
    #[error("refused: {0}")]
    Refused(String),
}

/// Why a message on a group topic was not handed to apps.
#[derive(Debug, thiserror::Error)]
enum GroupMessageError {
    /// Gossipsub carried it without a signed source.
    #[error("unsigned")]
    Unsigned,
    /// The sender is not a current member.
    #[error("sender: {0}")]
    Sender(#[source] GroupError),
    /// It does not decode, is of another epoch, or does not open.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// No member gave this node the epoch's key.
    #[error(transparent)]
    Key(#[from] GroupTopicError),
    /// Its payload does not decode.
    #[error("payload: {0}")]
    Payload(#[from] prost::DecodeError),
    /// It was sealed for another topic of the group.
    #[error("sealed for another topic")]
    WrongTopic,
    /// The membership check did not finish.
    #[error("the check did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why this node does not hand a peer a topic key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GroupKeyRefusal {
    /// The request names no group.
    #[error("not a group id")]
    BadGroup,
    /// The asker is not a verified member on a group session of the group
    /// (the prefix is the DRM code the asker reads).
    #[error("DRM_NOT_GROUP_MEMBER: topic keys of group {0} go to its members, on a group session")]
    NotMember(GroupId),
    /// The epoch is after the CRL held here.
    #[error("epoch {asked} is after the CRL held here (number {held})")]
    FutureEpoch {
        /// The epoch asked for.
        asked: u64,
        /// The CRL number held.
        held: u64,
    },
    /// This node holds no key of the epoch.
    #[error("no key of epoch {0} here")]
    NoKey(u64),
}

impl ContentService {
    /// The current epoch of group `id` and its key, fetched from `peers`
    /// first if this node lacks it.
    async fn current_key(
        &self,
        id: GroupId,
        peers: &[PeerId],
    ) -> Result<(u64, [u8; KEY_LEN]), GroupTopicError> {
        let epoch = self.groups().crl_number(id);
        if let Some(k) = self.groups().topic_key_at(id, epoch) {
            return Ok((epoch, k));
        }
        self.topic_key_from(id, epoch, peers)
            .await
            .map(|k| (epoch, k))
            .ok_or(GroupTopicError::NoKey(epoch))
    }

    /// Asks `peers` in turn for group `id`'s epoch signature of `epoch` and
    /// keeps the first one the group CA made: the key.
    async fn topic_key_from(
        &self,
        id: GroupId,
        epoch: u64,
        peers: &[PeerId],
    ) -> Option<[u8; KEY_LEN]> {
        for peer in peers {
            let signature = match self.fetch_epoch_signature(*peer, id, epoch).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, group = %id, epoch, error = %chain(&e), "no topic key from this peer");
                    continue;
                }
            };
            match self.take_epoch_signature(id, epoch, signature).await {
                Ok(k) => return Some(k),
                Err(e) => {
                    warn!(%peer, group = %id, epoch, error = %chain(&e), "a member handed out a topic key the group CA did not sign; not kept")
                }
            }
        }
        None
    }

    /// Asks `peer` for group `id`'s epoch signature of `epoch`, in a group
    /// session.
    async fn fetch_epoch_signature(
        &self,
        peer: PeerId,
        id: GroupId,
        epoch: u64,
    ) -> Result<Vec<u8>, KeyFetchError> {
        let op = Op::GroupKey(transfer::GroupKeyRequest {
            group_id: id.to_string(),
            epoch,
        });
        // Refused on a plain stream; the refusal names the port of the
        // provider's fast path, where a group session opens.
        let mut plain = open_stream(self, peer).await?;
        let (refusal, _) = request_response(&mut plain, op.clone(), MAX_EPOCH_SIGNATURE).await?;
        let mut session = group_session(self, peer, id, refusal.fast_path_port).await?;
        let (header, payload) = request_response(&mut session, op, MAX_EPOCH_SIGNATURE).await?;
        if header.status != Status::Ok as i32 {
            return Err(KeyFetchError::Refused(header.message));
        }
        Ok(payload)
    }

    /// Checks group `id`'s epoch signature of `epoch` against the group CA
    /// and keeps it (a signature check and a file write: off the async
    /// threads). Returns the key.
    pub(crate) async fn take_epoch_signature(
        &self,
        id: GroupId,
        epoch: u64,
        signature: Vec<u8>,
    ) -> Result<[u8; KEY_LEN], GroupError> {
        let svc = self.clone();
        tokio::task::spawn_blocking(move || {
            svc.groups().take_epoch_signature(id, epoch, &signature)
        })
        .await
        .map_err(|e| GroupError::made("a topic key (the check did not finish)", e))?
    }

    /// Publishes `data` on group `id`'s topic `topic`.
    pub async fn publish_group(
        &self,
        id: GroupId,
        topic: &str,
        data: Vec<u8>,
    ) -> Result<(), GroupTopicError> {
        if !self.groups().is_member(id) {
            return Err(GroupTopicError::NotMember(id));
        }
        let wire = wire_topic(id, topic);
        let peers = self
            .inner
            .ctx
            .node
            .call(|reply| Command::TopicPeers(wire.clone(), reply))
            .await
            .unwrap_or_default();
        let (epoch, key) = self.current_key(id, &peers).await?;
        let cert = self
            .groups()
            .own_certificate(id)
            .ok_or(GroupTopicError::NotMember(id))?;
        let me = self.inner.ctx.node.peer_id().to_base58();
        let payload = Payload {
            topic: topic.to_owned(),
            data,
        }
        .encode_to_vec();
        // Fault injection (tests only): a lying member seals with a key of
        // its own, which no other member holds.
        let key = if self.inner.config.test_wrong_group_keys {
            *blake3::hash(&key).as_bytes()
        } else {
            key
        };
        let sealed = group_topics::seal(&key, epoch, id, &wire, &me, cert, &payload)?;
        self.inner
            .ctx
            .node
            .call(|reply| Command::Publish(wire, sealed.into(), reply))
            .await?;
        Ok(())
    }

    /// A message on a group topic's wire: opened and handed to apps as
    /// `group:<G>/<T>` if a current member sealed it with the current key.
    pub(crate) async fn take_group_message(&self, m: PubsubMessage) {
        let Some(id) = group_of_wire(&m.topic) else {
            return;
        };
        match self.open_group_message(id, &m).await {
            Ok((topic, data)) => self.emit(ContentEvent::GroupMessage(PubsubMessage {
                topic: app_topic(id, &topic),
                data: data.into(),
                ..m
            })),
            Err(why) => {
                debug!(group = %id, source = ?m.source, %why, "group message refused")
            }
        }
    }

    async fn open_group_message(
        &self,
        id: GroupId,
        m: &PubsubMessage,
    ) -> Result<(String, Vec<u8>), GroupMessageError> {
        // Gossipsub signs messages with the source's peer key: the source
        // is who sent it.
        let source = m.source.ok_or(GroupMessageError::Unsigned)?;
        let sealed = group_topics::decode(&m.data)?;
        let (svc, cert) = (self.clone(), sealed.sender_certificate.clone());
        tokio::task::spawn_blocking(move || svc.groups().verify_member(id, &source, &cert))
            .await?
            .map_err(GroupMessageError::Sender)?;
        let sender = source.to_base58();
        let epoch = self.groups().crl_number(id);
        // Checked before any key is fetched: a message of another epoch
        // asks nobody for anything.
        if sealed.epoch != epoch {
            return Err(SealError::Epoch {
                got: sealed.epoch,
                held: epoch,
            }
            .into());
        }
        let open =
            |key: &[u8; KEY_LEN]| group_topics::open(key, epoch, id, &m.topic, &sender, &sealed);
        let held = self.groups().topic_keys_at(id, epoch);
        let plain = match held.iter().find_map(|k| open(k).ok()) {
            Some(plain) => plain,
            None => {
                // A key of the epoch this node lacks: the sender's, or the
                // relay's, if the group CA signed it (it may have signed the
                // epoch more than once). A message sealed with a key the CA
                // never signed (a lying member's) opens with none, and is
                // refused.
                let key = self
                    .topic_key_from(id, epoch, &[source, m.via])
                    .await
                    .ok_or(GroupTopicError::NoKey(epoch))?;
                open(&key)?
            }
        };
        let payload = Payload::decode(plain.as_slice())?;
        if wire_topic(id, &payload.topic) != m.topic {
            return Err(GroupMessageError::WrongTopic);
        }
        Ok((payload.topic, payload.data))
    }

    /// Answers a member's request for a topic key, on a group session of
    /// that group (`session`) only.
    pub(crate) fn answer_group_key(
        &self,
        peer: &PeerId,
        session: Option<GroupId>,
        r: &transfer::GroupKeyRequest,
    ) -> Result<Vec<u8>, GroupKeyRefusal> {
        let id: GroupId = r.group_id.parse().map_err(|_| GroupKeyRefusal::BadGroup)?;
        if !self.is_verified_member(&r.group_id, peer, session) {
            if session.is_some() {
                warn!(%peer, group = %id, "a topic key asked for by a peer not a current member");
            }
            return Err(GroupKeyRefusal::NotMember(id));
        }
        // Never an epoch after the CRL held: its key would be the one a
        // member revoked by a CRL on its way here must not get.
        let current = self.groups().crl_number(id);
        if r.epoch > current {
            return Err(GroupKeyRefusal::FutureEpoch {
                asked: r.epoch,
                held: current,
            });
        }
        let mut signature = self
            .groups()
            .epoch_signature(id, r.epoch)
            .ok_or(GroupKeyRefusal::NoKey(r.epoch))?;
        // Fault injection (tests only): a lying member hands out a
        // signature the CA did not make.
        if self.inner.config.test_wrong_group_keys
            && let Some(last) = signature.last_mut()
        {
            *last ^= 1;
        }
        Ok(signature)
    }
}
