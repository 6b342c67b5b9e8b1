//! Publish/subscribe: an app's topics (a session's subscriptions are
//! reference-counted node-wide: the node joins a topic at the first and leaves
//! at the last one's release), publishing, a topic's peers. `group:<id>/<name>`
//! topics are sealed with the group's key by the content service; topics
//! under the node's reserved prefix are refused. Messages of subscribed topics
//! reach the app through the session's events.
//!
//! ```text
//!  Subscribe ─► count 0 → 1 ─► Command::Subscribe
//!  Unsubscribe / session end ─► count 1 → 0 ─► Command::Unsubscribe
//!  Publish ─► group topic? ─► ContentService::publish_group : Command::Publish
//! ```

use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use crate::api::apps::Principal;
use crate::api::session::{Session, ok};
use crate::api::{ApiError, ApiService};
use crate::node::Command;

/// Refuses topics the node uses itself (group CRLs).
pub(crate) fn reserved_topic(topic: &str) -> Result<(), ApiError> {
    if topic.starts_with(crate::content::crls::RESERVED_TOPIC_PREFIX) {
        return Err(ApiError::new(
            pb::ErrorCode::PermissionDenied,
            format!("{topic} is reserved for the node"),
        ));
    }
    Ok(())
}

/// A group topic `group:<group id>/<name>`: its group (of which this node
/// must be a current member) and name; `None` for other topics.
pub(crate) fn group_topic_of(
    svc: &ApiService,
    topic: &str,
) -> Result<Option<(p2pvm_security::GroupId, String)>, ApiError> {
    let Some(rest) = topic.strip_prefix("group:") else {
        return Ok(None);
    };
    let bad = || ApiError::bad("a group topic is group:<group id>/<name>");
    let (group, name) = rest.split_once('/').ok_or_else(bad)?;
    let id: p2pvm_security::GroupId = group.parse().map_err(|_| bad())?;
    if name.is_empty() {
        return Err(bad());
    }
    if !svc.content().groups().is_member(id) {
        return Err(ApiError::new(
            pb::ErrorCode::DrmNotGroupMember,
            format!("this node is not a current member of group {id}"),
        ));
    }
    Ok(Some((id, name.to_owned())))
}

/// Runs one of this domain's stateless operations.
pub(in crate::api) async fn run(svc: &ApiService, _who: &Principal, op: Op) -> Result<R, ApiError> {
    let node = &svc.inner.ctx.node;
    match op {
        Op::Publish(r) => {
            if r.topic.is_empty() {
                return Err(ApiError::bad("empty topic"));
            }
            reserved_topic(&r.topic)?;
            if let Some((id, name)) = group_topic_of(svc, &r.topic)? {
                svc.content()
                    .publish_group(id, &name, r.data.to_vec())
                    .await?;
                return Ok(R::Ok(pb::Empty {}));
            }
            node.call(|reply| Command::Publish(r.topic, r.data, reply))
                .await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::TopicPeers(r) => {
            let peers = node
                .call(|reply| Command::TopicPeers(r.topic, reply))
                .await?;
            Ok(R::TopicPeers(pb::PeerIdList {
                peer_ids: peers.iter().map(|p| p.to_string()).collect(),
            }))
        }
        // The dispatcher routes only this domain's operations here.
        _ => Err(super::routed_wrongly()),
    }
}

impl Session {
    pub(in crate::api) async fn subscribe(
        &mut self,
        topic: String,
    ) -> Result<pb::response::Result, ApiError> {
        if topic.is_empty() || topic.len() > 256 {
            return Err(ApiError::bad("topic must be 1-256 bytes"));
        }
        reserved_topic(&topic)?;
        let node_topic = group_topic_of(&self.svc, &topic)?
            .map(|(id, name)| crate::content::group_topics::wire_topic(id, &name))
            .unwrap_or_else(|| topic.clone());
        if self.topics.contains(&topic) {
            return Err(ApiError::new(
                pb::ErrorCode::AlreadyExists,
                "already subscribed",
            ));
        }
        let node = &self.svc.inner.ctx.node;
        let first = async {
            node.call(|r| Command::Subscribe(node_topic, r))
                .await
                .map_err(ApiError::from)
        };
        Session::acquire(&self.svc.inner.topics, &topic, first).await?;
        self.topics.insert(topic);
        self.sync_state();
        ok()
    }

    pub(in crate::api) async fn unsubscribe(
        &mut self,
        topic: &str,
    ) -> Result<pb::response::Result, ApiError> {
        if !self.topics.remove(topic) {
            return Err(ApiError::new(pb::ErrorCode::NotFound, "not subscribed"));
        }
        self.release_topic(topic).await;
        self.sync_state();
        ok()
    }

    pub(in crate::api) async fn release_topic(&self, topic: &str) {
        let node_topic = crate::content::group_topics::wire_of_app_topic(topic)
            .unwrap_or_else(|| topic.to_owned());
        let last = Command::Unsubscribe(node_topic);
        self.release(&self.svc.inner.topics, topic, last).await;
    }
}
