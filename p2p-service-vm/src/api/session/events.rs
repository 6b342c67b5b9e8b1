//! Node events as the app sees them: messages of the topics it subscribed to,
//! and, once it asked with `WatchEvents`, the node's peer, address and content
//! events. Everything else is filtered out here.
//!
//! ```text
//!  NodeHandle event broadcast ─► app_event (filter, translate) ─► Event frame ─► app
//! ```

use p2pvm_proto::pb;
use pb::event::Kind as E;
use pb::frame::Kind;
use tokio::sync::broadcast;

use super::{Session, ok};
use crate::api::ApiError;
use crate::node::NodeEvent;

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
        let Some(kind) = self.app_event(event) else {
            return;
        };
        self.send(pb::Frame::of(Kind::Event(pb::Event { kind: Some(kind) })))
            .await;
    }

    /// What the app is told of `event`, if it asked for it.
    fn app_event(&self, event: Result<NodeEvent, broadcast::error::RecvError>) -> Option<E> {
        let kind = match event {
            Ok(NodeEvent::Pubsub(m)) if self.topics.contains(&m.topic) => {
                E::PubsubMessage(pb::PubsubMessage {
                    topic: m.topic,
                    data: m.data,
                    source: m.source.map(|p| p.to_string()).unwrap_or_default(),
                    via: m.via.to_string(),
                    message_id: m.message_id.into(),
                })
            }
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
            Ok(NodeEvent::ContentProgress {
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
            Ok(NodeEvent::MalwareDetected {
                id,
                signature,
                peers,
            }) if self.watching => E::MalwareDetected(pb::MalwareDetected {
                content_id: id.to_string(),
                signature,
                peer_ids: peers.iter().map(|p| p.to_string()).collect(),
            }),
            Ok(NodeEvent::CorruptData { peer, id, block }) if self.watching => {
                E::CorruptData(pb::CorruptData {
                    peer_id: peer.to_string(),
                    content_id: id.to_string(),
                    block,
                })
            }
            // Events the app would have seen were lost: tell it, so it can
            // resynchronise instead of trusting a gap-free stream.
            Err(broadcast::error::RecvError::Lagged(n))
                if self.watching || !self.topics.is_empty() =>
            {
                E::EventsLost(pb::EventsLost { count: n })
            }
            _ => return None,
        };
        Some(kind)
    }
}
