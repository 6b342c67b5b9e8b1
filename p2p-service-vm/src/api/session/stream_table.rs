//! The session's table of bridged streams, whatever their source (a peer's
//! protocol stream, a content fetch or publish): stream ids and each
//! stream's state. `stream_frames.rs` drives it from the app's frames.

use std::collections::HashMap;

use crate::api::streams::StreamEntry;

/// Live streams by id, and the opens still under way.
pub(in crate::api) struct StreamTable {
    pub(super) entries: HashMap<u64, StreamEntry>,
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

    pub(super) fn in_use(&self) -> usize {
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
