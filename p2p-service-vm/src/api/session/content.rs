//! Content over the session's streams: publishing from bytes the app writes on
//! a stream, and fetching verified bytes either as stream frames or, parked
//! under a ticket, through a bulk attachment ([`crate::api::bulk`]).
//!
//! ```text
//!  publish: app ─ StreamData ─► stream ─► pipe ─► EndChecked ─► ContentService::publish
//!           ContentPublishFinish ─► waits for the import's result ─► app
//!  fetch:   ContentService::fetch ─ Internal::ContentOpened ─┬─► stream ─► app
//!                                                            └─► bulk ticket
//! ```
//!
//! The path form of publish needs no session state and is in `ops`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use p2pvm_proto::pb;
use tokio::sync::oneshot;
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::{Internal, Session, response};
use crate::api::{ApiError, ops};

/// Buffer between an app's publish stream and the import.
const PUBLISH_PIPE_BYTES: usize = 256 * 1024;

/// Verified bytes of a content fetch, as the node produces them.
pub(crate) struct ContentBytes(
    pub(crate) std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>,
);

impl std::fmt::Debug for ContentBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentBytes")
    }
}

type PublishResult = Result<pb::ContentInfo, ApiError>;

/// The session's publishes whose bytes arrive on a stream, by stream id.
#[derive(Default)]
pub(super) struct Publishes {
    /// Where each import's result arrives, until the app asks for it.
    results: HashMap<u64, oneshot::Receiver<PublishResult>>,
    /// Set when the app half-closed a publish stream: only then is its end the
    /// end of the item (a reset or a dead session must not import a truncation).
    ends: HashMap<u64, Arc<AtomicBool>>,
}

impl Publishes {
    /// Tracks a new publish on `stream_id`: where its import reports, and
    /// the flag that tells the import its end is genuine.
    fn start(&mut self, stream_id: u64) -> (oneshot::Sender<PublishResult>, Arc<AtomicBool>) {
        let (tx, rx) = oneshot::channel();
        self.results.insert(stream_id, rx);
        let ended = Arc::new(AtomicBool::new(false));
        self.ends.insert(stream_id, ended.clone());
        (tx, ended)
    }

    /// The app half-closed `stream_id`; a publish on it has all its bytes.
    pub(super) fn app_closed(&mut self, stream_id: u64) {
        if let Some(end) = self.ends.remove(&stream_id) {
            end.store(true, Ordering::Release);
        }
    }
}

/// The bytes of a publish stream: its end is the item's end only when the app
/// half-closed the stream; otherwise (reset, session gone) reading fails and
/// the import is abandoned.
struct EndChecked<R> {
    inner: R,
    ended: Arc<AtomicBool>,
}

impl<R: std::io::Read> std::io::Read for EndChecked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.ended.load(Ordering::Acquire) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the publish stream was reset before it was closed",
            ));
        }
        Ok(n)
    }
}

impl Session {
    /// Starts a publish from a byte stream: the app writes the bytes on the
    /// returned stream; the import runs as they arrive.
    pub(super) async fn content_publish(
        &mut self,
        request_id: u64,
        r: pb::ContentPublishRequest,
    ) -> Result<(), ApiError> {
        let content = ops::content(&self.svc)?.clone();
        let meta = ops::publish_meta(&r)?;
        if !self.stream_slots_left() {
            return Err(self.stream_limit());
        }
        let (app_side, node_side) = tokio::io::duplex(PUBLISH_PIPE_BYTES);
        let (_, app_writes) = tokio::io::split(app_side);
        // Write-only for the app: the stream's node → app direction ends at once.
        let stream = tokio::io::join(tokio::io::empty(), app_writes).compat();
        let stream_id = self.streams.next_id();
        let opened = pb::StreamOpened { stream_id };
        self.reply(request_id, Ok(pb::response::Result::StreamOpened(opened)))
            .await;
        self.add_stream(stream_id, stream);
        let (tx, ended) = self.publishes.start(stream_id);
        self.svc.spawn(async move {
            let reader = EndChecked {
                inner: tokio_util::io::SyncIoBridge::new(node_side),
                ended,
            };
            let r = content
                .publish(reader, meta)
                .await
                .map(|i| ops::content_info(&content, i))
                .map_err(ApiError::from);
            let _ = tx.send(r);
        });
        Ok(())
    }

    /// Answers `request_id` with the result of the publish on `stream_id` once
    /// its import ends, without holding up the session meanwhile.
    pub(super) fn content_publish_finish(
        &mut self,
        request_id: u64,
        stream_id: u64,
    ) -> Result<(), ApiError> {
        let Some(rx) = self.publishes.results.remove(&stream_id) else {
            return Err(ApiError::new(
                pb::ErrorCode::NotFound,
                "no publish on that stream in this session",
            ));
        };
        let out = self.out.clone();
        self.svc.spawn(async move {
            let r = match rx.await {
                Ok(r) => r.map(pb::response::Result::Content),
                Err(_) => Err(ApiError::new(
                    pb::ErrorCode::Unavailable,
                    "the publish was aborted",
                )),
            };
            let _ = out.send(response(request_id, r)).await;
        });
        Ok(())
    }

    /// Starts streaming verified bytes; answered with `ContentStream` once the
    /// item is found.
    pub(super) fn content_fetch(
        &mut self,
        request_id: u64,
        r: pb::ContentFetchRequest,
    ) -> Result<(), ApiError> {
        let content = ops::content(&self.svc)?.clone();
        let id = ops::parse_content_id(&r.content_id)?;
        if !self.stream_slots_left() {
            return Err(self.stream_limit());
        }
        let range = if r.offset == 0 && r.length == 0 {
            None
        } else {
            Some((r.offset, r.length))
        };
        let stream_id = self.streams.begin_open();
        let tx = self.internal_tx.clone();
        let bulk = r.bulk;
        self.svc.spawn(async move {
            let result = open_fetch(&content, &id, range, !r.no_keep, stream_id).await;
            let _ = tx
                .send(Internal::ContentOpened {
                    request_id,
                    stream_id,
                    bulk,
                    result,
                })
                .await;
        });
        Ok(())
    }

    /// A fetch found its item (or failed to): answer, and start the bytes.
    pub(super) async fn on_content_opened(
        &mut self,
        request_id: u64,
        stream_id: u64,
        bulk: bool,
        result: Result<(pb::ContentStream, ContentBytes), ApiError>,
    ) {
        self.streams.open_done();
        if bulk {
            let parked = result.and_then(|(opened, bytes)| self.park(opened, bytes));
            self.reply(request_id, parked).await;
            return;
        }
        match result {
            Ok((opened, bytes)) => {
                // Answer first: the bytes start flowing as soon as the
                // copy task runs, and must not overtake the answer.
                self.reply(request_id, Ok(pb::response::Result::ContentStream(opened)))
                    .await;
                let reader = tokio_util::io::StreamReader::new(bytes.0);
                let stream = tokio::io::join(reader, tokio::io::sink()).compat();
                self.add_stream(stream_id, stream);
                // The app sends nothing on a fetch stream; end that direction now.
                self.streams.half_close(stream_id);
            }
            Err(e) => self.reply(request_id, Err(e)).await,
        }
    }

    /// Parks a fetch's bytes for a bulk attachment; the answer carries the
    /// ticket instead of a stream id.
    fn park(
        &self,
        mut opened: pb::ContentStream,
        bytes: ContentBytes,
    ) -> Result<pb::response::Result, ApiError> {
        let max = self.svc.inner.limits.max_streams_per_session as usize;
        let inner = &self.svc.inner;
        let ticket = inner
            .bulk
            .park(self.id, bytes, max, (&inner.tasks, &inner.shutdown))?;
        opened.stream_id = 0;
        opened.bulk_ticket = bytes::Bytes::copy_from_slice(&ticket);
        Ok(pb::response::Result::ContentStream(opened))
    }
}

/// Finds item `id` and opens its bytes over `range` (offset, length; a zero
/// length runs to the item's end, which needs its size first).
async fn open_fetch(
    content: &crate::content::ContentService,
    id: &p2pvm_content::ContentId,
    range: Option<(u64, u64)>,
    keep: bool,
    stream_id: u64,
) -> Result<(pb::ContentStream, ContentBytes), ApiError> {
    let range = match range {
        None => None,
        Some((offset, 0)) => {
            let info = content.stat(id).await?;
            Some(offset..info.manifest.manifest.size)
        }
        Some((offset, len)) => Some(offset..offset.saturating_add(len)),
    };
    let (info, range, bytes) = content.fetch(id, range, keep).await?;
    let opened = pb::ContentStream {
        stream_id,
        info: Some(ops::content_info(content, info)),
        offset: range.start,
        length: range.end - range.start,
        bulk_ticket: bytes::Bytes::new(),
    };
    Ok((opened, ContentBytes(Box::pin(bytes))))
}
