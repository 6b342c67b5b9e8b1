//! Bulk tickets: a content fetch asked for with `bulk` waits here, under a
//! one-time ticket, for the app to attach (`bulk`); how many attached
//! streams each session has running counts against its stream limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2pvm_bulk::attach::Ticket;
use p2pvm_proto::pb;
use rand::RngCore;
use tracing::debug;

use super::ApiError;
use super::session::internal::ContentBytes;

/// How long a ticket waits for its attachment.
const TICKET_TTL: Duration = Duration::from_secs(30);

/// Fetches waiting for their attachment, by ticket, and how many attached
/// streams each session has running: together at most its stream limit.
#[derive(Default)]
pub(crate) struct Tickets {
    parked: Mutex<HashMap<Ticket, Parked>>,
    live: Arc<Mutex<HashMap<u64, usize>>>,
}

/// An attached stream, counted against its session until it ends.
pub(super) struct Live {
    session: u64,
    live: Arc<Mutex<HashMap<u64, usize>>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut live = self.live.lock().expect("lock");
        if let Some(n) = live.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.session);
            }
        }
    }
}

struct Parked {
    session: u64,
    bytes: ContentBytes,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.parked.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Tickets").field("parked", &n).finish()
    }
}

impl Tickets {
    /// Parks a fetch of `session` and returns its ticket. A session may hold
    /// at most `max` unattached tickets; each expires after a while.
    pub fn park(
        self: &Arc<Self>,
        session: u64,
        bytes: ContentBytes,
        max: usize,
        (tasks, shutdown): (&crate::tasks::Tasks, &tokio_util::sync::CancellationToken),
    ) -> Result<Ticket, ApiError> {
        let mut parked = self.parked.lock().expect("lock");
        let running = self.live.lock().expect("lock").get(&session).copied();
        if parked.values().filter(|p| p.session == session).count() + running.unwrap_or(0) >= max {
            return Err(ApiError::new(
                pb::ErrorCode::LimitExceeded,
                format!("at most {max} bulk fetches per session, waiting or running"),
            ));
        }
        let mut ticket = Ticket::default();
        rand::rngs::OsRng.fill_bytes(&mut ticket);
        parked.insert(ticket, Parked { session, bytes });
        let tickets = Arc::downgrade(self);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(TICKET_TTL) => {}
                // At shutdown the tickets go with the service.
                _ = shutdown.cancelled() => return,
            }
            if let Some(t) = tickets.upgrade()
                && t.parked.lock().expect("lock").remove(&ticket).is_some()
            {
                debug!(session, "a bulk ticket expired unattached");
            }
        });
        Ok(ticket)
    }

    pub(super) fn take(&self, ticket: &Ticket) -> Option<(ContentBytes, Live)> {
        let p = self.parked.lock().expect("lock").remove(ticket)?;
        *self
            .live
            .lock()
            .expect("lock")
            .entry(p.session)
            .or_insert(0) += 1;
        let live = Live {
            session: p.session,
            live: self.live.clone(),
        };
        Some((p.bytes, live))
    }

    /// Drops what a session that ended left unattached.
    pub fn forget_session(&self, session: u64) {
        self.parked
            .lock()
            .expect("lock")
            .retain(|_, p| p.session != session);
    }
}
