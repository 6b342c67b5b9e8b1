//! The glue between the app's `StreamData`/`StreamCredit`/`StreamClose`
//! frames, the session's [`StreamTable`] and the copy tasks of
//! [`crate::api::streams`]; the per-session stream limit.
//!
//! ```text
//!  app frames ─► on_stream_* ─► StreamEntry ─► copy tasks ─► peer / content
//!  copy tasks ─► Internal::{ReaderDone, WriterDone, Failed} ─► on_copy_done,
//!                                                              on_stream_failed
//! ```

use p2pvm_proto::pb;
use pb::frame::Kind;

use super::{Session, violation};
use crate::api::ApiError;
use crate::api::streams::StreamEntry;

impl Session {
    pub(in crate::api) fn stream_slots_left(&self) -> bool {
        self.streams.in_use() < self.svc.inner.limits.max_streams_per_session as usize
    }

    pub(in crate::api) fn stream_limit(&self) -> ApiError {
        ApiError::new(
            pb::ErrorCode::LimitExceeded,
            format!(
                "at most {} streams per session",
                self.svc.inner.limits.max_streams_per_session
            ),
        )
    }

    /// Starts bridging `stream` as `stream_id`, opened by the operation
    /// `kind`. Callers announce the id to the app first: the copy tasks
    /// start at once and their frames must not overtake the announcement.
    pub(in crate::api) fn add_stream<S>(&mut self, stream_id: u64, stream: S, kind: &'static str)
    where
        S: futures::AsyncRead + futures::AsyncWrite + Send + 'static,
    {
        let mut entry = StreamEntry::spawn(
            &self.svc.inner.ctx.tasks,
            stream_id,
            stream,
            self.svc.inner.limits.stream_window_bytes,
            self.out.clone(),
            self.internal_tx.clone(),
        );
        entry.kind = kind;
        self.streams.entries.insert(stream_id, entry);
        self.sync_state();
    }

    /// Counts how a stream ended: `ok` (both directions closed cleanly),
    /// `reset` (by the app), `session_ended`, or the error code it failed with.
    pub(in crate::api) fn stream_ended(&self, kind: &'static str, result: &'static str) {
        self.svc.inner.ctx.metrics.api_stream_ended(kind, result);
    }

    pub(in crate::api) fn on_stream_data(&mut self, d: pb::StreamData) -> Result<(), ApiError> {
        let window = self.svc.inner.limits.stream_window_bytes;
        // Data for a stream that just ended crosses the close in flight: drop it.
        if let Some(s) = self.streams.entries.get_mut(&d.stream_id) {
            s.data_from_app(d.data, window)
                .map_err(|v| violation(v.message(d.stream_id)))?;
        }
        Ok(())
    }

    pub(in crate::api) fn on_stream_credit(&mut self, c: pb::StreamCredit) -> Result<(), ApiError> {
        let window = self.svc.inner.limits.stream_window_bytes;
        if let Some(s) = self.streams.entries.get(&c.stream_id) {
            s.credit_from_app(c.bytes, window)
                .map_err(|v| violation(v.message(c.stream_id)))?;
        }
        Ok(())
    }

    pub(in crate::api) fn on_stream_close(&mut self, c: pb::StreamClose) {
        if c.reset {
            if let Some(s) = self.streams.entries.remove(&c.stream_id) {
                let kind = s.kind;
                s.reset();
                self.stream_ended(kind, "reset");
                self.sync_state();
            }
        } else if let Some(s) = self.streams.entries.get_mut(&c.stream_id) {
            // Before the half-close reaches the import: it must see a clean end.
            self.publishes.app_closed(c.stream_id);
            s.half_close();
        }
    }

    /// A copy task failed: the whole stream is reset, and the app told why.
    pub(in crate::api) async fn on_stream_failed(&mut self, id: u64, error: pb::Error) {
        if let Some(s) = self.streams.entries.remove(&id) {
            let kind = s.kind;
            s.reset();
            self.stream_ended(kind, error.code().as_str_name());
            self.sync_state();
            let close = pb::StreamClose {
                stream_id: id,
                reset: true,
                error: Some(error),
            };
            self.send(pb::Frame::of(Kind::StreamClose(close))).await;
        }
    }

    /// One direction of a stream ended cleanly; the stream goes when both have.
    pub(in crate::api) fn on_copy_done(&mut self, id: u64, reader: bool) {
        if let Some(s) = self.streams.entries.get_mut(&id) {
            if reader {
                s.reader_done = true;
            } else {
                s.writer_done = true;
            }
            if s.finished() {
                let kind = s.kind;
                self.streams.entries.remove(&id);
                self.stream_ended(kind, "ok");
                self.sync_state();
            }
        }
    }
}
