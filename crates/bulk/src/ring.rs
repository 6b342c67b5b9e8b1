//! A single-producer, single-consumer byte ring in a sealed memfd.
//!
//! The producer is the app's server (`p2pd` in host mode, the front-end in the
//! split platform); the consumer is the app. Each side only writes its own
//! words, and treats the other's as untrusted input: an index that does not
//! describe a valid ring state is a protocol error, never a panic or an
//! out-of-bounds access (every access goes through `vm-memory`'s
//! bounds-checked volatile slices).
//!
//! | offset | type | written by | meaning |
//! |---|---|---|---|
//! | 0x000 | u64 | creator | magic `"P2PVMBR1"` |
//! | 0x008 | u32 | creator | version (1) |
//! | 0x010 | u64 | creator | capacity: data bytes, a power of two |
//! | 0x040 | u64 | producer | head: bytes written since the start |
//! | 0x048 | u32 | producer | state: 0 open, 1 ended, 2 failed |
//! | 0x04c | u32 | producer | error code (an API `ErrorCode`, state 2) |
//! | 0x050 | u32 | producer | error text length (state 2) |
//! | 0x054 | u32 | producer | producer asleep: ring after moving the tail |
//! | 0x080 | u64 | consumer | tail: bytes read since the start |
//! | 0x088 | u32 | consumer | consumer asleep: ring after moving the head |
//! | 0x08c | u32 | consumer | consumer closed |
//! | 0x400 | ≤ 3 KiB | producer | error text (UTF-8) |
//! | 0x1000 | capacity | producer | stream byte *i* at `0x1000 + i mod capacity` |
//!
//! Doorbells are single bytes on the Unix connection the ring arrived on.
//! A side that finds nothing to do spins briefly, then sets its "asleep"
//! word, fences, checks once more and waits for a byte; the other side rings
//! only when it sees that word set (the same handshake as virtio's event
//! index), so a busy stream costs no system calls at all.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use rustix::fs::{MemfdFlags, SealFlags};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::UnixStream;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::BulkError;

/// Magic of a ring's header.
pub const MAGIC: u64 = u64::from_le_bytes(*b"P2PVMBR1");
/// Ring layout version.
pub const VERSION: u32 = 1;
/// Bytes before the data area.
pub const HEADER_BYTES: u64 = 4096;
/// Smallest data area.
pub const MIN_CAPACITY: u64 = 64 * 1024;
/// Largest data area (an app asks for the size; the server pays for it).
pub const MAX_CAPACITY: u64 = 16 << 20;
/// Data area when the app does not ask for a size.
pub const DEFAULT_CAPACITY: u64 = 4 << 20;
/// Longest error text a failed ring carries.
pub const MAX_ERROR_BYTES: usize = 3072;

/// How long a side polls the other's index before it goes to sleep. Short:
/// on two cores a spinning side takes the CPU its peer needs.
const SPIN: Duration = Duration::from_micros(20);

mod field {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x008;
    pub const CAPACITY: usize = 0x010;
    pub const HEAD: usize = 0x040;
    pub const STATE: usize = 0x048;
    pub const ERROR_CODE: usize = 0x04c;
    pub const ERROR_LEN: usize = 0x050;
    pub const PRODUCER_ASLEEP: usize = 0x054;
    pub const TAIL: usize = 0x080;
    pub const CONSUMER_ASLEEP: usize = 0x088;
    pub const CONSUMER_CLOSED: usize = 0x08c;
    pub const ERROR_TEXT: usize = 0x400;
}

const OPEN: u32 = 0;
const ENDED: u32 = 1;
const FAILED: u32 = 2;

/// The data area a request for `requested` bytes gets: the default for 0,
/// else rounded up to a power of two within the bounds.
pub fn capacity_for(requested: u64) -> u64 {
    if requested == 0 {
        return DEFAULT_CAPACITY;
    }
    requested
        .clamp(MIN_CAPACITY, MAX_CAPACITY)
        .next_power_of_two()
        .min(MAX_CAPACITY)
}

/// One mapping of a ring.
#[derive(Debug)]
pub struct Ring {
    map: MmapRegion<()>,
    file: File,
    capacity: u64,
}

fn map(file: &File, size: u64) -> Result<MmapRegion<()>, BulkError> {
    let file = file.try_clone()?;
    MmapRegion::from_file(FileOffset::new(file, 0), size as usize)
        .map_err(|e| BulkError::Io(io::Error::other(e.to_string())))
}

impl Ring {
    /// A fresh ring of `capacity` data bytes (see [`capacity_for`]) in a memfd
    /// sealed against resizing, so the app cannot shrink it under our mapping.
    pub fn create(capacity: u64) -> Result<Self, BulkError> {
        let capacity = capacity_for(capacity);
        let fd = rustix::fs::memfd_create(
            "p2pvm-bulk",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(io::Error::from)?;
        let file = File::from(fd);
        file.set_len(HEADER_BYTES + capacity)?;
        rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(io::Error::from)?;
        let map = map(&file, HEADER_BYTES + capacity)?;
        let ring = Self {
            map,
            file,
            capacity,
        };
        ring.u64_at(field::MAGIC).store(MAGIC, Ordering::Relaxed);
        ring.u32_at(field::VERSION)
            .store(VERSION, Ordering::Relaxed);
        ring.u64_at(field::CAPACITY)
            .store(capacity, Ordering::Release);
        Ok(ring)
    }

    /// Maps a ring someone else created. Its header is trusted only as far as
    /// it describes a ring that fits the (sealed) file.
    pub fn open(file: File) -> Result<Self, BulkError> {
        let seals = rustix::fs::fcntl_get_seals(&file).map_err(io::Error::from)?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(BulkError::protocol(
                "the ring is not sealed against shrinking",
            ));
        }
        let len = file.metadata()?.len();
        if len < HEADER_BYTES {
            return Err(BulkError::protocol(format!("a ring of {len} bytes")));
        }
        let map = map(&file, len)?;
        let mut ring = Self {
            map,
            file,
            capacity: 0,
        };
        let magic = ring.u64_at(field::MAGIC).load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(BulkError::protocol(format!("bad ring magic {magic:#x}")));
        }
        let version = ring.u32_at(field::VERSION).load(Ordering::Acquire);
        if version != VERSION {
            return Err(BulkError::protocol(format!(
                "ring version {version}, this build speaks {VERSION}"
            )));
        }
        let capacity = ring.u64_at(field::CAPACITY).load(Ordering::Acquire);
        if !capacity.is_power_of_two()
            || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity)
            || HEADER_BYTES + capacity > len
        {
            return Err(BulkError::protocol(format!(
                "ring capacity {capacity} does not fit a file of {len} bytes"
            )));
        }
        ring.capacity = capacity;
        Ok(ring)
    }

    /// The memfd, to hand to the consumer.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Data bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.map
            .get_atomic_ref(off)
            .expect("header words are aligned and inside the header page")
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        self.map
            .get_atomic_ref(off)
            .expect("header words are aligned and inside the header page")
    }

    /// Data-area segments holding stream bytes `pos..pos + len` (`len` at most
    /// the capacity): one, or two where the range wraps.
    fn segments(&self, pos: u64, len: usize) -> [(usize, usize); 2] {
        let at = (pos & (self.capacity - 1)) as usize;
        let first = len.min(self.capacity as usize - at);
        [
            (HEADER_BYTES as usize + at, first),
            (HEADER_BYTES as usize, len - first),
        ]
    }

    fn copy_in(&self, pos: u64, data: &[u8]) {
        let mut done = 0;
        for (off, n) in self.segments(pos, data.len()) {
            if n > 0 {
                self.map
                    .as_volatile_slice()
                    .write_slice(&data[done..done + n], off)
                    .expect("segments lie inside the data area");
                done += n;
            }
        }
    }

    fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        let mut done = 0;
        for (off, n) in self.segments(pos, dst.len()) {
            if n > 0 {
                self.map
                    .as_volatile_slice()
                    .read_slice(&mut dst[done..done + n], off)
                    .expect("segments lie inside the data area");
                done += n;
            }
        }
    }

    fn error(&self) -> BulkError {
        let code = self.u32_at(field::ERROR_CODE).load(Ordering::Acquire);
        let len =
            (self.u32_at(field::ERROR_LEN).load(Ordering::Acquire) as usize).min(MAX_ERROR_BYTES);
        let mut text = vec![0u8; len];
        // The text lies inside the header page, whatever `len` claimed.
        let _ = self
            .map
            .as_volatile_slice()
            .read_slice(&mut text, field::ERROR_TEXT);
        BulkError::Failed {
            code,
            message: String::from_utf8_lossy(&text).into_owned(),
        }
    }
}

/// A doorbell: one byte on the ring's Unix connection. Its end is the other
/// side's end.
#[derive(Debug)]
struct Bell(UnixStream);

impl Bell {
    fn ring(&self) {
        // Straight to the (non-blocking) socket: tokio's `try_write` would
        // skip the call while its cached readiness says "not writable". A full
        // socket buffer means the peer has plenty of rings pending; a broken
        // one shows up when we next wait. NOSIGNAL: ringing a peer that just
        // closed (the normal end of a stream) must not raise SIGPIPE in an
        // app that kept its default handler.
        let _ = rustix::net::send(
            &self.0,
            &[1],
            rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT,
        );
    }

    fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<Result<(), BulkError>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let mut sink = [0u8; 64];
            match self.0.try_read(&mut sink) {
                Ok(0) => return Poll::Ready(Err(BulkError::PeerGone)),
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    async fn wait(&self) -> Result<(), BulkError> {
        std::future::poll_fn(|cx| self.poll_wait(cx)).await
    }
}

/// The producer's end: copies stream bytes in, then ends or fails the stream.
#[derive(Debug)]
pub struct RingWriter {
    ring: Arc<Ring>,
    bell: Bell,
    /// Our own copy of the head: the shared word is never read back.
    head: u64,
    /// Bytes were written since the reader was last told (see
    /// [`RingWriter::write_batched`]).
    unannounced: bool,
}

impl RingWriter {
    /// The producer end of `ring`, whose doorbells ride `conn`.
    pub fn new(ring: Ring, conn: UnixStream) -> Self {
        Self {
            ring: Arc::new(ring),
            bell: Bell(conn),
            head: 0,
            unannounced: false,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.head
    }

    /// Free bytes, `None` when full; checks what the consumer wrote.
    fn free(&self) -> Result<Option<usize>, BulkError> {
        if self
            .ring
            .u32_at(field::CONSUMER_CLOSED)
            .load(Ordering::Acquire)
            != 0
        {
            return Err(BulkError::Closed);
        }
        let tail = self.ring.u64_at(field::TAIL).load(Ordering::Acquire);
        let used = self.head.wrapping_sub(tail);
        if used > self.ring.capacity {
            return Err(BulkError::protocol(format!(
                "the reader's index {tail} is not within the {} bytes written",
                self.head
            )));
        }
        Ok((used < self.ring.capacity).then(|| (self.ring.capacity - used) as usize))
    }

    async fn space(&mut self) -> Result<usize, BulkError> {
        let start = Instant::now();
        loop {
            if let Some(n) = self.free()? {
                return Ok(n);
            }
            // A full ring waits for the reader: it must know what is there.
            self.announce();
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let asleep = self.ring.u32_at(field::PRODUCER_ASLEEP);
            asleep.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(n) = self.free()? {
                asleep.store(0, Ordering::Relaxed);
                return Ok(n);
            }
            self.bell.wait().await?;
        }
    }

    fn wake_reader(&self) {
        fence(Ordering::SeqCst);
        if self
            .ring
            .u32_at(field::CONSUMER_ASLEEP)
            .swap(0, Ordering::SeqCst)
            != 0
        {
            self.bell.ring();
        }
    }

    /// Copies all of `data` in, waiting for the reader to make room, and
    /// tells the reader.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), BulkError> {
        self.write_batched(data).await?;
        self.announce();
        Ok(())
    }

    /// Copies all of `data` in like [`write_all`](Self::write_all), but a
    /// sleeping reader is only woken by [`announce`](Self::announce) (or when
    /// the ring fills). For a producer that receives its bytes in batches of
    /// many pieces: waking the reader for each piece makes the two sides take
    /// turns piece by piece where they share a CPU — measured in the client
    /// VM, one context switch per 64 KiB, each one a TLB flush under the
    /// emulator.
    pub async fn write_batched(&mut self, mut data: &[u8]) -> Result<(), BulkError> {
        while !data.is_empty() {
            let n = self.space().await?.min(data.len());
            self.ring.copy_in(self.head, &data[..n]);
            self.head += n as u64;
            self.ring
                .u64_at(field::HEAD)
                .store(self.head, Ordering::Release);
            self.unannounced = true;
            data = &data[n..];
        }
        Ok(())
    }

    /// Wakes the reader if it sleeps and bytes were written since it was
    /// last told.
    pub fn announce(&mut self) {
        if std::mem::take(&mut self.unannounced) {
            self.wake_reader();
        }
    }

    /// Resolves when the reader has gone (closed the ring or its connection),
    /// for producers that wait on something else in between writes.
    pub async fn reader_gone(&self) -> BulkError {
        loop {
            if self
                .ring
                .u32_at(field::CONSUMER_CLOSED)
                .load(Ordering::Acquire)
                != 0
            {
                return BulkError::Closed;
            }
            if let Err(e) = self.bell.wait().await {
                return e;
            }
        }
    }

    /// Ends the stream cleanly: the reader gets everything written, then EOF.
    pub fn finish(self) {
        self.ring
            .u32_at(field::STATE)
            .store(ENDED, Ordering::Release);
        self.wake_reader();
    }

    /// Ends the stream with an error (`code` is an API `ErrorCode`); the reader
    /// gets what was written, then the error.
    pub fn fail(self, code: u32, message: &str) {
        let mut end = message.len().min(MAX_ERROR_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let text = &message.as_bytes()[..end];
        self.ring
            .map
            .as_volatile_slice()
            .write_slice(text, field::ERROR_TEXT)
            .expect("the error text fits the header page");
        self.ring
            .u32_at(field::ERROR_CODE)
            .store(code, Ordering::Relaxed);
        self.ring
            .u32_at(field::ERROR_LEN)
            .store(text.len() as u32, Ordering::Relaxed);
        self.ring
            .u32_at(field::STATE)
            .store(FAILED, Ordering::Release);
        self.wake_reader();
    }
}

/// The app's end: a `tokio::io::AsyncRead` of the stream's bytes.
#[derive(Debug)]
pub struct RingReader {
    ring: Arc<Ring>,
    bell: Bell,
    tail: u64,
    /// When the current wait for data began (spinning, then sleeping).
    waiting_since: Option<Instant>,
    /// The producer's connection ended: nothing more will be written.
    producer_gone: bool,
}

/// What one look at the ring found.
enum Look {
    Copied,
    Eof,
    Empty,
}

impl RingReader {
    /// The consumer end of `ring`, whose doorbells ride `conn`.
    pub fn new(ring: Ring, conn: UnixStream) -> Self {
        Self {
            ring: Arc::new(ring),
            bell: Bell(conn),
            tail: 0,
            waiting_since: None,
            producer_gone: false,
        }
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.tail
    }

    fn look(&mut self, buf: &mut ReadBuf<'_>) -> Result<Look, BulkError> {
        loop {
            let head = self.ring.u64_at(field::HEAD).load(Ordering::Acquire);
            let avail = head.wrapping_sub(self.tail);
            if avail > self.ring.capacity {
                return Err(BulkError::protocol(format!(
                    "the writer's index {head} is not within a ring from {}",
                    self.tail
                )));
            }
            if avail > 0 {
                let n = (avail as usize).min(buf.remaining());
                let dst = buf.initialize_unfilled_to(n);
                self.ring.copy_out(self.tail, &mut dst[..n]);
                buf.advance(n);
                self.tail += n as u64;
                self.ring
                    .u64_at(field::TAIL)
                    .store(self.tail, Ordering::Release);
                fence(Ordering::SeqCst);
                if self
                    .ring
                    .u32_at(field::PRODUCER_ASLEEP)
                    .swap(0, Ordering::SeqCst)
                    != 0
                {
                    self.bell.ring();
                }
                return Ok(Look::Copied);
            }
            let state = self.ring.u32_at(field::STATE).load(Ordering::Acquire);
            // The head is written before the state: one more look at it
            // decides whether bytes slipped in between the two loads.
            if state != OPEN && self.ring.u64_at(field::HEAD).load(Ordering::Acquire) != head {
                continue;
            }
            return match state {
                OPEN if self.producer_gone => Err(BulkError::PeerGone),
                OPEN => Ok(Look::Empty),
                ENDED => Ok(Look::Eof),
                FAILED => Err(self.ring.error()),
                other => Err(BulkError::protocol(format!("ring state {other}"))),
            };
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.look(buf)? {
                Look::Copied | Look::Eof => {
                    self.waiting_since = None;
                    return Poll::Ready(Ok(()));
                }
                Look::Empty => {}
            }
            let since = *self.waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let ring = self.ring.clone();
            let asleep = ring.u32_at(field::CONSUMER_ASLEEP);
            asleep.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !matches!(self.look(buf)?, Look::Empty) {
                asleep.store(0, Ordering::Relaxed);
                self.waiting_since = None;
                return Poll::Ready(Ok(()));
            }
            match ready!(self.bell.poll_wait(cx)) {
                Ok(()) => {}
                // Whatever it wrote before going is still ours to read.
                Err(BulkError::PeerGone) => self.producer_gone = true,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl AsyncRead for RingReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        self.get_mut().poll_fill(cx, buf)
    }
}

impl Drop for RingReader {
    fn drop(&mut self) {
        self.ring
            .u32_at(field::CONSUMER_CLOSED)
            .store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        self.bell.ring();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn pair(capacity: u64) -> (RingWriter, RingReader) {
        let ring = Ring::create(capacity).unwrap();
        let theirs = Ring::open(ring.file().try_clone().unwrap()).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        (RingWriter::new(ring, a), RingReader::new(theirs, b))
    }

    #[test]
    fn capacities_are_bounded_powers_of_two() {
        assert_eq!(capacity_for(0), DEFAULT_CAPACITY);
        assert_eq!(capacity_for(1), MIN_CAPACITY);
        assert_eq!(capacity_for(100_000), 128 * 1024);
        assert_eq!(capacity_for(u64::MAX), MAX_CAPACITY);
    }

    #[tokio::test]
    async fn bytes_cross_the_wrap_in_order_then_eof() {
        let (mut w, mut r) = pair(MIN_CAPACITY);
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = data.clone();
        let producer = tokio::spawn(async move {
            // Odd sizes, so writes straddle the wrap point.
            for piece in data.chunks(40_009) {
                w.write_all(piece).await.unwrap();
            }
            w.finish();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        producer.await.unwrap();
        assert_eq!(got, expect);
    }

    /// Doorbell bytes waiting on the reader's end of the connection.
    fn bells_pending(r: &RingReader) -> usize {
        let mut sink = [0u8; 64];
        r.bell.0.try_read(&mut sink).unwrap_or(0)
    }

    #[tokio::test]
    async fn batched_writes_wake_a_sleeping_reader_once_when_announced() {
        let (mut w, r) = pair(MIN_CAPACITY);
        // The reader has gone to sleep on an empty ring.
        r.ring
            .u32_at(field::CONSUMER_ASLEEP)
            .store(1, Ordering::SeqCst);
        for _ in 0..4 {
            w.write_batched(&[7; 1000]).await.unwrap();
        }
        assert_eq!(bells_pending(&r), 0, "no doorbell before the batch ends");
        w.announce();
        w.announce();
        tokio::task::yield_now().await;
        assert_eq!(bells_pending(&r), 1, "one doorbell for the whole batch");
        // `write_all` still tells the reader at once.
        r.ring
            .u32_at(field::CONSUMER_ASLEEP)
            .store(1, Ordering::SeqCst);
        w.write_all(&[8; 10]).await.unwrap();
        assert_eq!(bells_pending(&r), 1);
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_ring_wakes_the_reader_when_it_fills() {
        let (mut w, mut r) = pair(MIN_CAPACITY);
        let data: Vec<u8> = (0..5 * MIN_CAPACITY as u32 + 17)
            .map(|i| (i % 253) as u8)
            .collect();
        let expect = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.map(|_| got)
        });
        // Let the reader find the ring empty and go to sleep first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        tokio::time::timeout(Duration::from_secs(5), w.write_batched(&data))
            .await
            .expect("a full ring wakes the reader; the writer does not wait forever")
            .unwrap();
        w.finish();
        let got = reader.await.unwrap().unwrap();
        assert_eq!(got, expect);
    }

    #[tokio::test]
    async fn a_failure_arrives_after_the_bytes_before_it() {
        let (mut w, mut r) = pair(0);
        w.write_all(b"partial").await.unwrap();
        w.fail(13, "malware detected: Eicar-Signature");
        let mut got = [0u8; 7];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"partial");
        let e = r.read_u8().await.unwrap_err();
        let inner = e.into_inner().unwrap().downcast::<BulkError>().unwrap();
        assert!(
            matches!(*inner, BulkError::Failed { code: 13, ref message } if message.contains("Eicar")),
            "{inner:?}"
        );
    }

    #[tokio::test]
    async fn a_vanished_producer_is_an_error_not_an_end() {
        let (mut w, mut r) = pair(0);
        w.write_all(b"abc").await.unwrap();
        drop(w);
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(got, b"abc", "bytes written before are still delivered");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_closed_reader_stops_a_blocked_writer() {
        let (mut w, r) = pair(MIN_CAPACITY);
        let big = vec![0u8; 4 * MIN_CAPACITY as usize];
        let writer = tokio::spawn(async move { w.write_all(&big).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(r);
        let e = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer wakes")
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(e, BulkError::Closed | BulkError::PeerGone),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_reader_index_out_of_bounds_is_a_protocol_error() {
        let (mut w, r) = pair(MIN_CAPACITY);
        w.write_all(&[1; 100]).await.unwrap();
        // A hostile app moves its tail past what was written.
        r.ring.u64_at(field::TAIL).store(5_000, Ordering::Release);
        let e = w.write_all(&[2; 10]).await.unwrap_err();
        assert!(matches!(e, BulkError::Protocol(_)), "{e:?}");
        drop(r);
    }

    #[tokio::test]
    async fn a_writer_index_out_of_bounds_is_an_error_not_a_panic() {
        let (w, mut r) = pair(MIN_CAPACITY);
        w.ring
            .u64_at(field::HEAD)
            .store(10 * MIN_CAPACITY, Ordering::Release);
        let e = r.read_u8().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn refuses_unsealed_or_foreign_files() {
        let fd = rustix::fs::memfd_create("x", MemfdFlags::ALLOW_SEALING).unwrap();
        let f = File::from(fd);
        f.set_len(HEADER_BYTES + MIN_CAPACITY).unwrap();
        let e = Ring::open(f.try_clone().unwrap()).unwrap_err();
        assert!(e.to_string().contains("sealed"), "{e}");
        rustix::fs::fcntl_add_seals(&f, SealFlags::SHRINK).unwrap();
        let e = Ring::open(f).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn the_size_is_sealed() {
        let ring = Ring::create(0).unwrap();
        assert!(ring.file().set_len(HEADER_BYTES).is_err());
    }
}
