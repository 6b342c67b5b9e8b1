//! Supervised tasks: every task the API and the content service start goes
//! through a [`Tasks`], so shutdown can wait for all of them and, if some do
//! not end, say where each was started.

use std::collections::BTreeMap;
use std::panic::Location;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

/// A set of tasks, waited for at shutdown.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    /// Live tasks by the source line that started them.
    live: Arc<Mutex<BTreeMap<&'static Location<'static>, usize>>>,
}

/// Counts a task as live until it ends (or is aborted: the future is dropped).
struct Live {
    live: Arc<Mutex<BTreeMap<&'static Location<'static>, usize>>>,
    at: &'static Location<'static>,
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = live.get_mut(self.at) {
            *n -= 1;
            if *n == 0 {
                live.remove(self.at);
            }
        }
    }
}

impl Tasks {
    /// Starts `task` under supervision.
    #[track_caller]
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let live = self.live_at(Location::caller());
        self.tracker.spawn(async move {
            let _live = live;
            task.await
        })
    }

    /// Runs blocking `work` on a thread of the blocking pool, under supervision.
    #[track_caller]
    pub fn spawn_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let live = self.live_at(Location::caller());
        self.tracker.spawn_blocking(move || {
            let _live = live;
            work()
        })
    }

    fn live_at(&self, at: &'static Location<'static>) -> Live {
        *self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(at)
            .or_default() += 1;
        Live {
            live: self.live.clone(),
            at,
        }
    }

    /// Accepts no more tasks and waits until every one has ended, or `limit`
    /// passes; true if all ended.
    pub async fn stopped(&self, limit: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Where the running tasks were started, with how many of each.
    pub fn running_by_origin(&self) -> Vec<(String, usize)> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(at, n)| (format!("{}:{}", at.file(), at.line()), *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_does_not_end_is_reported_by_where_it_started() {
        let tasks = Tasks::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tasks.spawn(async move { s.cancelled().await });
        let stuck = tasks.spawn(std::future::pending::<()>());
        stop.cancel();
        assert!(!tasks.stopped(Duration::from_millis(100)).await);
        let left = tasks.running_by_origin();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].0.contains("tasks.rs"), "{left:?}");
        stuck.abort();
        assert!(tasks.stopped(Duration::from_secs(5)).await);
        assert_eq!(tasks.running(), 0);
        assert!(tasks.running_by_origin().is_empty());
    }
}
