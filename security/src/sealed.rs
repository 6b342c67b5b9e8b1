//! Sealed frames: the content fast path's record layer once its TLS 1.3
//! handshake ([`crate::peer_tls`] or [`crate::group_tls`]) is done. p2pd's
//! fast path dials and accepts the TCP connections; this module keys them
//! and carries every byte after the handshake.
//!
//! ```text
//!  frame = [ u32 BE: n ][ n - 16 bytes of AES-128-GCM ciphertext ][ 16-byte tag ]
//!  nonce = iv XOR frame counter (per direction, from 0)    aad = the length prefix
//! ```
//!
//! The handshake authenticates both peers (libp2p certificates, see
//! `fastpath`) and, through TLS's exporter (RFC 8446 §7.5), gives each
//! direction its own key and nonce base; after it, the TLS session carries
//! nothing more. Why not TLS records: they hold at most 16 KiB, and rustls
//! reads the socket 4 KiB at a time and copies each record's plaintext twice
//! more; a block payload here is one frame, read from the socket into the
//! buffer it is decrypted in, verified in, and handed to readers from. The
//! counter makes every nonce unique and rejects a replayed, reordered or
//! dropped frame (it fails authentication); a direction stops after
//! [`BYTES_PER_KEY`], well inside AES-GCM's limits, and the downloader dials
//! again.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWrite as _;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use p2pvm_content::transfer;

const TAG: usize = 16;
const KEY: usize = 16;
const IV: usize = 12;
/// Exporter label; both ends derive the same 56 bytes from the handshake.
const LABEL: &[u8] = b"EXPORTER-p2pvm-content-sealed-frames-v1";
/// The largest plaintext a frame may carry: the largest payload, with room
/// for the messages around it.
pub const MAX_FRAME: usize = transfer::MAX_PAYLOAD_BYTES as usize + 64 * 1024;
/// Small writes (requests, answer headers) are gathered into one frame up to
/// this size.
const GATHER: usize = 64 * 1024;
/// Sealed bytes a writer queues before writing them out.
const QUEUE: usize = 1024 * 1024;
/// Bytes one direction may seal with one key; then the connection ends.
pub const BYTES_PER_KEY: u64 = 1 << 36;
/// How far a read may run past the frame in progress: what lands beyond it
/// is copied once the frame is split off.
const READ_AHEAD: usize = 4096;
/// The first frame, from the provider: the client sends nothing before it,
/// so no request can be swallowed by the TLS session's read buffer.
const HELLO: &[u8] = b"p2pvm sealed frames v1";

/// One direction's key and frame counter.
struct Direction {
    key: LessSafeKey,
    iv: [u8; IV],
    counter: u64,
    sealed: u64,
}

impl Direction {
    fn new(material: &[u8]) -> Self {
        let (key, iv) = material.split_at(KEY);
        Self {
            key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, key).expect("16-byte key")),
            iv: iv.try_into().expect("12-byte iv"),
            counter: 0,
            sealed: 0,
        }
    }

    fn nonce(&mut self, len: usize) -> io::Result<Nonce> {
        self.sealed += len as u64;
        if self.sealed > BYTES_PER_KEY {
            return Err(io::Error::other(
                "sealed-frame key used up; the connection must be dialled again",
            ));
        }
        let mut n = self.iv;
        for (b, c) in n[IV - 8..].iter_mut().zip(self.counter.to_be_bytes()) {
            *b ^= c;
        }
        self.counter += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

impl Direction {
    /// Seals `plain` in place as one frame: its length prefix, the
    /// ciphertext (in `plain`'s buffer) and the tag.
    fn seal(&mut self, mut plain: Vec<u8>) -> io::Result<([u8; 4], Vec<u8>, [u8; TAG])> {
        let n = plain.len() + TAG;
        let prefix = (n as u32).to_be_bytes();
        let nonce = self.nonce(n)?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(prefix), &mut plain)
            .map_err(|_| io::Error::other("sealing failed"))?;
        let tag: [u8; TAG] = tag.as_ref().try_into().expect("16-byte tag");
        Ok((prefix, plain, tag))
    }
}

/// Which end of the handshake this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downloader, which dialled.
    Client,
    /// The provider, which accepted and speaks first.
    Server,
}

/// Turns a finished TLS connection into sealed-frame halves. The provider
/// (server) sends a fixed hello frame first; the client waits for it before sending.
pub async fn establish(
    tcp: tokio::net::TcpStream,
    session: &rustls::ConnectionCommon<impl rustls::SideData>,
    side: Side,
) -> io::Result<(SealedReader, SealedWriter)> {
    let material = session
        .export_keying_material([0u8; MATERIAL], LABEL, None)
        .map_err(io::Error::other)?;
    let (mut reader, mut writer) = halves(tcp, &material, side);
    match side {
        Side::Server => {
            writer.write_payload(HELLO.to_vec()).await?;
            writer.drain().await?;
        }
        Side::Client => {
            let hello = reader.read_bytes(HELLO.len()).await?;
            if hello != HELLO || !reader.plain.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the provider did not open sealed frames",
                ));
            }
        }
    }
    Ok((reader, writer))
}

const MATERIAL: usize = 2 * (KEY + IV);

/// The two halves over `tcp`, keyed from the exported `material`.
fn halves(
    tcp: tokio::net::TcpStream,
    material: &[u8; MATERIAL],
    side: Side,
) -> (SealedReader, SealedWriter) {
    let (c2s, s2c) = material.split_at(KEY + IV);
    let (tx, rx) = match side {
        Side::Client => (c2s, s2c),
        Side::Server => (s2c, c2s),
    };
    let (r, w) = tcp.into_split();
    let reader = SealedReader {
        tcp: r,
        opener: Opener::new(rx, side),
        plain: Bytes::new(),
        failed: None,
    };
    let writer = SealedWriter {
        tcp: w,
        dir: Direction::new(tx),
        gather: Vec::new(),
        queue: VecDeque::new(),
        queued: 0,
    };
    (reader, writer)
}

/// The receiving half: frames are read into the buffer they are opened in,
/// and [`SealedReader::read_bytes`] hands out slices of it.
pub struct SealedReader {
    tcp: OwnedReadHalf,
    opener: Opener,
    /// Opened plaintext not yet consumed.
    plain: Bytes,
    /// The first error, returned from then on: a frame that failed is gone
    /// from `raw`, and reading past it would hide that it was dropped.
    failed: Option<(io::ErrorKind, String)>,
}

impl std::fmt::Debug for SealedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedReader")
            .field("frames", &self.opener.dir.counter)
            .field("buffered", &(self.opener.raw.len() + self.plain.len()))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SealedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedWriter")
            .field("frames", &self.dir.counter)
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

/// A frame that does not authenticate, or a length that cannot be: anyone on
/// the path can cause it, so it is reported as the connection breaking, not
/// as the peer misbehaving (which `InvalidData` would mean to its callers).
fn broken(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, msg.to_string())
}

/// Opens frames out of received bytes: the reader's part that has no
/// socket, so that any bytes can be pushed through it (the fuzz target).
struct Opener {
    /// The largest plaintext the other side may send in a frame.
    max_frame: usize,
    dir: Direction,
    /// Received bytes not yet opened.
    raw: BytesMut,
}

impl Opener {
    fn new(material: &[u8], side: Side) -> Self {
        Self {
            // A provider reads requests, which are small: a client cannot make
            // it buffer a block-sized frame per connection.
            max_frame: match side {
                Side::Client => MAX_FRAME,
                Side::Server => GATHER,
            },
            dir: Direction::new(material),
            raw: BytesMut::new(),
        }
    }

    /// The length of the frame at the front of `raw`, once its prefix is in.
    fn next_len(&self) -> io::Result<Option<usize>> {
        let Some(prefix) = self.raw.get(..4) else {
            return Ok(None);
        };
        let n = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if !(TAG..=self.max_frame + TAG).contains(&n) {
            return Err(broken("sealed frame of an impossible length"));
        }
        Ok(Some(n))
    }

    /// How many bytes to read next: the rest of this frame (one allocation
    /// per frame, the buffer the payload stays in), and a little beyond it.
    fn want(&self) -> io::Result<usize> {
        Ok(match self.next_len()? {
            Some(n) => (4 + n).saturating_sub(self.raw.len()) + READ_AHEAD,
            None => READ_AHEAD,
        })
    }

    /// Opens the frame at the front of `raw` if it is complete.
    fn open(&mut self) -> io::Result<Option<Bytes>> {
        let Some(n) = self.next_len()? else {
            return Ok(None);
        };
        if self.raw.len() < 4 + n {
            return Ok(None);
        }
        let mut frame = self.raw.split_to(4 + n);
        let aad: [u8; 4] = frame[..4].try_into().expect("4 bytes");
        let nonce = self.dir.nonce(n)?;
        let plain = self
            .dir
            .key
            .open_in_place(nonce, Aad::from(aad), &mut frame[4..])
            .map_err(|_| broken("sealed frame fails authentication"))?
            .len();
        frame.advance(4);
        frame.truncate(plain);
        Ok(Some(frame.freeze()))
    }
}

impl SealedReader {
    /// Makes `plain` non-empty; `false` at a clean end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if let Some((kind, msg)) = &self.failed {
            return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
        }
        let r = ready!(self.poll_fill_inner(cx));
        if let Err(e) = &r {
            self.failed = Some((e.kind(), e.to_string()));
        }
        Poll::Ready(r)
    }

    fn poll_fill_inner(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.plain.is_empty() {
            if let Some(plain) = self.opener.open()? {
                self.plain = plain;
                continue;
            }
            let want = self.opener.want()?;
            let raw = &mut self.opener.raw;
            raw.reserve(want);
            let mut limited = raw.limit(want);
            let got = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.tcp),
                cx,
                &mut limited
            ))?;
            if got == 0 {
                return Poll::Ready(if self.opener.raw.is_empty() {
                    Ok(false)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a sealed frame",
                    ))
                });
            }
        }
        Poll::Ready(Ok(true))
    }

    /// Reads exactly `n` bytes. A payload sent as a frame of its own (as
    /// providers send them) is that frame's buffer, uncopied; bytes that share
    /// a frame with more are copied out, so a peer cannot make a small
    /// payload pin a large frame.
    pub async fn read_bytes(&mut self, n: usize) -> io::Result<Bytes> {
        let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended early");
        if n == 0 {
            return Ok(Bytes::new());
        }
        if !std::future::poll_fn(|cx| self.poll_fill(cx)).await? {
            return Err(eof());
        }
        if self.plain.len() == n {
            return Ok(std::mem::take(&mut self.plain));
        }
        if self.plain.len() > n {
            return Ok(Bytes::copy_from_slice(&self.plain.split_to(n)));
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            if !std::future::poll_fn(|cx| self.poll_fill(cx)).await? {
                return Err(eof());
            }
            let take = self.plain.len().min(n - out.len());
            out.extend_from_slice(&self.plain.split_to(take));
        }
        Ok(out.freeze())
    }
}

impl futures::AsyncRead for SealedReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if !ready!(this.poll_fill(cx))? {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(this.plain.len());
        buf[..n].copy_from_slice(&this.plain.split_to(n));
        Poll::Ready(Ok(n))
    }
}

/// The sending half: small writes are gathered into a frame sealed at
/// flush; [`SealedWriter::write_payload`] seals a payload in its own buffer.
pub struct SealedWriter {
    tcp: OwnedWriteHalf,
    dir: Direction,
    /// Plaintext of small writes, not yet sealed.
    gather: Vec<u8>,
    /// Sealed bytes not yet written.
    queue: VecDeque<Bytes>,
    queued: usize,
}

impl SealedWriter {
    /// Seals `plain` in place as one frame and queues it.
    fn seal(&mut self, plain: Vec<u8>) -> io::Result<()> {
        let (prefix, sealed, tag) = self.dir.seal(plain)?;
        self.queued += 4 + sealed.len() + TAG;
        self.queue.push_back(Bytes::copy_from_slice(&prefix));
        self.queue.push_back(Bytes::from(sealed));
        self.queue.push_back(Bytes::copy_from_slice(&tag));
        Ok(())
    }

    fn seal_gathered(&mut self) -> io::Result<()> {
        if self.gather.is_empty() {
            return Ok(());
        }
        let plain = std::mem::take(&mut self.gather);
        self.seal(plain)
    }

    /// Writes queued frames until none is left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let mut iov = [IoSlice::new(&[]); 64];
            let mut k = 0;
            for (slot, b) in iov.iter_mut().zip(self.queue.iter()) {
                *slot = IoSlice::new(b);
                k += 1;
            }
            let mut n = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, &iov[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queued -= n;
            while n > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if n >= front.len() {
                    n -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    async fn drain(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await
    }

    /// Sends `payload` as a frame of its own, sealed where it lies (after
    /// whatever smaller writes came before it).
    pub async fn write_payload(&mut self, payload: Vec<u8>) -> io::Result<()> {
        if payload.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "payload larger than a sealed frame",
            ));
        }
        self.seal_gathered()?;
        self.seal(payload)?;
        if self.queued >= QUEUE {
            self.drain().await?;
        }
        Ok(())
    }
}

impl futures::AsyncWrite for SealedWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.gather.len() >= GATHER {
            this.seal_gathered()?;
        }
        if this.queued >= QUEUE {
            ready!(this.poll_drain(cx))?;
        }
        let n = buf.len().min(GATHER - this.gather.len());
        this.gather.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.seal_gathered()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The opener and the sealer without sockets, for the fuzz target's body
/// (p2pd's `content::fuzzing::sealed_frames`).
#[doc(hidden)]
pub mod fuzz_opener {
    use super::*;

    /// Key material both ends of the fuzzed direction share.
    const MATERIAL: [u8; KEY + IV] = [0x5a; KEY + IV];

    /// `frames` sealed as a provider sends them, back to back.
    pub fn seal_all(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut dir = Direction::new(&MATERIAL);
        let mut out = Vec::new();
        for f in frames {
            let (prefix, sealed, tag) = dir.seal(f.clone()).expect("within the key's budget");
            out.extend_from_slice(&prefix);
            out.extend_from_slice(&sealed);
            out.extend_from_slice(&tag);
        }
        out
    }

    /// Opens `stream` arriving `piece` bytes at a time: every plaintext, or
    /// those opened before the first error and the error.
    #[allow(clippy::type_complexity)]
    pub fn open_all(
        stream: &[u8],
        piece: usize,
    ) -> Result<Vec<Vec<u8>>, (Vec<Vec<u8>>, io::Error)> {
        let mut opener = Opener::new(&MATERIAL, Side::Client);
        let mut got = Vec::new();
        for chunk in stream.chunks(piece.max(1)) {
            opener.raw.extend_from_slice(chunk);
            loop {
                match opener.open() {
                    Ok(Some(plain)) => got.push(plain.to_vec()),
                    Ok(None) => break,
                    Err(e) => return Err((got, e)),
                }
            }
            if let Err(e) = opener.want() {
                return Err((got, e));
            }
        }
        if opener.raw.is_empty() {
            Ok(got)
        } else {
            Err((got, io::ErrorKind::UnexpectedEof.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    /// Exported material, distinct for each direction as the exporter's is.
    const KEYS: [u8; MATERIAL] = {
        let mut m = [0u8; MATERIAL];
        let mut i = 0;
        while i < MATERIAL {
            m[i] = (i * 37 + 11) as u8;
            i += 1;
        }
        m
    };

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn messages_and_payloads_round_trip_and_payloads_stay_whole() {
        // Payloads flow from the provider (server) to the downloader.
        let (a, b) = tcp_pair().await;
        let (_, mut tx) = halves(a, &KEYS, Side::Server);
        let (mut rx, _) = halves(b, &KEYS, Side::Client);
        let big = payload(3 << 20);
        let sender = {
            let big = big.clone();
            tokio::spawn(async move {
                for round in 0..3u8 {
                    tx.write_all(&[round; 5]).await.unwrap();
                    tx.write_payload(big.clone()).await.unwrap();
                }
                tx.close().await.unwrap();
            })
        };
        for round in 0..3u8 {
            let mut head = [0u8; 5];
            rx.read_exact(&mut head).await.unwrap();
            assert_eq!(head, [round; 5]);
            let got = rx.read_bytes(big.len()).await.unwrap();
            assert_eq!(&got[..], &big[..]);
        }
        let mut rest = Vec::new();
        rx.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        sender.await.unwrap();
    }

    /// Bytes between a writer and a reader, as an attacker on the path may
    /// change them; the reader must fail, never deliver altered bytes.
    async fn through(wire: Vec<u8>) -> io::Result<Vec<u8>> {
        let (a, b) = tcp_pair().await;
        let (mut rx, _) = halves(b, &KEYS, Side::Server);
        let (_r, mut w) = a.into_split();
        w.write_all(&wire).await.unwrap();
        w.shutdown().await.unwrap();
        let mut out = Vec::new();
        rx.read_to_end(&mut out).await.map(|_| out)
    }

    async fn sealed_frames(frames: &[&[u8]]) -> Vec<u8> {
        let (a, mut b) = tcp_pair().await;
        let (_, mut tx) = halves(a, &KEYS, Side::Client);
        for f in frames {
            tx.write_payload(f.to_vec()).await.unwrap();
        }
        tx.close().await.unwrap();
        let mut wire = Vec::new();
        b.read_to_end(&mut wire).await.unwrap();
        wire
    }

    #[tokio::test]
    async fn altered_reordered_replayed_or_cut_frames_are_refused() {
        let one = sealed_frames(&[b"first frame", b"second frame"]).await;
        assert_eq!(
            through(one.clone()).await.unwrap(),
            b"first framesecond frame"
        );
        let first = 4 + 11 + TAG;
        let (f1, f2) = one.split_at(first);
        // Any flipped bit: in the length, the ciphertext or the tag.
        for i in [0, 3, 4, 10, first - 1, first + 5] {
            let mut bad = one.clone();
            bad[i] ^= 0x20;
            let r = through(bad).await;
            assert!(r.is_err(), "flip at {i} went through: {r:?}");
        }
        // Swapped, replayed, or a frame dropped.
        assert!(through([f2, f1].concat()).await.is_err());
        assert!(through([f1, f1].concat()).await.is_err());
        assert!(through(f2.to_vec()).await.is_err());
        // Cut inside a frame.
        let r = through(one[..first + 7].to_vec()).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Keys of the other direction do not open it.
        let (a, b) = tcp_pair().await;
        let (mut rx, _) = halves(b, &KEYS, Side::Client);
        let (_r, mut w) = a.into_split();
        w.write_all(&one).await.unwrap();
        w.shutdown().await.unwrap();
        assert!(rx.read_to_end(&mut Vec::new()).await.is_err());
    }

    #[tokio::test]
    async fn an_impossible_length_is_refused_before_anything_is_buffered() {
        // A provider takes no frame larger than requests need.
        let mut wire = ((GATHER + TAG + 1) as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&[0; 64]);
        let e = through(wire).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        // A downloader none larger than the largest payload.
        let (a, b) = tcp_pair().await;
        let (mut rx, _) = halves(b, &KEYS, Side::Client);
        let (_r, mut w) = a.into_split();
        w.write_all(&((MAX_FRAME + TAG + 1) as u32).to_be_bytes())
            .await
            .unwrap();
        w.shutdown().await.unwrap();
        let e = rx.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let e = through(vec![0, 0, 0, 3, 1, 2, 3]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn a_failed_frame_ends_the_stream_for_good_and_empty_reads_do_not_wait() {
        let one = sealed_frames(&[b"first frame", b"second frame"]).await;
        let mut bad = one.clone();
        bad[6] ^= 1;
        let (a, b) = tcp_pair().await;
        let (mut rx, _) = halves(b, &KEYS, Side::Server);
        // Nothing sent yet: an empty read returns at once.
        let empty = tokio::time::timeout(std::time::Duration::from_secs(1), rx.read_bytes(0));
        assert!(empty.await.unwrap().unwrap().is_empty());
        let (_r, mut w) = a.into_split();
        w.write_all(&bad).await.unwrap();
        let mut buf = [0u8; 64];
        assert!(rx.read(&mut buf).await.is_err());
        // The second frame is intact, but the one before it is gone: no more.
        assert!(rx.read(&mut buf).await.is_err());
        assert!(rx.read_bytes(5).await.is_err());
    }

    #[tokio::test]
    async fn a_payload_sharing_its_frame_comes_out_whole() {
        // Server to client: a payload frame with more behind it in the frame.
        let (a, b) = tcp_pair().await;
        let (_, mut tx) = halves(a, &KEYS, Side::Server);
        let (mut rx, _) = halves(b, &KEYS, Side::Client);
        tx.write_payload(b"payload+extra".to_vec()).await.unwrap();
        tx.flush().await.unwrap();
        assert_eq!(&rx.read_bytes(7).await.unwrap()[..], b"payload");
        assert_eq!(&rx.read_bytes(6).await.unwrap()[..], b"+extra");
    }

    #[test]
    fn nonces_never_repeat_and_the_key_budget_ends_a_direction() {
        let mut d = Direction::new(&KEYS[..KEY + IV]);
        let a = *d.nonce(100).unwrap().as_ref();
        let b = *d.nonce(100).unwrap().as_ref();
        assert_ne!(a, b);
        d.sealed = BYTES_PER_KEY - 10;
        assert!(d.nonce(10).is_ok());
        assert!(d.nonce(1).is_err());
    }
}
