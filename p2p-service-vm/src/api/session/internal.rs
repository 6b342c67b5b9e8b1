//! What a session's background work reports back to the session loop, the
//! bytes of a content fetch on their way to the app, and the session's
//! publishes in progress. A leaf: the session, its streams, the content
//! operations and bulk attachments all speak it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use libp2p::PeerId;
use p2pvm_proto::pb;
use tokio::sync::oneshot;

use crate::api::ApiError;

/// Verified bytes of a content fetch, as the node produces them.
pub(crate) struct ContentBytes(
    pub(crate) std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>,
);

impl std::fmt::Debug for ContentBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentBytes")
    }
}

/// Work finished in the background, reported to the session loop.
#[derive(Debug)]
pub(crate) enum Internal {
    Opened {
        request_id: u64,
        stream_id: u64,
        result: Result<libp2p::Stream, ApiError>,
    },
    Inbound {
        protocol: String,
        peer: PeerId,
        stream: libp2p::Stream,
    },
    /// A content fetch found its item and is ready to stream.
    ContentOpened {
        request_id: u64,
        stream_id: u64,
        /// Deliver through a bulk attachment rather than stream frames.
        bulk: bool,
        result: Result<(pb::ContentStream, ContentBytes), ApiError>,
    },
    ReaderDone(u64),
    WriterDone(u64),
    /// A copy task failed: reset the whole stream.
    Failed(u64, pb::Error),
}

pub(in crate::api) type PublishResult = Result<pb::ContentInfo, ApiError>;

/// The session's publishes whose bytes arrive on a stream, by stream id.
#[derive(Default)]
pub(in crate::api) struct Publishes {
    /// Where each import's result arrives, until the app asks for it.
    results: HashMap<u64, oneshot::Receiver<PublishResult>>,
    /// Set when the app half-closed a publish stream: only then is its end the
    /// end of the item (a reset or a dead session must not import a truncation).
    ends: HashMap<u64, Arc<AtomicBool>>,
}

impl Publishes {
    /// Tracks a new publish on `stream_id`: where its import reports, and
    /// the flag that tells the import its end is genuine.
    pub(in crate::api) fn start(
        &mut self,
        stream_id: u64,
    ) -> (oneshot::Sender<PublishResult>, Arc<AtomicBool>) {
        let (tx, rx) = oneshot::channel();
        self.results.insert(stream_id, rx);
        let ended = Arc::new(AtomicBool::new(false));
        self.ends.insert(stream_id, ended.clone());
        (tx, ended)
    }

    /// Where the import of the publish on `stream_id` reports, once.
    pub(in crate::api) fn take_result(
        &mut self,
        stream_id: u64,
    ) -> Option<oneshot::Receiver<PublishResult>> {
        self.results.remove(&stream_id)
    }

    /// The app half-closed `stream_id`; a publish on it has all its bytes.
    pub(in crate::api) fn app_closed(&mut self, stream_id: u64) {
        if let Some(end) = self.ends.remove(&stream_id) {
            end.store(true, Ordering::Release);
        }
    }
}
