//! Trusted peer groups (the privacy controller): create a group, invite a
//! peer, join with an invitation, revoke a member, list groups and members,
//! and, for a CA kept outside any node, hand the group its topic keys and
//! CRLs.
//! Everything but listing groups is admin.

use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::error::Result;

impl Client {
    /// Creates a group this node owns; its CA is valid `valid_days` (0: 365).
    pub async fn group_create(&self, name: &str, valid_days: u64) -> Result<pb::GroupInfo> {
        let op = Op::GroupCreate(pb::GroupCreateRequest {
            name: name.into(),
            valid_days,
        });
        self.call(op, reply!(Group)).await
    }

    /// Invites `peer_id` into `group` (a name or id) for `valid_days` (0:
    /// 30): the invitation (PEM) that peer's node joins with.
    pub async fn group_invite(
        &self,
        group: &str,
        peer_id: &str,
        valid_days: u64,
    ) -> Result<pb::GroupInvitation> {
        let op = Op::GroupInvite(pb::GroupInviteRequest {
            group: group.into(),
            peer_id: peer_id.into(),
            valid_days,
            valid_secs: 0,
        });
        self.call(op, reply!(GroupInvitation)).await
    }

    /// [`Client::group_invite`] with the validity in seconds.
    pub async fn group_invite_secs(
        &self,
        group: &str,
        peer_id: &str,
        valid_secs: u64,
    ) -> Result<pb::GroupInvitation> {
        let op = Op::GroupInvite(pb::GroupInviteRequest {
            group: group.into(),
            peer_id: peer_id.into(),
            valid_days: 0,
            valid_secs: valid_secs.max(1),
        });
        self.call(op, reply!(GroupInvitation)).await
    }

    /// Joins a group with an invitation (PEM), under `name` (empty: the
    /// CA's common name).
    pub async fn group_join(&self, invitation: &[u8], name: &str) -> Result<pb::GroupInfo> {
        let op = Op::GroupJoin(pb::GroupJoinRequest {
            invitation: invitation.to_vec().into(),
            name: name.into(),
        });
        self.call(op, reply!(Group)).await
    }

    /// Revokes `peer_id`'s membership of `group` (a new CRL).
    pub async fn group_revoke(&self, group: &str, peer_id: &str) -> Result<()> {
        let op = Op::GroupRevoke(pb::GroupRevokeRequest {
            group: group.into(),
            peer_id: peer_id.into(),
        });
        self.call(op, reply!(Ok)).await.map(|_| ())
    }

    /// The members `group`'s owner issued certificates to.
    pub async fn group_members(&self, group: &str) -> Result<pb::GroupMemberList> {
        let op = Op::GroupMembers(pb::GroupMembersRequest {
            group: group.into(),
        });
        self.call(op, reply!(GroupMembers)).await
    }

    /// The name of group `group_id`'s topic `name`: subscribe and publish on
    /// it like on any topic. Only current members can; its messages are
    /// sealed so that only members read them, and accepted only from members.
    pub fn group_topic(group_id: &str, name: &str) -> String {
        format!("group:{group_id}/{name}")
    }

    /// A certificate signing request (PEM) for this node's own key, for a
    /// group CA kept elsewhere (the `openssl` CLI) to sign into this node's
    /// member certificate (admin).
    pub async fn group_csr(&self) -> Result<pb::GroupCsr> {
        let op = Op::GroupCsr(pb::GroupCsrRequest {});
        self.call(op, reply!(GroupCsr)).await
    }

    /// Group `group`'s current topic-key epoch and whether this node holds
    /// its key; with a `signature` (the group CA's over the epoch's text,
    /// DER), takes it first (admin).
    pub async fn group_topic_key(
        &self,
        group: &str,
        signature: &[u8],
    ) -> Result<pb::GroupTopicKey> {
        let op = Op::GroupTopicKey(pb::GroupTopicKeyRequest {
            group: group.into(),
            signature: signature.to_vec().into(),
        });
        self.call(op, reply!(GroupTopicKey)).await
    }

    /// Publishes a CRL signed by `group`'s CA (PEM or DER) to its members
    /// (admin).
    pub async fn group_crl_publish(&self, group: &str, crl: &[u8]) -> Result<pb::GroupInfo> {
        let op = Op::GroupCrlPublish(pb::GroupCrlPublishRequest {
            group: group.into(),
            crl: crl.to_vec().into(),
        });
        self.call(op, reply!(Group)).await
    }

    /// Every group this node knows.
    pub async fn group_list(&self) -> Result<Vec<pb::GroupInfo>> {
        let op = Op::GroupList(pb::GroupListRequest {});
        Ok(self.call(op, reply!(Groups)).await?.groups)
    }
}
