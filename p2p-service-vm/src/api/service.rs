//! State shared by all sessions of one node.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use p2pvm_proto::pb;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::apps::{AppRegistry, AppsChange, AppsError};
use crate::compute::ComputeService;
use crate::config::ApiLimits;
use crate::content::ContentService;
use crate::context::NodeContext;

/// What the node knows about a live session, for admins and for revocation.
#[derive(Debug)]
pub(crate) struct SessionEntry {
    pub app: String,
    pub state: Arc<Mutex<pb::SessionState>>,
    pub kill: CancellationToken,
}

#[derive(Debug)]
pub(in crate::api) struct Inner {
    /// What the whole node shares (node handle, identity, ledger, tasks,
    /// shutdown).
    pub ctx: NodeContext,
    /// Content sharing.
    pub content: ContentService,
    /// Compute leasing.
    pub compute: ComputeService,
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
    pub bulk: Arc<super::tickets::Tickets>,
    pub next_session: AtomicU64,
    pub session_slots: Arc<Semaphore>,
}

/// The API service of one node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiService {
    pub(in crate::api) inner: Arc<Inner>,
}

impl ApiService {
    /// Creates the service over a running node and its services.
    pub fn new(
        ctx: NodeContext,
        content: ContentService,
        compute: ComputeService,
        apps: AppRegistry,
    ) -> Self {
        let limits = ctx.config.api.clone();
        let slots = Arc::new(Semaphore::new(limits.max_sessions as usize));
        Self {
            inner: Arc::new(Inner {
                ctx,
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
            }),
        }
    }

    /// What the node's services share.
    pub(crate) fn context(&self) -> &NodeContext {
        &self.inner.ctx
    }

    /// The node's figures.
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.ctx.metrics
    }

    /// The node's content service.
    pub(crate) fn content(&self) -> &ContentService {
        &self.inner.content
    }

    /// The node's compute service.
    pub(crate) fn compute(&self) -> &ComputeService {
        &self.inner.compute
    }

    /// Starts a task the API supervises: it ends with the shutdown token
    /// like every task here, and shutdown waits for it (the node context's tasks).
    #[track_caller]
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.ctx.tasks.spawn(task)
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
