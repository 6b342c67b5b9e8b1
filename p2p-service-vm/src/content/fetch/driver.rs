//! The driver of one download: it registers the download (one per item, so
//! readers share it), finds providers in the DHT, chooses among them by the
//! credit ledger's forecast, keeps one worker per provider running, watches
//! for stalls, and — for a kept item — waits for the scan, commits the item
//! to the store and announces it. Its outcome reaches every reader.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use p2pvm_content::{BLOCK_BYTES, ContentId, Partial, block_count};
use p2pvm_security::{Standing, Verdict};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::download::{Download, Outcome};
use super::peer::{MANIFEST_ASKED, manifest_from, neighbours_holding};
use super::scan::{malware_found, start_whole_scan, whole_verdict};
use super::sched::Sched;
use super::worker::worker;
use crate::content::ContentEvent;
use crate::content::error::Unavailable;
use crate::content::{ContentService, ContentServiceError};
use crate::node::Command;

/// Blocks a download that keeps nothing fetches ahead of each reader: they
/// wait in memory, so this bounds its memory (16 MiB per reader).
const RAM_AHEAD: u64 = 64;
/// How long a failed provider is left alone before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Returns the running download of `id`, starting one if needed.
/// `sources`: peers known to hold the item, asked for its manifest before a
/// DHT lookup (the records of an item published a moment ago may not have
/// spread yet).
pub(super) async fn download_for(
    svc: &ContentService,
    id: &ContentId,
    keep: bool,
    sources: &[PeerId],
) -> Result<Arc<Download>, ContentServiceError> {
    if let Some(dl) = running(svc, id) {
        if keep && dl.set_keep() {
            start_whole_scan(svc, &dl);
        }
        return Ok(dl);
    }
    let asked = Instant::now();
    // One provider is enough to start (the driver looks for more at once);
    // if it cannot give a valid manifest, ask more widely.
    let mut providers: Vec<PeerId> = sources
        .iter()
        .filter(|p| svc.standing(p) < Standing::Refused)
        .copied()
        .collect();
    if providers.is_empty() {
        providers = first_providers(svc, id, 1).await;
    }
    if providers.is_empty() {
        return Err(ContentServiceError::NotFound(*id));
    }
    // More providers are looked up while the manifest is fetched, so the
    // driver's first workers start on them at once (a viewer waits for
    // them: one provider's line rarely carries a playback's first second).
    // Half the provider slots: a lookup ends as soon as that many are found
    // (one record holder's answer names them all), where one for more than
    // a small swarm holds runs until the whole query ends, over a second
    // on home lines; the driver's next lookups find the rest.
    let more = {
        let (lookup, id) = (svc.clone(), *id);
        let n = (svc.inner.config.max_providers as usize / 2).max(2);
        AbortOnDropHandle::new(svc.spawn(async move { lookup.find_providers(&id, n).await }))
    };
    let proven = match manifest_from(svc, id, &providers).await {
        Ok(m) => m,
        Err(first) => {
            let tried = providers.clone();
            providers = svc.find_providers(id, MANIFEST_ASKED).await;
            providers.retain(|p| !tried.contains(p));
            if providers.is_empty() {
                return Err(first);
            }
            // "Not found" from the wider round says less than why the first
            // provider failed (a DRM refusal, say).
            manifest_from(svc, id, &providers)
                .await
                .map_err(|e| match e {
                    ContentServiceError::NotFound(_) => first,
                    e => e,
                })?
        }
    };
    debug!(
        %id,
        ms = asked.elapsed().as_millis() as u64,
        "manifest and size proof in"
    );
    let manifest = proven.manifest;
    let size = manifest.manifest.size;
    let partial = open_partial(svc, id, size, keep).await?;
    let mut sched = Sched::new(
        block_count(size),
        svc.inner.config.streaming_window_blocks as u64,
        RAM_AHEAD,
        keep,
        rand::random(),
        Instant::now(),
    );
    let resumed: Vec<u64> = (0..block_count(size)).filter(|k| partial.has(*k)).collect();
    if !resumed.is_empty() {
        info!(%id, held = resumed.len(), blocks = block_count(size), "resuming an unfinished download");
        for k in resumed {
            sched.resumed(k);
        }
    }
    let cancel = svc.inner.ctx.shutdown.child_token();
    let borrower = svc.inner.budget.borrower();
    // The size proof goes with it: whoever finds this download as a provider
    // has the size proven by it (without it, an early swarm refused newcomers
    // with "not downloaded yet").
    let fresh = Arc::new(Download::new(
        manifest,
        proven.size_proof,
        partial,
        sched,
        providers,
        cancel,
        borrower,
    ));
    // Another request may have started it while we looked for the manifest.
    let raced = {
        let mut downloads = svc.inner.downloads.lock().expect("lock");
        // One that is winding down (cancelled) is replaced, not joined.
        match downloads
            .get(id)
            .filter(|d| !d.cancel.is_cancelled())
            .cloned()
        {
            Some(existing) => Some(existing),
            None => {
                downloads.insert(*id, fresh.clone());
                None
            }
        }
    };
    if let Some(dl) = raced {
        if keep && dl.set_keep() {
            start_whole_scan(svc, &dl);
        }
        return Ok(dl);
    }
    let dl = fresh;
    if keep && svc.may_announce(&dl.manifest.manifest) {
        // Downloaders serve what they hold, so announce at once: peers fetching
        // the same item find us while we are still fetching it.
        let _ = svc
            .inner
            .ctx
            .node
            .send(Command::Announce(crate::content::content_key(id)))
            .await;
    }
    svc.spawn(drive(svc.clone(), dl.clone(), Some(more)));
    if keep {
        start_whole_scan(svc, &dl);
    }
    Ok(dl)
}

/// The download's partial item: for a kept item, the one an earlier download
/// left (resumed, each block proven again) or a new resumable one; else a
/// temporary one.
async fn open_partial(
    svc: &ContentService,
    id: &ContentId,
    size: u64,
    keep: bool,
) -> Result<Partial, ContentServiceError> {
    let item = *id;
    let (path, state) = if keep {
        svc.inner.ctx.store.partial_paths(id)
    } else {
        (svc.inner.ctx.store.tmp_path("part"), PathBuf::new())
    };
    let at = path.clone();
    let tmp = svc.inner.ctx.store.tmp_path("part");
    tokio::task::spawn_blocking(move || {
        if !keep {
            return Partial::create(&at, item, size);
        }
        match Partial::open_resumable(&at, &state, item, size)? {
            Some(p) => Ok(p),
            // An earlier download of the item, still winding down, holds it.
            None => Partial::create(&tmp, item, size),
        }
    })
    .await
    .map_err(ContentServiceError::task)?
    .map_err(|e| ContentServiceError::io(format!("opening {}", path.display()), e))
}

/// Whether a download ended because the item itself was refused (its bytes
/// or its rights): an unfinished copy of it is then not worth resuming.
fn item_refused(e: &ContentServiceError) -> bool {
    matches!(
        e,
        ContentServiceError::Malware { .. }
            | ContentServiceError::Drm(_)
            | ContentServiceError::DrmRefused { .. }
            | ContentServiceError::Denied(_)
            | ContentServiceError::Verification(_)
    )
}

/// Pauses before each lookup of a download's first provider: records of an
/// item published a moment ago may still be on their way to the DHT.
const FIRST_LOOKUPS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// Where a download's manifest is asked for when no source was given: the
/// DHT's providers, else the connected peers that hold the item, looked for
/// again after a pause before the item counts as not found.
pub(crate) async fn first_providers(
    svc: &ContentService,
    id: &ContentId,
    limit: usize,
) -> Vec<PeerId> {
    for pause in FIRST_LOOKUPS {
        tokio::time::sleep(pause).await;
        let found = svc.find_providers(id, limit).await;
        if !found.is_empty() {
            return found;
        }
        let near = neighbours_holding(svc, id).await;
        if !near.is_empty() {
            debug!(%id, peers = near.len(), "no provider in the DHT; connected peers hold it");
            return near;
        }
    }
    Vec::new()
}

fn running(svc: &ContentService, id: &ContentId) -> Option<Arc<Download>> {
    svc.inner
        .downloads
        .lock()
        .expect("lock")
        .get(id)
        .filter(|d| !d.cancel.is_cancelled())
        .cloned()
}

/// Resolves a download's outcome and unregisters it however the driver ends,
/// a panic included, so no reader waits forever.
struct DriveGuard {
    svc: ContentService,
    dl: Arc<Download>,
}

impl Drop for DriveGuard {
    fn drop(&mut self) {
        let running = matches!(*self.dl.outcome.borrow(), Outcome::Running);
        if running {
            self.dl
                .outcome
                .send_replace(Outcome::Failed(Unavailable::Ended.into()));
            // Its scan and readers stop too.
            self.dl.cancel.cancel();
        }
        unregister(&self.svc, &self.dl);
        self.dl.changed.notify_waiters();
    }
}

/// Removes `dl` from the registry (not a newer download of the same item), so
/// the next request for the item starts afresh.
fn unregister(svc: &ContentService, dl: &Arc<Download>) {
    let mut downloads = svc
        .inner
        .downloads
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if downloads.get(&dl.id).is_some_and(|d| Arc::ptr_eq(d, dl)) {
        downloads.remove(&dl.id);
    }
}

/// Provider workers of one download, and when failed ones may be tried again.
/// Whether every provider of a stalled download is connected, and only
/// through relays: then the relays' limits, not the providers, stopped it.
/// How many there are and the fewest bytes one of their circuits carries.
async fn relayed_only(
    svc: &ContentService,
    providers: impl Iterator<Item = &PeerId>,
) -> Option<(usize, Option<u64>)> {
    let (mut n, mut limit) = (0, None::<u64>);
    for p in providers {
        let peer = *p;
        let paths = svc.inner.ctx.node.call(|reply| Command::Paths(peer, reply));
        match paths.await {
            Ok(p) if p.direct == 0 && p.relayed > 0 => {
                n += 1;
                if let Some(b) = p.circuit_bytes {
                    limit = Some(limit.map_or(b, |l| l.min(b)));
                }
            }
            _ => return None,
        }
    }
    (n > 0).then_some((n, limit))
}

struct Workers {
    running: HashMap<PeerId, tokio::task::JoinHandle<()>>,
    retry: HashMap<PeerId, Instant>,
}

impl Workers {
    /// Forgets finished workers; their providers wait before another try.
    fn reap(&mut self) {
        let retry = &mut self.retry;
        self.running.retain(|peer, h| {
            let done = h.is_finished();
            if done {
                retry.insert(*peer, Instant::now() + RETRY_AFTER);
            }
            !done
        });
    }

    fn may_start(&self, peer: &PeerId) -> bool {
        !self.running.contains_key(peer)
            && self.retry.get(peer).is_none_or(|t| Instant::now() >= *t)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in self.running.values() {
            w.abort();
        }
    }
}

/// `early`: a provider lookup started with the download, taken as the
/// driver's first.
async fn drive(
    svc: ContentService,
    dl: Arc<Download>,
    mut early: Option<AbortOnDropHandle<Vec<PeerId>>>,
) {
    let _guard = DriveGuard {
        svc: svc.clone(),
        dl: dl.clone(),
    };
    let id = dl.id;
    let cfg = &svc.inner.config;
    let stall = Duration::from_secs(cfg.stall_timeout_secs.max(1));
    let mut workers = Workers {
        running: HashMap::new(),
        retry: HashMap::new(),
    };
    let mut next_lookup = Instant::now();
    let mut last_event = Instant::now();
    let started = Instant::now();
    let metrics = svc.inner.ctx.metrics.clone();
    let _running = crate::metrics::Held::new(&metrics.content.transfers);
    // A resumed download's first block is not a first byte.
    let mut first_block = dl.state().sched.held_blocks() > 0;
    let result = loop {
        let (satisfied, stalled, held) = {
            let mut st = dl.state();
            if !st.sched.keep() {
                // Readers' memory windows fit this download's share of the budget.
                let readers = st.sched.readers().max(1) as u64;
                let ahead = (dl.borrower.share() / readers).clamp(2, RAM_AHEAD);
                st.sched.set_ram_ahead(ahead);
            }
            let stalled = st.sched.stalled(Instant::now(), stall);
            (st.sched.satisfied(), stalled, st.sched.held_blocks())
        };
        dl.evict_passed();
        if !first_block && held > 0 {
            first_block = true;
            metrics
                .content
                .first_byte
                .observe(started.elapsed().as_secs_f64());
        }
        if dl.keep() && satisfied {
            break finish(&svc, &dl).await;
        }
        if dl.cancel.is_cancelled() {
            break Outcome::Failed(dl.failure().unwrap_or(ContentServiceError::Cancelled));
        }
        if stalled {
            let providers = workers.running.len();
            let secs = stall.as_secs();
            let known = workers.running.keys().chain(workers.retry.keys());
            let why = match relayed_only(&svc, known).await {
                Some((providers, limit)) => Unavailable::RelayLimited {
                    secs,
                    providers,
                    limit: limit
                        .map_or_else(|| "a limited number of".into(), |b| format!("at most {b}")),
                },
                None => Unavailable::Stalled { secs, providers },
            };
            break Outcome::Failed(why.into());
        }
        workers.reap();
        let want_more = workers.running.len() < cfg.max_providers as usize;
        if want_more {
            // Providers already known start before any lookup (under churn a
            // DHT query can wait seconds on peers that are gone, and the
            // first block must not): the one that gave the manifest, peers
            // fetched from before that hold what we still need, and peers
            // fetching the item from us.
            let (mut known, hints) = {
                let mut st = dl.state();
                (st.sched.known_useful(), std::mem::take(&mut st.hints))
            };
            known.extend(hints);
            start_workers(&svc, &dl, &mut workers, known);
        }
        let want_more = workers.running.len() < cfg.max_providers as usize;
        if want_more && (Instant::now() >= next_lookup || workers.running.is_empty()) {
            let mut candidates = Vec::new();
            if Instant::now() >= next_lookup {
                let found = match early.take() {
                    Some(lookup) => lookup.await.unwrap_or_default(),
                    None => {
                        svc.find_providers(&id, cfg.max_providers as usize * 2)
                            .await
                    }
                };
                candidates.extend(found);
                // Peers fetching the same item announce themselves as they
                // start; look often early on so a swarm finds itself quickly.
                next_lookup = Instant::now()
                    + if workers.running.is_empty() {
                        Duration::from_millis(500)
                    } else if started.elapsed() < Duration::from_secs(10) {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_secs(5)
                    };
            }
            start_workers(&svc, &dl, &mut workers, candidates);
        }
        if last_event.elapsed() >= Duration::from_millis(500) {
            last_event = Instant::now();
            svc.emit(ContentEvent::Progress {
                id,
                held_bytes: (held * BLOCK_BYTES).min(dl.partial.size()),
                size: dl.partial.size(),
                providers: workers.running.len() as u32,
            });
        }
        tokio::select! {
            _ = dl.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = dl.cancel.cancelled() => {}
        }
    };
    drop(workers);
    if let Outcome::Failed(e) = &result
        && item_refused(e)
    {
        dl.partial.discard();
    }
    // Gone from the registry before readers learn the outcome: a request
    // that comes after a failure starts a fresh download.
    unregister(&svc, &dl);
    // A streamed (unkept) download ends when its readers are done.
    let outcome = match &result {
        Outcome::Failed(ContentServiceError::Cancelled) if !dl.keep() => "ended",
        Outcome::Failed(_) => "failed",
        _ => "complete",
    };
    metrics
        .content
        .finished
        .get_or_create(&crate::metrics::Outcome { outcome })
        .inc();
    svc.transfer_ended(&dl, outcome);
    report(&svc, &dl, &result, started).await;
    dl.outcome.send_replace(result);
}

/// Starts workers for the best candidates, up to the provider limit: those
/// known to hold what we need first, then by credit forecast, so a limited
/// number of worker slots goes to the peers most likely to deliver.
fn start_workers(
    svc: &ContentService,
    dl: &Arc<Download>,
    workers: &mut Workers,
    mut candidates: Vec<PeerId>,
) {
    let me = svc.inner.ctx.node.peer_id();
    let ledger = &svc.inner.ctx.ledger;
    candidates.sort_by_cached_key(|p| {
        let c = ledger.credit(p);
        let useful = dl.state().sched.useful(p);
        (c.standing, !useful, std::cmp::Reverse(c.score), *p)
    });
    candidates.dedup();
    let max = svc.inner.config.max_providers as usize;
    let now = Instant::now();
    for peer in candidates {
        if workers.running.len() >= max {
            break;
        }
        if peer == me || dl.state().sched.excluded(&peer, now) || !workers.may_start(&peer) {
            continue;
        }
        // Candidates come from lookups, from what we knew before and from
        // peers asking us: whoever the ledger refuses since is skipped here.
        if ledger.standing(&peer) >= Standing::Refused {
            continue;
        }
        // Only its publisher may serve an item that is not redistributable.
        if !ContentService::drm_may_serve_us(&dl.manifest.manifest, &peer) {
            continue;
        }
        debug!(id = %dl.id, %peer, "fetching from provider");
        let task = svc.spawn(worker(svc.clone(), dl.clone(), peer));
        workers.running.insert(peer, task);
        dl.state().tally.workers += 1;
    }
}

/// Logs and announces how a download ended.
async fn report(svc: &ContentService, dl: &Download, result: &Outcome, started: Instant) {
    let id = dl.id;
    let tally = format!("{:?}", dl.state().tally);
    match result {
        Outcome::Complete => {
            let size = dl.partial.size();
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            info!(%id, size, mib_per_s = size as f64 / secs / 1048576.0, %tally, "download complete");
            svc.emit(ContentEvent::Progress {
                id,
                held_bytes: size,
                size,
                providers: 0,
            });
        }
        Outcome::Failed(e) if dl.keep() => {
            warn!(%id, error = %crate::report::chain(e), %tally, "download failed");
            let _ = svc
                .inner
                .ctx
                .node
                .send(Command::StopProviding(crate::content::content_key(&id)))
                .await;
        }
        _ => {}
    }
}

/// A kept item has every block: nothing is stored or announced before clamd
/// has seen all of it.
async fn finish(svc: &ContentService, dl: &Arc<Download>) -> Outcome {
    if svc.inner.ctx.virus.enabled() {
        match whole_verdict(dl).await {
            Ok(Verdict::Clean) => {}
            Ok(Verdict::Infected(sig)) => {
                malware_found(svc, dl, &sig);
                return Outcome::Failed(ContentServiceError::malware(sig));
            }
            Err(e) => return Outcome::Failed(e),
        }
    }
    let store = svc.inner.ctx.store.clone();
    let partial = dl.partial.clone();
    let signed = dl.manifest.signed.clone();
    let r = tokio::task::spawn_blocking(move || store.commit_partial(&partial, &signed)).await;
    match r {
        Ok(Ok(_)) => {
            svc.announce(&dl.manifest).await;
            svc.gc().await;
            Outcome::Complete
        }
        Ok(Err(e)) => Outcome::Failed(e.into()),
        Err(e) => Outcome::Failed(ContentServiceError::task(e)),
    }
}
