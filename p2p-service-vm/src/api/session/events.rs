//! Node and content events as the app sees them: messages of the topics it
//! subscribed to (plain and group topics), and, once it asked with
//! `WatchEvents`, the node's peer and address events and the content engine's
//! transfer, malware and corrupt-data events. Everything else is filtered out
//! here.
//!
//! ```text
//!  NodeHandle event broadcast ──────┐
//!  ContentService event broadcast ──┴─► app_event (filter, translate) ─► Event frame ─► app
//! ```

use p2pvm_proto::pb;
use pb::event::Kind as E;
use pb::frame::Kind;
use tokio::sync::broadcast;

use super::{Session, ok};
use crate::api::ApiError;
use crate::content::ContentEvent;
use crate::node::{NodeEvent, PubsubMessage};

impl Session {
    /// Starts delivering the node's own events to the app.
    pub(in crate::api) fn watch_events(&mut self) -> Result<pb::response::Result, ApiError> {
        self.watching = true;
        self.sync_state();
        ok()
    }

    pub(in crate::api) async fn on_node_event(
        &mut self,
        event: Result<NodeEvent, broadcast::error::RecvError>,
    ) {
        let kind = self.app_event(event);
        self.tell(kind).await;
    }

    pub(in crate::api) async fn on_content_event(
        &mut self,
        event: Result<ContentEvent, broadcast::error::RecvError>,
    ) {
        let kind = self.app_content_event(event);
        self.tell(kind).await;
    }

    async fn tell(&self, kind: Option<E>) {
        if let Some(kind) = kind {
            self.send(pb::Frame::of(Kind::Event(pb::Event { kind: Some(kind) })))
                .await;
        }
    }

    /// What the app is told of `event`, if it asked for it.
    fn app_event(&self, event: Result<NodeEvent, broadcast::error::RecvError>) -> Option<E> {
        let kind = match event {
            Ok(NodeEvent::Pubsub(m)) => return self.pubsub(m),
            Ok(NodeEvent::PeerConnected { peer_id, addr }) if self.watching => {
                E::PeerConnected(pb::PeerConnected {
                    peer_id: peer_id.to_string(),
                    addr: addr.to_string(),
                })
            }
            Ok(NodeEvent::PeerDisconnected { peer_id }) if self.watching => {
                E::PeerDisconnected(pb::PeerDisconnected {
                    peer_id: peer_id.to_string(),
                })
            }
            Ok(NodeEvent::NewListenAddr(a)) if self.watching => E::NewListenAddr(pb::ListenAddr {
                addr: a.to_string(),
            }),
            Err(e) => return self.lost(e),
            _ => return None,
        };
        Some(kind)
    }

    /// What the app is told of a content event, if it asked for it.
    fn app_content_event(
        &self,
        event: Result<ContentEvent, broadcast::error::RecvError>,
    ) -> Option<E> {
        let kind = match event {
            Ok(ContentEvent::GroupMessage(m)) => return self.pubsub(m),
            Ok(ContentEvent::Progress {
                id,
                held_bytes,
                size,
                providers,
            }) if self.watching => E::ContentProgress(pb::ContentProgress {
                content_id: id.to_string(),
                held_bytes,
                size,
                providers,
            }),
            Ok(ContentEvent::MalwareDetected {
                id,
                signature,
                peers,
            }) if self.watching => E::MalwareDetected(pb::MalwareDetected {
                content_id: id.to_string(),
                signature,
                peer_ids: peers.iter().map(|p| p.to_string()).collect(),
            }),
            Ok(ContentEvent::CorruptData { peer, id, block }) if self.watching => {
                E::CorruptData(pb::CorruptData {
                    peer_id: peer.to_string(),
                    content_id: id.to_string(),
                    block,
                })
            }
            Err(e) => return self.lost(e),
            _ => return None,
        };
        Some(kind)
    }

    /// A message of a topic the app subscribed to.
    fn pubsub(&self, m: PubsubMessage) -> Option<E> {
        self.topics.contains(&m.topic).then(|| {
            E::PubsubMessage(pb::PubsubMessage {
                topic: m.topic,
                data: m.data,
                source: m.source.map(|p| p.to_string()).unwrap_or_default(),
                via: m.via.to_string(),
                message_id: m.message_id.into(),
            })
        })
    }

    /// Events the app would have seen were lost: tell it, so it can
    /// resynchronise instead of trusting a gap-free stream.
    fn lost(&self, e: broadcast::error::RecvError) -> Option<E> {
        match e {
            broadcast::error::RecvError::Lagged(n) if self.watching || !self.topics.is_empty() => {
                Some(E::EventsLost(pb::EventsLost { count: n }))
            }
            _ => None,
        }
    }
}
