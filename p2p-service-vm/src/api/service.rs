//! State shared by all sessions of one node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use p2pvm_proto::{FrameCodec, pb};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::apps::{AppRegistry, AppsChange, AppsError};
use crate::config::ApiLimits;
use crate::content::ContentService;
use crate::node::NodeHandle;

/// What the node knows about a live session, for admins and for revocation.
#[derive(Debug)]
pub(crate) struct SessionEntry {
    pub app: String,
    pub state: Arc<Mutex<pb::SessionState>>,
    pub kill: CancellationToken,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub node: NodeHandle,
    /// Content sharing; `None` only in tests that run without a store.
    pub content: Option<ContentService>,
    /// Compute leasing; `None` only in tests that run without it.
    pub compute: Option<crate::compute::ComputeService>,
    /// Held only for in-memory reads and updates: every handshake takes it.
    pub apps: Mutex<AppRegistry>,
    /// Serialises changes to the credentials, across their file write.
    pub apps_writes: tokio::sync::Mutex<()>,
    pub limits: ApiLimits,
    pub sessions: Mutex<HashMap<u64, SessionEntry>>,
    /// Protocol name → owning session.
    pub protocols: Mutex<HashMap<String, u64>>,
    /// Topic → number of sessions subscribed; the node joins at 1 and leaves at 0.
    pub topics: tokio::sync::Mutex<HashMap<String, usize>>,
    /// Service name → number of sessions advertising it.
    pub services: tokio::sync::Mutex<HashMap<String, usize>>,
    /// Bulk fetches waiting for their attachment.
    pub bulk: Arc<super::bulk::Tickets>,
    next_session: AtomicU64,
    session_slots: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    /// Every task of the API (sessions, their streams, bulk transfers):
    /// waited for at shutdown.
    pub tasks: crate::tasks::Tasks,
}

/// The API service of one node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiService {
    pub(crate) inner: Arc<Inner>,
}

impl ApiService {
    /// Creates the service over a running node.
    pub fn new(
        node: NodeHandle,
        content: Option<ContentService>,
        compute: Option<crate::compute::ComputeService>,
        apps: AppRegistry,
        limits: ApiLimits,
        shutdown: CancellationToken,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(limits.max_sessions as usize));
        Self {
            inner: Arc::new(Inner {
                node,
                content,
                compute,
                apps: Mutex::new(apps),
                apps_writes: tokio::sync::Mutex::new(()),
                limits,
                sessions: Mutex::new(HashMap::new()),
                protocols: Mutex::new(HashMap::new()),
                topics: tokio::sync::Mutex::new(HashMap::new()),
                services: tokio::sync::Mutex::new(HashMap::new()),
                bulk: Arc::default(),
                next_session: AtomicU64::new(1),
                session_slots: slots,
                shutdown,
                tasks: crate::tasks::Tasks::default(),
            }),
        }
    }

    /// Serves one session over any byte stream until either side ends it.
    ///
    /// This is the single entry point for every transport: the Unix socket
    /// listener calls it per connection, and the channel back-end will call it
    /// per multiplexed session.
    pub async fn serve<IO>(&self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let framed =
            tokio_util::codec::Framed::new(io, FrameCodec::new(self.inner.limits.max_frame_bytes));
        let Ok(permit) = self.inner.session_slots.clone().try_acquire_owned() else {
            warn!("session refused: max_sessions reached");
            super::session::refuse(
                framed,
                pb::Error::new(
                    pb::ErrorCode::LimitExceeded,
                    format!(
                        "the node serves at most {} sessions",
                        self.inner.limits.max_sessions
                    ),
                ),
            )
            .await;
            return;
        };
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        super::session::run(self.clone(), id, framed).await;
        drop(permit);
    }

    /// Starts a task the API supervises: it ends with the shutdown token
    /// like every task here, and [`ApiService::stopped`] waits for it.
    #[track_caller]
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tasks.spawn(task)
    }

    /// Waits until every API task has ended (after the shutdown token was
    /// cancelled), or `limit` passes; true if all ended.
    pub async fn stopped(&self, limit: std::time::Duration) -> bool {
        self.inner.tasks.stopped(limit).await
    }

    /// API tasks still running.
    pub fn tasks_running(&self) -> usize {
        self.inner.tasks.running()
    }

    /// Changes the app credentials: `plan` computes the change from the
    /// current ones, its file is written on a blocking thread with no lock
    /// held that a handshake needs, then it becomes current.
    pub(crate) async fn change_apps<T>(
        &self,
        plan: impl FnOnce(&AppRegistry) -> Result<(T, AppsChange), AppsError>,
    ) -> Result<T, AppsError> {
        let _one_at_a_time = self.inner.apps_writes.lock().await;
        let (out, change) = plan(&self.inner.apps.lock().expect("lock"))?;
        let saving = change.clone();
        tokio::task::spawn_blocking(move || saving.save())
            .await
            .map_err(|e| AppsError::Io {
                path: "apps.toml".into(),
                source: std::io::Error::other(e),
            })??;
        self.inner.apps.lock().expect("lock").apply(change);
        Ok(out)
    }

    /// One of the node's session slots (bulk streams count as sessions).
    pub(crate) fn session_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.session_slots.clone().try_acquire_owned().ok()
    }

    /// Ends every session of `app` (after its token was revoked).
    pub(crate) fn kill_app_sessions(&self, app: &str) {
        for entry in self.inner.sessions.lock().expect("lock").values() {
            if entry.app == app {
                entry.kill.cancel();
            }
        }
    }
}
