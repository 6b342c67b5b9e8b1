//! The session's bridged streams, whatever their source (a peer's protocol
//! stream, a content fetch or publish): stream ids, the per-session stream
//! limit, and the glue between the app's `StreamData`/`StreamCredit`/
//! `StreamClose` frames and the copy tasks of [`crate::api::streams`].
//!
//! ```text
//!  app frames ─► on_stream_* ─► StreamEntry ─► copy tasks ─► peer / content
//!  copy tasks ─► Internal::{ReaderDone, WriterDone, Failed} ─► on_copy_done,
//!                                                              on_stream_failed
//! ```

use std::collections::HashMap;

use p2pvm_proto::pb;
use pb::frame::Kind;

use super::{Session, violation};
use crate::api::ApiError;
use crate::api::streams::StreamEntry;

/// Live streams by id, and the opens still under way.
pub(in crate::api) struct StreamTable {
    entries: HashMap<u64, StreamEntry>,
    /// Opens still looking for their stream (a peer dial, a content lookup):
    /// each already holds one of the session's stream slots.
    pending_opens: usize,
    next_id: u64,
}

impl StreamTable {
    pub(in crate::api) fn new() -> Self {
        Self {
            entries: HashMap::new(),
            pending_opens: 0,
            next_id: 1,
        }
    }

    /// A fresh stream id. Ids are never reused within a session, so a late
    /// frame for an ended stream cannot reach a new one.
    pub(in crate::api) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A stream id for an open that finishes in the background; its slot is
    /// held until [`StreamTable::open_done`].
    pub(in crate::api) fn begin_open(&mut self) -> u64 {
        let id = self.next_id();
        self.pending_opens += 1;
        id
    }

    pub(in crate::api) fn open_done(&mut self) {
        self.pending_opens -= 1;
    }

    fn in_use(&self) -> usize {
        self.entries.len() + self.pending_opens
    }

    /// Live stream ids, sorted, for the session report.
    pub(in crate::api) fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Ends the app → node direction of `id`, if it is still live.
    pub(in crate::api) fn half_close(&mut self, id: u64) {
        if let Some(s) = self.entries.get_mut(&id) {
            s.half_close();
        }
    }

    /// Resets every stream (the session ended); what opened each.
    pub(in crate::api) fn reset_all(&mut self) -> Vec<&'static str> {
        self.entries
            .drain()
            .map(|(_, s)| {
                let kind = s.kind;
                s.reset();
                kind
            })
            .collect()
    }
}

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
