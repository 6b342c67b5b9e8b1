//! The node-wide memory budget for blocks: every block requested from a peer
//! holds a [`Lease`] from the moment it is asked for until it is on disk, or
//! — for a download that keeps nothing — until every reader has passed it.
//! So requests in flight plus blocks waiting in memory never exceed
//! `content.memory_budget_bytes`, however many downloads and readers there are.
//!
//! Fair sharing: each download is a [`Borrower`]. While nobody waits, a
//! borrower may use any free block (a lone download runs at full speed);
//! once one waits, a borrower holding its share (the budget over the number
//! of borrowers) or more gets nothing more until it is back under it, and a
//! streaming download shrinks its readers' memory windows to its share (see
//! [`Borrower::share`]), so what it holds drains to the others.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct State {
    used: u64,
    peak: u64,
    held: HashMap<u64, u64>,
    /// Borrowers dropped while leases of theirs were still out.
    gone: HashSet<u64>,
    waiting: HashSet<u64>,
    next: u64,
}

impl State {
    fn share(&self, total: u64) -> u64 {
        let live = self.held.len() - self.gone.len();
        (total / live.max(1) as u64).max(1)
    }
}

/// The budget, in blocks.
#[derive(Debug)]
pub(crate) struct Budget {
    total: u64,
    state: Mutex<State>,
    freed: Notify,
}

impl Budget {
    /// A budget of `total` blocks (at least one).
    pub(crate) fn new(total: u64) -> Arc<Self> {
        Arc::new(Self {
            total: total.max(1),
            state: Mutex::default(),
            freed: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks in use now, and the most ever in use.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let s = self.state();
        (s.used, s.peak)
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// A new borrower (one download).
    pub(crate) fn borrower(self: &Arc<Self>) -> Borrower {
        let mut s = self.state();
        let id = s.next;
        s.next += 1;
        s.held.insert(id, 0);
        Borrower {
            budget: self.clone(),
            id,
        }
    }
}

/// One download's access to the budget. Dropping it removes it from the
/// count the shares are computed over (its leases stay valid until dropped).
#[derive(Debug)]
pub(crate) struct Borrower {
    budget: Arc<Budget>,
    id: u64,
}

impl Borrower {
    /// A block of budget if the rules allow it now.
    pub(crate) fn try_take(&self) -> Option<Lease> {
        let b = &self.budget;
        let mut s = b.state();
        let share = s.share(b.total);
        let mine = s.held.get(&self.id).copied().unwrap_or(0);
        let others_wait = s.waiting.iter().any(|w| *w != self.id);
        if s.used >= b.total || (others_wait && mine >= share) {
            return None;
        }
        s.used += 1;
        s.peak = s.peak.max(s.used);
        *s.held.entry(self.id).or_default() += 1;
        s.waiting.remove(&self.id);
        Some(Lease {
            budget: b.clone(),
            owner: self.id,
        })
    }

    /// A block of budget, waiting for one; `None` if `cancel` fires first.
    pub(crate) async fn take(&self, cancel: &CancellationToken) -> Option<Lease> {
        loop {
            let freed = self.budget.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release in between wakes us.
            freed.as_mut().enable();
            if let Some(l) = self.try_take() {
                return Some(l);
            }
            self.budget.state().waiting.insert(self.id);
            tokio::select! {
                _ = freed => {}
                _ = cancel.cancelled() => {
                    self.budget.state().waiting.remove(&self.id);
                    return None;
                }
            }
        }
    }

    /// This borrower's fair share of the budget, in blocks.
    pub(crate) fn share(&self) -> u64 {
        self.budget.state().share(self.budget.total)
    }
}

impl Drop for Borrower {
    fn drop(&mut self) {
        let mut s = self.budget.state();
        s.waiting.remove(&self.id);
        // Its outstanding leases still count in `used` until they drop.
        if s.held.get(&self.id) == Some(&0) {
            s.held.remove(&self.id);
        } else {
            s.gone.insert(self.id);
        }
        drop(s);
        self.budget.freed.notify_waiters();
    }
}

/// One block of budget; returned when dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    budget: Arc<Budget>,
    owner: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut s = self.budget.state();
        s.used -= 1;
        if let Some(n) = s.held.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 && s.gone.remove(&self.owner) {
                s.held.remove(&self.owner);
            }
        }
        drop(s);
        self.budget.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_borrower_may_use_it_all_and_never_more() {
        let b = Budget::new(8);
        let a = b.borrower();
        let leases: Vec<Lease> = (0..8).map(|_| a.try_take().expect("free")).collect();
        assert!(a.try_take().is_none());
        assert_eq!(b.usage(), (8, 8));
        drop(leases);
        assert_eq!(b.usage(), (0, 8));
    }

    #[tokio::test]
    async fn a_waiting_borrower_gets_its_share_back() {
        let b = Budget::new(8);
        let greedy = b.borrower();
        let mut held: Vec<Lease> = (0..8).map(|_| greedy.try_take().unwrap()).collect();
        let late = Arc::new(b.borrower());
        let cancel = CancellationToken::new();
        let waiter = {
            let (late, cancel) = (late.clone(), cancel.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..4 {
                    got.push(late.take(&cancel).await.expect("not cancelled"));
                }
                got
            })
        };
        tokio::task::yield_now().await;
        // While the late one waits, the greedy one is over its share (4 of 8):
        // what it frees goes to the waiter, not back to itself.
        for _ in 0..4 {
            held.pop();
            assert!(
                greedy.try_take().is_none(),
                "took back what the waiter needs"
            );
            tokio::task::yield_now().await;
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter got its share")
            .unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(b.usage().0, 8);
        assert!(greedy.try_take().is_none(), "over its share while full");
        assert_eq!(late.share(), 4);
    }

    #[tokio::test]
    async fn waiting_ends_on_cancel_and_counts_stay_exact() {
        let b = Budget::new(1);
        let a = b.borrower();
        let l = a.try_take().unwrap();
        let c = b.borrower();
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(c.take(&cancel).await.is_none());
        drop(a);
        // Gone, but its lease still counts until returned.
        assert!(c.try_take().is_none());
        drop(l);
        let again = c.try_take().expect("free again");
        assert_eq!(b.usage().0, 1);
        assert_eq!(c.share(), 1);
        drop(again);
        assert_eq!(b.usage().0, 0);
    }
}
