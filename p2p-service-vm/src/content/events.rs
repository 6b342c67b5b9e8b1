//! What the content engine tells every API session about: transfers
//! advancing, malware found, corrupt data dropped, and group messages opened.
//!
//! ```text
//!  fetch / publish / group_topics ─► ContentEvents (broadcast) ─► api::session (filter, translate)
//! ```
//!
//! The node's own events (peers, addresses, plain pubsub) are
//! [`crate::node::NodeEvent`]s; content events travel beside them on a
//! broadcast of their own, so the node layer knows nothing of content.

use libp2p::PeerId;
use p2pvm_content::ContentId;
use tokio::sync::broadcast;

use crate::node::PubsubMessage;

/// Events queued per session before the slowest one starts losing them
/// (it is told how many: `EventsLost`).
const QUEUE: usize = 4096;

/// A content-level event.
#[derive(Debug, Clone)]
pub enum ContentEvent {
    /// A transfer advanced (sent at most twice a second per transfer, and at the end).
    Progress {
        /// The item.
        id: ContentId,
        /// Verified bytes held.
        held_bytes: u64,
        /// Item size.
        size: u64,
        /// Providers being fetched from.
        providers: u32,
    },
    /// The virus filter found a signature; the content was discarded and the
    /// peers that sent it isolated.
    MalwareDetected {
        /// The item.
        id: ContentId,
        /// Signature name.
        signature: String,
        /// Peers that sent it.
        peers: Vec<PeerId>,
    },
    /// A provider sent data that failed verification; it was dropped.
    CorruptData {
        /// The provider.
        peer: PeerId,
        /// The item.
        id: ContentId,
        /// Block index.
        block: u64,
    },
    /// A group topic's message, opened (current member, current key), with
    /// its topic as apps name it (`group:<G>/<T>`).
    GroupMessage(PubsubMessage),
}

/// The content engine's event broadcast.
#[derive(Debug, Clone)]
pub(crate) struct ContentEvents(broadcast::Sender<ContentEvent>);

impl Default for ContentEvents {
    fn default() -> Self {
        Self(broadcast::channel(QUEUE).0)
    }
}

impl ContentEvents {
    /// Tells every subscriber; nobody listening is not an error.
    pub(crate) fn emit(&self, event: ContentEvent) {
        let _ = self.0.send(event);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ContentEvent> {
        self.0.subscribe()
    }
}
