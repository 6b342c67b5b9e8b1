//! Pubsub topics: subscribing (a stream of [`Message`]s that survives
//! reconnection), leaving, publishing, and who else is subscribed.

use bytes::Bytes;
use futures::Stream;
use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::conn::Message;
use crate::error::Result;

impl Client {
    /// Subscribes to a pubsub topic; the stream yields its messages.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// use futures::StreamExt;
    /// let mut msgs = c.subscribe("chat").await?;
    /// while let Some(m) = msgs.next().await {
    ///     println!("{}: {}", m.source, String::from_utf8_lossy(&m.data));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(
        &self,
        topic: &str,
    ) -> Result<impl Stream<Item = Message> + Unpin + std::fmt::Debug + use<>> {
        let op = Op::Subscribe(pb::SubscribeRequest {
            topic: topic.into(),
        });
        self.register(|r| &mut r.topics, topic, op).await
    }

    /// Leaves a topic; its message stream ends.
    pub async fn unsubscribe(&self, topic: &str) -> Result<()> {
        self.inner.regs.lock().expect("lock").topics.remove(topic);
        self.ok(Op::Unsubscribe(pb::UnsubscribeRequest {
            topic: topic.into(),
        }))
        .await
    }

    /// Publishes a message on a topic.
    pub async fn publish(&self, topic: &str, data: impl Into<Bytes>) -> Result<()> {
        self.ok(Op::Publish(pb::PublishRequest {
            topic: topic.into(),
            data: data.into(),
        }))
        .await
    }

    /// Peers known to be subscribed to a topic.
    pub async fn topic_peers(&self, topic: &str) -> Result<Vec<String>> {
        let op = Op::TopicPeers(pb::TopicPeersRequest {
            topic: topic.into(),
        });
        Ok(self.call(op, reply!(TopicPeers)).await?.peer_ids)
    }
}
