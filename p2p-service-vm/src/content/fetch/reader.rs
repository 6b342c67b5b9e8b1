//! Readers: verified bytes of an item, in order, to an app stream or the
//! gateway — from the store when the item is held, else from the running
//! download (joined or started), scanned segment by segment before delivery
//! when the virus filter is on.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use libp2p::PeerId;
use p2pvm_content::{BLOCK_BYTES, ContentId, block_count, block_range};
use p2pvm_security::Verdict;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::download::{Download, Outcome};
use super::driver::download_for;
use super::scan::{Scanned, SegmentScans, malware_found};
use crate::content::{ContentInfo, ContentService, ContentServiceError};

/// Chunk handed to readers of a stored item at a time. Large, because each is
/// a hand-off between threads (and those cost more than the copy here).
const LOCAL_CHUNK: u64 = 1 << 20;
/// The unit of the node's read-ahead pool for stored items
/// (`content.read_ahead_bytes`), and what a reader reads at a time when the
/// pool has no room for a whole chunk: the least it needs to move on.
pub(crate) const READ_AHEAD_UNIT: u64 = 64 << 10;
/// Chunks of a stored item queued for its reader at most. With the chunk
/// the reader holds, what a reader that stopped reading keeps.
const LOCAL_QUEUE: usize = 2;
/// Verified bytes handed to a reader at a time when the virus filter is on:
/// each segment is scanned before any of it is delivered.
const SCAN_SEGMENT: u64 = 4 << 20;
/// A reader's first segment: a player waits for a scan of this much before
/// its first byte, not of 4 MiB (seconds on a home line). Each segment after
/// it doubles, up to [`SCAN_SEGMENT`], so a long read still costs few scans.
const FIRST_SCAN_SEGMENT: u64 = 256 << 10;

/// What a reader yields.
pub(crate) type Chunk = std::io::Result<Bytes>;

fn to_io(e: ContentServiceError) -> std::io::Error {
    std::io::Error::other(e)
}

/// The blocks that hold the bytes of `range`.
fn block_span(size: u64, range: &Range<u64>) -> Range<u64> {
    let first = range.start / BLOCK_BYTES;
    let end = if range.end == 0 {
        0
    } else {
        (range.end - 1) / BLOCK_BYTES + 1
    };
    first..end.min(block_count(size))
}

fn check_range(range: Option<Range<u64>>, size: u64) -> Result<Range<u64>, ContentServiceError> {
    let r = range.unwrap_or(0..size);
    if r.start > r.end || r.end > size {
        return Err(ContentServiceError::BadRequest(format!(
            "range {}..{} is outside an item of {size} bytes",
            r.start, r.end
        )));
    }
    Ok(r)
}

/// Starts streaming verified bytes of `id` over `range`.
pub(crate) async fn open_reader(
    svc: &ContentService,
    id: &ContentId,
    range: Option<Range<u64>>,
    keep: bool,
) -> Result<
    (
        ContentInfo,
        Range<u64>,
        impl Stream<Item = Chunk> + Send + 'static,
    ),
    ContentServiceError,
> {
    let id = *id;
    let local = svc
        .blocking(move |svc| {
            let Some(info) = svc.inner.ctx.store.get(&id)? else {
                return Ok(None);
            };
            let manifest = svc
                .local_manifest_blocking(&id)?
                .ok_or(ContentServiceError::NotFound(id))?;
            let file = svc.inner.ctx.store.open_data(&id)?;
            Ok::<_, ContentServiceError>(Some((info, manifest, file)))
        })
        .await??;
    if let Some((info, manifest, file)) = local {
        let r = check_range(range, info.size)?;
        let (tx, stream) = chunk_channel(LOCAL_QUEUE);
        svc.spawn(read_local(svc.clone(), file, r.clone(), tx));
        let me = svc.inner.ctx.node.peer_id();
        let info = ContentInfo {
            manifest,
            local: Some(info),
            providers: vec![me],
        };
        return Ok((info, r, stream));
    }
    let (tx, stream) = chunk_channel(4);
    let whole = range.is_none();
    let mut dl = download_for(svc, &id, keep && whole, &[]).await?;
    let r = match check_range(range, dl.partial.size()) {
        Ok(r) => r,
        Err(e) => {
            // Started just for this request: do not leave it running reader-less.
            let idle = !dl.state().sched.has_readers();
            if idle && !dl.keep() {
                dl.cancel.cancel();
            }
            return Err(e);
        }
    };
    let mut reader = dl.add_reader(block_span(dl.partial.size(), &r));
    if dl.cancel.is_cancelled() {
        // Joined a download in the instant its last reader left (a player
        // closing one stream and seeking with the next): start a fresh one.
        dl.remove_reader(reader);
        dl = download_for(svc, &id, keep && whole, &[]).await?;
        reader = dl.add_reader(block_span(dl.partial.size(), &r));
    }
    let info = ContentInfo {
        manifest: dl.manifest.clone(),
        local: None,
        providers: dl.state().sched.providers(),
    };
    svc.spawn(read_download(svc.clone(), dl, reader, r.clone(), tx));
    Ok((info, r, stream))
}

/// A queue of `n` chunks to a reader, as the stream it reads.
fn chunk_channel(
    n: usize,
) -> (
    mpsc::Sender<Chunk>,
    impl Stream<Item = Chunk> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel::<Chunk>(n);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, stream)
}

/// A chunk of a stored item with the read-ahead it was charged; the charge
/// goes back to the pool when the last slice of the chunk is dropped.
struct Charged {
    buf: Vec<u8>,
    _charge: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// The size of the next chunk of a stored item and its charge: a whole
/// chunk while the node's read-ahead pool has room, else one unit, uncharged.
fn next_chunk(pool: &Arc<Semaphore>, left: u64) -> (u64, Option<OwnedSemaphorePermit>) {
    let want = left.min(LOCAL_CHUNK);
    if want > READ_AHEAD_UNIT {
        let units = want.div_ceil(READ_AHEAD_UNIT) as u32;
        if let Ok(charge) = pool.clone().try_acquire_many_owned(units) {
            return (want, Some(charge));
        }
    }
    (want.min(READ_AHEAD_UNIT), None)
}

/// A buffer of up to `want` bytes held ahead of a client (a bulk ring):
/// the largest power of two the read-ahead pool has room for, charged to it,
/// else one unit, uncharged.
pub(crate) fn charge_buffer(
    pool: &Arc<Semaphore>,
    want: u64,
) -> (u64, Option<OwnedSemaphorePermit>) {
    let mut size = want.max(READ_AHEAD_UNIT).next_power_of_two();
    while size > READ_AHEAD_UNIT {
        let units = (size / READ_AHEAD_UNIT) as u32;
        if let Ok(charge) = pool.clone().try_acquire_many_owned(units) {
            return (size, Some(charge));
        }
        size /= 2;
    }
    (READ_AHEAD_UNIT, None)
}

/// Reads one chunk of a stored item at the file's position (`seek` first for
/// the first chunk), charged to the read-ahead pool when `charge` is given.
fn read_chunk(
    f: &mut std::fs::File,
    pos: u64,
    (n, charge): (u64, Option<OwnedSemaphorePermit>),
    seek: bool,
) -> std::io::Result<Bytes> {
    use std::io::{Read, Seek, SeekFrom};
    if seek {
        f.seek(SeekFrom::Start(pos))?;
    }
    // Read into spare capacity rather than zero-filling first.
    let mut buf = Vec::with_capacity(n as usize);
    let got = f.take(n).read_to_end(&mut buf)?;
    if got as u64 != n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the stored item ends {got} bytes into a {n}-byte read at {pos}"),
        ));
    }
    Ok(match charge {
        Some(charge) => Bytes::from_owner(Charged {
            buf,
            _charge: charge,
        }),
        None => Bytes::from(buf),
    })
}

/// Reads `range` of a stored item sequentially (the kernel's readahead keeps
/// up). A chunk is read only once the reader's queue has room for it, and
/// is charged to the node's read-ahead pool until the reader drops it; stops
/// when the reader goes away. On a reader thread of its own while one of the
/// capped few is free, else a chunk per short blocking job.
async fn read_local(
    svc: ContentService,
    mut file: std::fs::File,
    range: Range<u64>,
    tx: mpsc::Sender<Chunk>,
) {
    let pool = svc.inner.read_ahead.clone();
    if let Ok(thread) = svc.inner.local_readers.clone().try_acquire_owned() {
        let rt = tokio::runtime::Handle::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _thread = thread;
            let mut pos = range.start;
            while pos < range.end {
                let Ok(slot) = rt.block_on(tx.reserve()) else {
                    return;
                };
                let chunk = next_chunk(&pool, range.end - pos);
                let n = chunk.0;
                let read = read_chunk(&mut file, pos, chunk, pos == range.start);
                let failed = read.is_err();
                slot.send(read);
                if failed {
                    return;
                }
                pos += n;
            }
        })
        .await;
        return;
    }
    let mut file = Some(file);
    let mut pos = range.start;
    while pos < range.end {
        let Ok(slot) = tx.reserve().await else {
            return;
        };
        let chunk = next_chunk(&pool, range.end - pos);
        let (n, first) = (chunk.0, pos == range.start);
        let mut f = file.take().expect("returned by the previous job");
        let job = tokio::task::spawn_blocking(move || {
            let read = read_chunk(&mut f, pos, chunk, first);
            (f, read)
        });
        let read = match job.await {
            Ok((f, read)) => {
                file = Some(f);
                read
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        let failed = read.is_err();
        slot.send(read);
        if failed {
            return;
        }
        pos += n;
    }
}

/// Removes a reader from its download however its task ends.
struct ReaderGuard(Arc<Download>, u64);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.remove_reader(self.1);
    }
}

/// Hands a scanned segment to the reader; false when the stream must end
/// (malware, a scan error, the reader gone).
async fn deliver(
    svc: &ContentService,
    dl: &Arc<Download>,
    (segment, verdict): (Vec<Bytes>, Scanned),
    tx: &mpsc::Sender<Chunk>,
) -> bool {
    let refuse = match verdict {
        Ok(Verdict::Clean) => dl.malware().map(|signature| ContentServiceError::Malware {
            // Another scan of this item found it: nothing more goes out.
            signature,
            elsewhere: true,
        }),
        Ok(Verdict::Infected(sig)) => {
            malware_found(svc, dl, &sig);
            Some(ContentServiceError::malware(sig))
        }
        Err(e) => Some(e),
    };
    if let Some(e) = refuse {
        let _ = tx.send(Err(to_io(e))).await;
        return false;
    }
    for b in segment {
        if tx.send(Ok(b)).await.is_err() {
            return false;
        }
    }
    true
}

async fn read_download(
    svc: ContentService,
    dl: Arc<Download>,
    reader: u64,
    range: Range<u64>,
    tx: mpsc::Sender<Chunk>,
) {
    let _guard = ReaderGuard(dl.clone(), reader);
    // An item these signatures found clean before is not scanned again.
    let (cached, fingerprint) = if svc.inner.ctx.virus.enabled() {
        svc.verdict_cached(&dl.id).await
    } else {
        (false, None)
    };
    let scan = svc.inner.ctx.virus.enabled() && !cached;
    // Only a scan of the whole item as one stream counts as its verdict:
    // whole-file hash signatures never match a segment of a larger item.
    let whole = range == (0..dl.partial.size()) && dl.partial.size() <= SCAN_SEGMENT;
    let mut scans = SegmentScans::new(svc.inner.ctx.virus.clone());
    let mut segment_max = if whole {
        SCAN_SEGMENT
    } else {
        FIRST_SCAN_SEGMENT
    };
    let mut progress = dl.progress.subscribe();
    let mut outcome = dl.outcome.subscribe();
    let mut pos = range.start;
    let mut segment: Vec<Bytes> = Vec::new();
    let mut segment_len = 0u64;
    loop {
        let done_reading = pos >= range.end;
        if done_reading && segment.is_empty() && scans.is_empty() {
            if scan && whole {
                // The whole item, scanned as one segment, came back clean.
                svc.remember_clean(&dl.id, fingerprint).await;
            }
            return;
        }
        if !scan && !segment.is_empty() {
            // Unscanned: hand each block over as soon as it is read.
            for b in std::mem::take(&mut segment) {
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
            segment_len = 0;
            continue;
        }
        if segment_len >= segment_max || (done_reading && !segment.is_empty()) {
            if scans.full() && !deliver(&svc, &dl, scans.next().await, &tx).await {
                return;
            }
            scans.submit(std::mem::take(&mut segment));
            segment_len = 0;
            segment_max = (segment_max * 2).min(SCAN_SEGMENT);
            continue;
        }
        if done_reading {
            if !deliver(&svc, &dl, scans.next().await, &tx).await {
                return;
            }
            continue;
        }
        let k = pos / BLOCK_BYTES;
        if !dl.holds(k) {
            let failed = match &*outcome.borrow_and_update() {
                Outcome::Failed(e) => Some(e.clone()),
                _ => None,
            };
            if let Some(e) = failed {
                let _ = tx.send(Err(to_io(e))).await;
                return;
            }
            let busy = !scans.is_empty();
            tokio::select! {
                _ = progress.changed() => {}
                _ = outcome.changed() => {}
                done = scans.next(), if busy => {
                    if !deliver(&svc, &dl, done, &tx).await {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
            continue;
        }
        let end = block_range(dl.partial.size(), k).end.min(range.end);
        match dl.read_span(pos..end).await {
            Ok(b) => {
                segment_len += b.len() as u64;
                segment.push(b);
            }
            Err(e) => {
                let _ = tx.send(Err(to_io(e))).await;
                return;
            }
        }
        pos = end;
        dl.advance(reader, end.div_ceil(BLOCK_BYTES));
    }
}

/// Fetches a whole item into the store, asking `sources` first (see
/// [`download_for`]).
pub(crate) async fn download(
    svc: &ContentService,
    id: &ContentId,
    sources: &[PeerId],
) -> Result<ContentInfo, ContentServiceError> {
    let held = {
        let id = *id;
        svc.blocking(move |svc| svc.inner.ctx.store.get(&id))
            .await??
    };
    if held.is_none() {
        let dl = download_for(svc, id, true, sources).await?;
        let mut outcome = dl.outcome.subscribe();
        loop {
            let now = outcome.borrow_and_update().clone();
            match now {
                Outcome::Complete => break,
                Outcome::Failed(e) => return Err(e),
                Outcome::Running => {}
            }
            if outcome.changed().await.is_err() {
                break;
            }
        }
    }
    svc.stat_from(id, sources).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_comes_from_the_pool_and_shrinks_to_a_unit_when_it_is_short() {
        // A pool of 1.5 MiB: one whole chunk, then what is left.
        let pool = Arc::new(Semaphore::new(24));
        let (n, first) = next_chunk(&pool, 10 << 20);
        assert_eq!((n, first.is_some()), (LOCAL_CHUNK, true));
        let (n, second) = next_chunk(&pool, 10 << 20);
        assert_eq!(
            (n, second.is_none()),
            (READ_AHEAD_UNIT, true),
            "8 units left"
        );
        // A ring: the largest power of two that fits, then a unit uncharged.
        let (ring, charge) = charge_buffer(&pool, 4 << 20);
        assert_eq!((ring, charge.is_some()), (512 << 10, true));
        assert_eq!(pool.available_permits(), 0);
        let (ring2, none) = charge_buffer(&pool, 4 << 20);
        assert_eq!((ring2, none.is_none()), (READ_AHEAD_UNIT, true));
        // A chunk's charge goes back when the last slice of it is dropped.
        drop(charge);
        let chunk = Bytes::from_owner(Charged {
            buf: vec![7; LOCAL_CHUNK as usize],
            _charge: first.expect("charged"),
        });
        let slice = chunk.slice(10..20);
        drop(chunk);
        assert_eq!(pool.available_permits(), 8);
        drop(slice);
        assert_eq!(pool.available_permits(), 24);
    }

    #[test]
    fn a_byte_range_maps_to_the_blocks_that_hold_it() {
        let size = 3 * BLOCK_BYTES + 10;
        assert_eq!(block_span(size, &(0..0)), 0..0);
        assert_eq!(block_span(size, &(0..1)), 0..1);
        assert_eq!(block_span(size, &(0..BLOCK_BYTES)), 0..1);
        assert_eq!(block_span(size, &(BLOCK_BYTES - 1..BLOCK_BYTES + 1)), 0..2);
        assert_eq!(block_span(size, &(0..size)), 0..4);
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 5..4;
        assert!(check_range(Some(backwards), size).is_err());
        assert!(check_range(Some(0..size + 1), size).is_err());
        assert_eq!(check_range(None, size).unwrap(), 0..size);
    }
}
