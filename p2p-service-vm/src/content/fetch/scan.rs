//! The virus filter's part in a download: the whole-item scan of an item
//! being kept, the segment scans that gate what a reader is given, and what
//! happens when malware is found.
//!
//! The whole-item scan hands a local clamd the finished file's descriptor
//! (`FILDES`): clamd reads it in place. Streaming it instead (INSTREAM, for a
//! clamd over TCP, fed as the item's prefix becomes contiguous) costs more
//! than it overlaps: clamd copies a stream into a temporary file and scans
//! only after its last byte, so feeding it early saves nothing but the copy's
//! share, while every byte is read back, sent and written once more.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use libp2p::PeerId;
use p2pvm_content::block_range;
use p2pvm_security::{EventKind, Verdict, VirusFilter};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::download::Download;
use crate::content::ContentEvent;
use crate::content::{ContentService, ContentServiceError};
use crate::node::Command;
use crate::report::chain;

/// Items up to this size (clamd's `StreamMaxLength` in scripts/clamd.sh) are
/// scanned as one clamd stream, so whole-file hash signatures apply; larger ones
/// in overlapping segments. (Segments scanned in parallel were measured slower
/// for bulk downloads: rarest-first order makes the prefix contiguous late, and
/// clamd's scan threads then compete with the transfer for the CPU.)
const WHOLE_SCAN_MAX: u64 = 4000 << 20;
/// Segment size for large items.
const WHOLE_SCAN_SEGMENT: u64 = 16 << 20;
/// Bytes of the previous segment scanned again with the next one, so a
/// signature across the boundary is seen.
const SCAN_OVERLAP: usize = 64 * 1024;
/// Segment scans run at once (clamd scans them in parallel threads).
const SCAN_PARALLEL: usize = 3;

/// A verdict, or why there is none.
pub(super) type Scanned<T = Verdict> = Result<T, ContentServiceError>;

/// Starts the whole-item scan of a download that is now kept.
pub(super) fn start_whole_scan(svc: &ContentService, dl: &Arc<Download>) {
    if svc.inner.ctx.virus.enabled() {
        svc.spawn(scan_whole(svc.clone(), dl.clone()));
    }
}

/// Scans the item as its blocks arrive (in order); no second pass over the
/// finished file. The verdict goes to `dl.verdict`.
async fn scan_whole(svc: ContentService, dl: Arc<Download>) {
    let (clean, fingerprint) = svc.verdict_cached(&dl.id).await;
    if clean {
        debug!(id = %dl.id, "scanned clean before by these signatures; not scanning again");
        dl.verdict.send_replace(Some(Ok(Verdict::Clean)));
        return;
    }
    let size = dl.partial.size();
    let segment_max = if size <= WHOLE_SCAN_MAX {
        u64::MAX
    } else {
        WHOLE_SCAN_SEGMENT
    };
    let mut progress = dl.progress.subscribe();
    if segment_max == u64::MAX && svc.inner.ctx.virus.takes_descriptors() {
        if let Some(verdict) = scan_finished_file(&svc, &dl, &mut progress).await {
            conclude(&svc, &dl, verdict, fingerprint).await;
        }
        return;
    }
    let blocks = dl.partial.blocks();
    let mut scans = SegmentScans::new(svc.inner.ctx.virus.clone());
    let mut whole = (segment_max == u64::MAX).then(|| svc.inner.ctx.virus.scanner());
    let mut segment: Vec<Bytes> = Vec::new();
    let mut segment_len = 0u64;
    let mut k = 0;
    // Where a whole scan's time goes: waiting for the next block in order,
    // reading it back, clamd taking it (its queue full), the verdict.
    let started = std::time::Instant::now();
    let (mut waiting, mut feeding) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let verdict: Scanned = 'scan: loop {
        if let Some(scanner) = whole.as_mut() {
            // One clamd stream, fed block by block.
            if k == blocks {
                let fed = started.elapsed();
                let v = whole
                    .take()
                    .expect("whole scan")
                    .finish()
                    .await
                    .map_err(Into::into);
                debug!(
                    id = %dl.id,
                    total_s = started.elapsed().as_secs_f64(),
                    waiting_for_blocks_s = waiting.as_secs_f64(),
                    feeding_s = feeding.as_secs_f64(),
                    verdict_after_s = (started.elapsed() - fed).as_secs_f64(),
                    "whole-item scan done"
                );
                break v;
            }
            let t = std::time::Instant::now();
            let next = next_block(&dl, &mut progress, k).await;
            waiting += t.elapsed();
            match next {
                None => return,
                Some(Ok(bytes)) => {
                    let t = std::time::Instant::now();
                    scanner.feed(bytes).await;
                    feeding += t.elapsed();
                }
                Some(Err(e)) => break Err(e),
            }
            k += 1;
            continue;
        }
        if segment_len >= segment_max || (k == blocks && !segment.is_empty()) {
            if scans.full() {
                match scans.next().await.1 {
                    Ok(Verdict::Clean) => {}
                    other => break 'scan other,
                }
            }
            scans.submit(std::mem::take(&mut segment));
            segment_len = 0;
            continue;
        }
        if k == blocks {
            if scans.is_empty() {
                break Ok(Verdict::Clean);
            }
            match scans.next().await.1 {
                Ok(Verdict::Clean) => continue,
                other => break 'scan other,
            }
        }
        match next_block(&dl, &mut progress, k).await {
            None => return,
            Some(Ok(bytes)) => {
                segment_len += bytes.len() as u64;
                segment.push(bytes);
            }
            Some(Err(e)) => break Err(e),
        }
        k += 1;
    };
    conclude(&svc, &dl, verdict, fingerprint).await;
}

/// Acts on a whole-item verdict and publishes it to the download.
async fn conclude(
    svc: &ContentService,
    dl: &Arc<Download>,
    verdict: Scanned,
    fingerprint: Option<crate::content::verdicts::Fingerprint>,
) {
    match &verdict {
        Ok(Verdict::Infected(sig)) => malware_found(svc, dl, sig),
        Ok(Verdict::Clean) => svc.remember_clean(&dl.id, fingerprint).await,
        Err(_) => {}
    }
    dl.verdict.send_replace(Some(verdict));
}

/// Waits until every block is in the file, then has clamd scan the file by
/// descriptor; `None` when the download is cancelled first.
async fn scan_finished_file(
    svc: &ContentService,
    dl: &Arc<Download>,
    progress: &mut watch::Receiver<u64>,
) -> Option<Scanned> {
    let started = std::time::Instant::now();
    while !dl.partial.complete() {
        tokio::select! {
            _ = progress.changed() => {}
            _ = dl.cancel.cancelled() => return None,
        }
    }
    let held = started.elapsed();
    // Read-only: clamd gets no more than it needs.
    let path = dl.partial.path().to_owned();
    let file = match tokio::task::spawn_blocking(move || std::fs::File::open(path)).await {
        Ok(Ok(file)) => file,
        // The partial file goes when the download is cancelled.
        _ if dl.cancel.is_cancelled() => return None,
        Ok(Err(e)) => {
            return Some(Err(ContentServiceError::io(
                "opening the download to scan it",
                e,
            )));
        }
        Err(e) => return Some(Err(ContentServiceError::task(e))),
    };
    let verdict = svc
        .inner
        .ctx
        .virus
        .scan_file(file)
        .await
        .map_err(Into::into);
    debug!(
        id = %dl.id,
        waiting_for_blocks_s = held.as_secs_f64(),
        scan_s = (started.elapsed() - held).as_secs_f64(),
        "whole-item scan (by descriptor) done"
    );
    Some(verdict)
}

/// Waits until block `k` is held and reads it for the scan; `None` when the
/// download is cancelled first.
async fn next_block(
    dl: &Arc<Download>,
    progress: &mut watch::Receiver<u64>,
    k: u64,
) -> Option<Scanned<Bytes>> {
    while !dl.partial.has(k) {
        tokio::select! {
            _ = progress.changed() => {}
            _ = dl.cancel.cancelled() => return None,
        }
    }
    Some(dl.read_span(block_range(dl.partial.size(), k)).await)
}

/// Waits for the whole-item scan's verdict on a kept download.
pub(super) async fn whole_verdict(dl: &Download) -> Scanned {
    let mut verdict = dl.verdict.subscribe();
    loop {
        if let Some(v) = verdict.borrow_and_update().clone() {
            return v;
        }
        tokio::select! {
            r = verdict.changed() => if r.is_err() {
                return Err(crate::content::error::Unavailable::Ended.into());
            },
            _ = dl.cancel.cancelled() => {
                return Err(dl.failure().unwrap_or(ContentServiceError::Cancelled));
            }
        }
    }
}

/// The item is malware: every peer that sent part of it is disconnected,
/// banned (persistently) and slashed, an event goes out, and the transfer
/// ends for all its readers. Nothing of it is stored.
pub(super) fn malware_found(svc: &ContentService, dl: &Arc<Download>, signature: &str) {
    if dl.malware().is_some() {
        return;
    }
    dl.fail(ContentServiceError::malware(signature));
    let peers: Vec<PeerId> = dl.state().contributors.iter().copied().collect();
    warn!(id = %dl.id, signature, ?peers, "malware detected; isolating the peers that sent it");
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
        + svc.inner.ban_secs;
    for p in &peers {
        svc.inner.ctx.ledger.record(
            *p,
            EventKind::Malware {
                signature: signature.into(),
            },
        );
    }
    let (svc2, id, signature) = (svc.clone(), dl.id, signature.to_owned());
    svc.spawn(async move {
        // The bans are database writes: off the async threads. The event
        // goes out once they hold, so whoever hears of it finds them banned.
        let (ledger, banned, reason) = (
            svc2.inner.ctx.ledger.clone(),
            peers.clone(),
            format!("malware: {signature}"),
        );
        let written = tokio::task::spawn_blocking(move || {
            for peer in banned {
                if let Err(e) = ledger.ban(peer, until as u64, &reason) {
                    warn!(%peer, error = %chain(&e), "cannot persist a ban");
                }
            }
        })
        .await;
        if let Err(e) = written {
            warn!(error = %chain(&e), "cannot persist the bans");
        }
        svc2.emit(ContentEvent::MalwareDetected {
            id,
            signature,
            peers: peers.clone(),
        });
        for peer in peers {
            let _ = svc2
                .inner
                .ctx
                .node
                .call(|r| Command::Disconnect(peer, r))
                .await;
        }
    });
}

type SegmentScan = tokio::task::JoinHandle<(Vec<Bytes>, Scanned)>;

/// Scans an ordered byte sequence in overlapping segments, several at once,
/// and returns them in order with their verdicts.
pub(super) struct SegmentScans {
    filter: VirusFilter,
    inflight: VecDeque<SegmentScan>,
    tail: Bytes,
}

impl SegmentScans {
    pub(super) fn new(filter: VirusFilter) -> Self {
        Self {
            filter,
            inflight: VecDeque::new(),
            tail: Bytes::new(),
        }
    }

    pub(super) fn submit(&mut self, segment: Vec<Bytes>) {
        let mut parts = Vec::with_capacity(segment.len() + 1);
        parts.push(self.tail.clone());
        parts.extend(segment.iter().cloned());
        let last = segment.last().cloned().unwrap_or_default();
        self.tail = last.slice(last.len().saturating_sub(SCAN_OVERLAP)..);
        let filter = self.filter.clone();
        // Aborted with the set (on drop), so never outlives its reader.
        self.inflight.push_back(tokio::spawn(async move {
            let mut scanner = filter.scanner();
            for p in parts {
                scanner.feed(p).await;
            }
            (segment, scanner.finish().await.map_err(Into::into))
        }));
    }

    pub(super) fn full(&self) -> bool {
        self.inflight.len() >= SCAN_PARALLEL
    }

    pub(super) fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// The oldest segment and its verdict.
    pub(super) async fn next(&mut self) -> (Vec<Bytes>, Scanned) {
        match self.inflight.front_mut() {
            None => (Vec::new(), Ok(Verdict::Clean)),
            Some(h) => {
                let r = h
                    .await
                    .unwrap_or_else(|e| (Vec::new(), Err(ContentServiceError::task(e))));
                self.inflight.pop_front();
                r
            }
        }
    }
}

impl Drop for SegmentScans {
    fn drop(&mut self) {
        for h in &self.inflight {
            h.abort();
        }
    }
}
