//! One item being fetched, shared by all its readers (app streams, the
//! gateway, a bulk download) and all its provider workers.
//!
//! Everything that changes while it runs sits in one [`State`] behind one
//! lock: the schedule, the blocks waiting in memory, the [`Phase`], the peers
//! that contributed. The watch channels are how the others learn of changes
//! without polling.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use libp2p::PeerId;
use p2pvm_content::{BLOCK_BYTES, ContentError, ContentId, Partial};
use p2pvm_security::Verdict;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::sched::{Sched, Slot};
use crate::content::budget::{Borrower, Lease};
use crate::content::{ContentServiceError, VerifiedManifest};
use crate::report::chain;
use crate::tasks::Tasks;

/// How a transfer ended, as readers see it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Running,
    Complete,
    Failed(ContentServiceError),
}

/// Where a download is in its life.
#[derive(Debug)]
pub(super) enum Phase {
    /// Fetching for readers only: verified blocks wait in memory until read
    /// and are dropped once every reader has passed them.
    Streaming,
    /// Fetching the whole item into its partial file, to be scanned, stored
    /// and provided to others.
    Keeping,
    /// Ended for everyone by a local failure or malware; the driver reports
    /// it as the outcome.
    Failed(ContentServiceError),
}

#[derive(Debug)]
pub(super) struct State {
    pub sched: Sched,
    pub phase: Phase,
    /// Verified blocks of a streaming download, by block number, each with
    /// its share of the memory budget. Written to the file if the download
    /// is asked to keep the item after all.
    pub ram: BTreeMap<u64, (Bytes, Lease)>,
    /// Providers found before the download started, for the driver.
    pub hints: Vec<PeerId>,
    /// Peers that delivered verified blocks (isolated together if it is malware).
    pub contributors: HashSet<PeerId>,
    /// What the workers did, for the log line that ends the download.
    pub tally: Tally,
}

/// Where a download's blocks came from and what its worker slots were spent
/// on: the line that ends a download says it, so a slow swarm shows whether
/// it waited on its seeds, on upload slots or on its own churn.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Workers started, one per provider connection attempt.
    pub workers: u32,
    /// Blocks first delivered by a provider that held the whole item.
    pub from_seeds: u32,
    /// Blocks first delivered by a provider still fetching it.
    pub from_peers: u32,
    /// Verified blocks that arrived after another copy (end game, stuck blocks).
    pub duplicates: u32,
    /// Blocks that arrived, verified or not, new or not.
    pub received: u32,
    /// Requests answered "wait for an upload slot".
    pub busy: u32,
    /// Blocks asked for and still unanswered when their worker ended.
    pub abandoned: u32,
    /// Workers ended, by the provider's error.
    pub ended: BTreeMap<&'static str, u32>,
}

impl State {
    /// `peer`'s verified block `k` is held; true when it is news.
    fn held(&mut self, peer: PeerId, k: u64) -> bool {
        let seed = self.sched.is_complete(&peer);
        let fresh = self.sched.hold(peer, k, Instant::now());
        tracing::trace!(%peer, block = k, seed, fresh, "block held");
        let t = &mut self.tally;
        *match (fresh, seed) {
            (false, _) => &mut t.duplicates,
            (true, true) => &mut t.from_seeds,
            (true, false) => &mut t.from_peers,
        } += 1;
        fresh
    }
}

/// The scan's verdict on a whole kept item, once known.
pub(super) type ScanVerdict = Option<Result<Verdict, ContentServiceError>>;

/// An item being fetched.
pub(crate) struct Download {
    pub id: ContentId,
    pub manifest: VerifiedManifest,
    /// The verified proof of the item's size this download started with:
    /// served to peers that find it, so a downloader can prove the size
    /// before it holds the last block.
    pub size_proof: Vec<u8>,
    pub partial: Arc<Partial>,
    state: Mutex<State>,
    /// Wakes idle workers and the driver.
    pub(super) changed: Notify,
    /// Bumped whenever a block lands; readers wait on it.
    pub(super) progress: watch::Sender<u64>,
    pub(super) outcome: watch::Sender<Outcome>,
    pub(super) verdict: watch::Sender<ScanVerdict>,
    pub(super) cancel: CancellationToken,
    /// This download's access to the node's block memory budget.
    pub(super) borrower: Borrower,
    /// Where verified blocks of a kept download go to be written: one thread
    /// per download, started when it first keeps something.
    writer: OnceLock<mpsc::Sender<WriteJob>>,
}

/// A verified block on its way to the partial file.
pub(super) struct WriteJob {
    pub peer: PeerId,
    pub k: u64,
    pub block: Bytes,
    pub lease: Lease,
    /// How long the provider took to answer (for its credit).
    pub secs: f64,
}

/// Peers waiting in [`State::hints`] at most.
const MAX_HINTS: usize = 64;

/// Adds `peer` to `hints` once, unless a worker fetches from it already
/// (`active`) or [`MAX_HINTS`] wait: whoever asks, and however often, a
/// download's hints stay few.
fn add_hint(hints: &mut Vec<PeerId>, peer: PeerId, active: bool) {
    if !active && hints.len() < MAX_HINTS && !hints.contains(&peer) {
        hints.push(peer);
    }
}

/// Blocks queued for a download's writer (they hold budget leases meanwhile).
const WRITE_QUEUE: usize = 16;
/// Bytes a writer writes between background syncs of the partial file.
const SYNC_EVERY: u64 = 64 << 20;
/// How often a resumable download checkpoints while blocks arrive...
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// ...at most: its checkpoints write no more than this many bytes a second
/// (every 2 s up to 1 GiB items, every 32 s for 16 GiB).
const CHECKPOINT_BYTES_PER_SEC: u64 = 2 << 20;

impl Download {
    pub(super) fn new(
        manifest: VerifiedManifest,
        size_proof: Vec<u8>,
        partial: Partial,
        sched: Sched,
        hints: Vec<PeerId>,
        cancel: CancellationToken,
        borrower: Borrower,
    ) -> Self {
        let phase = if sched.keep() {
            Phase::Keeping
        } else {
            Phase::Streaming
        };
        Self {
            id: manifest.id,
            manifest,
            size_proof,
            partial: Arc::new(partial),
            state: Mutex::new(State {
                sched,
                phase,
                ram: BTreeMap::new(),
                hints,
                contributors: HashSet::new(),
                tally: Tally::default(),
            }),
            changed: Notify::new(),
            progress: watch::Sender::new(0),
            outcome: watch::Sender::new(Outcome::Running),
            verdict: watch::Sender::new(None),
            cancel,
            borrower,
            writer: OnceLock::new(),
        }
    }

    /// The queue to this download's writer, starting it the first time.
    /// The writer holds the download weakly, so it ends when the download is
    /// gone (its queue then closes).
    pub(super) fn writer(
        self: &Arc<Self>,
        tasks: &Tasks,
        accept: impl Fn(&Download, WriteJob) + Send + 'static,
    ) -> mpsc::Sender<WriteJob> {
        self.writer
            .get_or_init(|| {
                let (tx, mut rx) = mpsc::channel::<WriteJob>(WRITE_QUEUE);
                let (tasks, dl) = (tasks.clone(), Arc::downgrade(self));
                let task = tasks.clone();
                // One thread writes a download's blocks in arrival order: no
                // hand-off per block, no writers contending for the file.
                task.spawn_blocking(move || {
                    if let Some(d) = dl.upgrade()
                        && let Err(e) = d.partial.preallocate()
                    {
                        // A disk that cannot hold the item fails it now.
                        d.fail(ContentServiceError::io(
                            format!("reserving space for {}", d.id),
                            e,
                        ));
                        return;
                    }
                    let mut unsynced = 0u64;
                    let mut last_sync = std::time::Instant::now();
                    // A checkpoint writes the whole tree (1/256 of the item):
                    // large items checkpoint less often.
                    let checkpoint_every = match dl.upgrade() {
                        Some(d) => CHECKPOINT_EVERY.max(std::time::Duration::from_secs(
                            d.partial.tree_len() as u64 / CHECKPOINT_BYTES_PER_SEC,
                        )),
                        None => return,
                    };
                    let mut syncing: Option<tokio::task::JoinHandle<()>> = None;
                    while let Some(job) = rx.blocking_recv() {
                        let Some(dl) = dl.upgrade() else { return };
                        unsynced += job.block.len() as u64;
                        accept(&dl, job);
                        // The disk writes back what is written while the
                        // transfer goes on, so the commit's sync waits for
                        // little (a 1 GiB sync alone took 0.4 s here). A
                        // resumable download also checkpoints every few
                        // seconds, so a node that dies loses little.
                        let due = unsynced >= SYNC_EVERY
                            || (dl.partial.resumable() && last_sync.elapsed() >= checkpoint_every);
                        if due && syncing.as_ref().is_none_or(|s| s.is_finished()) {
                            unsynced = 0;
                            last_sync = std::time::Instant::now();
                            let partial = dl.partial.clone();
                            syncing = Some(tasks.spawn_blocking(move || {
                                if let Err(e) = partial.checkpoint() {
                                    tracing::debug!(id = %partial.id(), error = %chain(&e), "checkpoint failed");
                                }
                            }));
                        }
                    }
                });
                tx
            })
            .clone()
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the schedule as consistent
        // as its last completed call; the driver ends the download anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn keep(&self) -> bool {
        self.state().sched.keep()
    }

    /// Ends the transfer for everyone with `error` (a local failure or
    /// malware). The first reason stands, except that malware overrides any.
    pub(super) fn fail(&self, error: ContentServiceError) {
        {
            let mut st = self.state();
            let replace = match &st.phase {
                Phase::Failed(ContentServiceError::Malware { .. }) => false,
                Phase::Failed(_) => matches!(error, ContentServiceError::Malware { .. }),
                _ => true,
            };
            if replace {
                st.phase = Phase::Failed(error);
            }
        }
        self.cancel.cancel();
    }

    /// The error for a block of ours that could not be written: our disk,
    /// never the peer's fault.
    pub(super) fn write_failed(&self, k: u64, e: ContentError) -> ContentServiceError {
        let io = match e {
            ContentError::Write(io) => io,
            other => std::io::Error::other(other),
        };
        ContentServiceError::io(format!("writing block {k} of {}", self.id), io)
    }

    /// Why the transfer was ended, if it was.
    pub(super) fn failure(&self) -> Option<ContentServiceError> {
        match &self.state().phase {
            Phase::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// The signature found in this item, if any.
    pub(super) fn malware(&self) -> Option<String> {
        match &self.state().phase {
            Phase::Failed(ContentServiceError::Malware { signature, .. }) => {
                Some(signature.clone())
            }
            _ => None,
        }
    }

    /// Whether verified bytes of block `k` are at hand (on disk or in memory).
    pub(super) fn holds(&self, k: u64) -> bool {
        self.partial.has(k) || self.state().ram.contains_key(&k)
    }

    /// Verified bytes of a held span within one block: from memory when the
    /// download keeps nothing (no copy), else from the partial file.
    pub(super) async fn read_span(&self, range: Range<u64>) -> Result<Bytes, ContentServiceError> {
        let k = range.start / BLOCK_BYTES;
        if let Some(b) = self.in_memory(k) {
            let base = k * BLOCK_BYTES;
            return Ok(b.slice((range.start - base) as usize..(range.end - base) as usize));
        }
        let partial = self.partial.clone();
        let what = format!("reading block {k} of {}", self.id);
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            partial
                .read_at(&mut buf, range.start)
                .map(|()| Bytes::from(buf))
                .map_err(|e| ContentServiceError::io(what, e))
        })
        .await
        .unwrap_or_else(|e| Err(ContentServiceError::task(e)))
    }

    /// The verified block `k` if it waits in memory.
    pub(super) fn in_memory(&self, k: u64) -> Option<Bytes> {
        self.state().ram.get(&k).map(|(b, _)| b.clone())
    }

    /// `peer` asked what we hold of this item: it is fetching it too, and
    /// soon holds blocks we need, so it becomes a provider to try (as in
    /// BitTorrent, where a connection serves both ways). The DHT names only
    /// some of a crowd's peers to each downloader; this way the others are
    /// found too.
    pub(crate) fn asked_by(&self, peer: PeerId) {
        let mut st = self.state();
        let active = st.sched.is_active(&peer);
        add_hint(&mut st.hints, peer, active);
    }

    /// `peer`'s request for `k` ended without a block.
    pub(super) fn release(&self, peer: PeerId, k: u64) {
        self.state().sched.release(peer, k);
    }

    /// Takes `peer`'s verified block `k`: into memory, with the budget
    /// `lease` it was fetched under, while the download keeps nothing (unless
    /// no reader wants it any more: then it is dropped), else into the file —
    /// so call it off the async threads then. True when the block is newly held.
    pub(super) fn hold(
        &self,
        peer: PeerId,
        k: u64,
        block: Bytes,
        lease: Lease,
    ) -> Result<bool, ContentError> {
        {
            let mut st = self.state();
            if !st.sched.keep() {
                if !st.sched.in_window(k) {
                    st.sched.release(peer, k);
                    return Ok(false);
                }
                st.ram.insert(k, (block, lease));
                st.contributors.insert(peer);
                return Ok(st.held(peer, k));
            }
        }
        if let Err(e) = self.partial.store_verified(k, &block) {
            self.release(peer, k);
            return Err(e);
        }
        let mut st = self.state();
        st.contributors.insert(peer);
        Ok(st.held(peer, k))
    }

    /// From now on the download keeps the item. True if that is news: the
    /// caller then starts the whole-item scan. What waits in memory goes to
    /// the file on a blocking thread.
    pub(super) fn set_keep(self: &Arc<Self>) -> bool {
        {
            let mut st = self.state();
            if !matches!(st.phase, Phase::Streaming) {
                return false;
            }
            st.phase = Phase::Keeping;
            st.sched.set_keep(Instant::now());
        }
        let dl = self.clone();
        tokio::task::spawn_blocking(move || {
            // Readers look in memory, then in the file: holding the lock keeps
            // each block visible in one of them throughout.
            let mut st = dl.state();
            while let Some((k, (b, _lease))) = st.ram.pop_first() {
                if let Err(e) = dl.partial.store_verified(k, &b) {
                    drop(st);
                    dl.fail(dl.write_failed(k, e));
                    return;
                }
            }
            drop(st);
            dl.progress.send_modify(|_| {});
            dl.changed.notify_waiters();
        });
        true
    }

    /// Drops in-memory blocks outside every reader's window (passed, or far
    /// ahead of a slow reader another reader has left behind); they become
    /// missing again, for whoever reaches them later. So memory stays within
    /// a window per reader however the readers spread out.
    pub(super) fn evict_passed(&self) {
        let mut st = self.state();
        if st.sched.keep() {
            return;
        }
        let now = Instant::now();
        let State { sched, ram, .. } = &mut *st;
        ram.retain(|k, _| {
            let keep = sched.in_window(*k);
            if !keep && sched.slot(*k) == Slot::Held {
                sched.unhold(*k, now);
            }
            keep
        });
    }

    pub(super) fn add_reader(&self, blocks: Range<u64>) -> u64 {
        let id = self.state().sched.add_reader(blocks, Instant::now());
        self.changed.notify_waiters();
        id
    }

    pub(super) fn advance(&self, reader: u64, next: u64) {
        self.state().sched.advance(reader, next);
        self.evict_passed();
        self.changed.notify_waiters();
    }

    pub(super) fn remove_reader(&self, reader: u64) {
        let idle = {
            let mut st = self.state();
            st.sched.remove_reader(reader) && !st.sched.keep()
        };
        if idle {
            self.cancel.cancel();
        }
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_asking_us_leave_a_bounded_set_of_hints() {
        let mut hints = Vec::new();
        let loud = PeerId::random();
        for _ in 0..1000 {
            add_hint(&mut hints, loud, false);
        }
        assert_eq!(hints, vec![loud], "one peer asking often is one hint");
        add_hint(&mut hints, PeerId::random(), true);
        assert_eq!(hints.len(), 1, "a peer fetched from already is no hint");
        for _ in 0..1000 {
            add_hint(&mut hints, PeerId::random(), false);
        }
        assert_eq!(hints.len(), MAX_HINTS, "a crowd of askers is bounded");
    }
}
