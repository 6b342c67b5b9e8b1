//! Bulk streams: the data plane of content fetches (`p2pvm-bulk`).
//!
//! A fetch asked for with `bulk` is not bridged into `StreamData` frames. Its
//! verified bytes are parked under a one-time ticket, which the session
//! answers with; the app presents the ticket on a second connection to the
//! same socket, and the bytes go
//! - in host mode, straight into a shared-memory ring this node hands the app;
//! - over the inter-VM channel, as bulk frames on a channel session of their
//!   own, which the front-end copies into the app's ring.
//!
//! The app sees the same bytes, and the same typed errors (`MALWARE_DETECTED`,
//! `VERIFICATION_FAILED`...), as on a framed stream. Every connection to the
//! API socket — and every channel session — starts here: its first four bytes
//! say whether it is an API session or an attachment.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use p2pvm_bulk::attach::{self, Preamble, Reply, Ticket};
use p2pvm_bulk::frames;
use p2pvm_proto::pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tracing::debug;

use super::ApiService;
use super::session::internal::ContentBytes;
use super::tickets::Live;
use crate::report::chain;

/// How long a new connection may take to show what it is.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);

/// What a new connection turned out to be.
enum Opening {
    /// An API session; these are the first bytes of its Hello frame.
    Session([u8; 4]),
    /// A bulk attachment.
    Attach(Preamble),
}

async fn opening(io: &mut (impl AsyncRead + Unpin)) -> Option<Opening> {
    let read = async {
        let mut first = [0u8; 4];
        io.read_exact(&mut first).await.ok()?;
        if !attach::is_attach(&first) {
            return Some(Opening::Session(first));
        }
        match Preamble::read_after_magic(io).await {
            Ok(p) => Some(Opening::Attach(p)),
            Err(e) => {
                debug!(error = %chain(&e), "bad bulk attachment");
                None
            }
        }
    };
    tokio::time::timeout(OPENING_TIMEOUT, read).await.ok()?
}

/// A connection whose first bytes were read to classify it, replayed to the
/// API session that serves it.
struct Replayed<IO> {
    first: [u8; 4],
    at: usize,
    io: IO,
}

impl<IO> Replayed<IO> {
    fn new(first: [u8; 4], io: IO) -> Self {
        Self { first, at: 0, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replayed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.first.len() {
            let n = (self.first.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            // Whatever else already arrived comes with it, as one read of
            // the connection would have returned it.
            // (An error here shows again at the next read.)
            if buf.remaining() > 0 {
                let _ = Pin::new(&mut self.io).poll_read(cx, buf);
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Replayed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The operation a bulk stream serves, for the metrics of how it ended.
const FETCH: &str = "ContentFetch";
/// A bulk stream whose app stopped reading before its end.
const READER_LEFT: &str = "reader_left";

/// The error an app sees for a failed fetch stream.
fn failure(e: &std::io::Error) -> pb::Error {
    super::streams::stream_error(e)
}

fn unknown_ticket() -> Reply {
    Reply::refused(
        pb::ErrorCode::NotFound as u32,
        "unknown or expired bulk ticket",
    )
}

impl ApiService {
    /// Serves one connection to the API socket: an API session, or (host
    /// mode) a bulk attachment, answered with a ring.
    pub async fn serve_unix(&self, mut conn: UnixStream) {
        match opening(&mut conn).await {
            None => {}
            Some(Opening::Session(first)) => self.serve(Replayed::new(first, conn)).await,
            Some(Opening::Attach(p)) => self.until_shutdown(self.attach_ring(conn, p)).await,
        }
    }

    /// Runs a bulk transfer until it ends or the node shuts down: an app that
    /// stops reading must not hold the node's shutdown up.
    async fn until_shutdown(&self, transfer: impl std::future::Future<Output = ()>) {
        tokio::select! {
            () = transfer => {}
            () = self.inner.ctx.shutdown.cancelled() => debug!("bulk transfer cut off by shutdown"),
        }
    }

    /// Serves one channel session: an API session, or a bulk attachment the
    /// front-end forwards for an app, answered with bulk frames.
    pub async fn serve_channel(&self, mut s: p2pvm_channel::ChannelStream) {
        match opening(&mut s).await {
            None => {}
            Some(Opening::Session(first)) => self.serve(Replayed::new(first, s)).await,
            Some(Opening::Attach(p)) => self.until_shutdown(self.attach_frames(s, p)).await,
        }
    }

    /// The ticket's stream, counted against its session and against the
    /// node's session slots while it runs.
    fn take_ticket(
        &self,
        ticket: &Ticket,
    ) -> Result<(ContentBytes, Live, tokio::sync::OwnedSemaphorePermit), Reply> {
        let Some(slot) = self.session_slot() else {
            return Err(Reply::refused(
                pb::ErrorCode::LimitExceeded as u32,
                format!(
                    "the node serves at most {} sessions and bulk streams",
                    self.inner.limits.max_sessions
                ),
            ));
        };
        let (bytes, live) = self.inner.bulk.take(ticket).ok_or_else(unknown_ticket)?;
        Ok((bytes, live, slot))
    }

    async fn attach_ring(&self, conn: UnixStream, p: Preamble) {
        let (mut bytes, _live, _slot) = match self.take_ticket(&p.ticket) {
            Ok(t) => t,
            Err(reply) => return attach::refuse(conn, &reply).await,
        };
        // The ring is memory held ahead of the app for as long as the stream
        // lasts: it comes from the node's read-ahead pool (a smaller ring
        // when the pool is short), so many unread bulk fetches stay bounded.
        let want = p2pvm_bulk::ring::capacity_for(u64::from(p.capacity));
        let (capacity, _charge) = self.content().charge_buffer(want);
        let mut ring = match attach::offer_ring(conn, capacity).await {
            Ok(w) => w,
            Err(e) => {
                debug!(error = %chain(&e), "could not hand a bulk ring over");
                return;
            }
        };
        let ended = loop {
            let next = tokio::select! {
                next = bytes.0.next() => next,
                gone = ring.reader_gone() => {
                    debug!(reason = %gone, "bulk reader left before the end");
                    break READER_LEFT;
                }
            };
            match next {
                None => {
                    ring.finish();
                    break "ok";
                }
                Some(Ok(chunk)) => {
                    if let Err(e) = ring.write_all(&chunk).await {
                        debug!(error = %chain(&e), "bulk reader left before the end");
                        break READER_LEFT;
                    }
                }
                Some(Err(e)) => {
                    let f = failure(&e);
                    ring.fail(f.code as u32, &f.message);
                    break f.code().as_str_name();
                }
            }
        };
        self.metrics().api_stream_ended(FETCH, ended);
    }

    async fn attach_frames(&self, s: p2pvm_channel::ChannelStream, p: Preamble) {
        let (mut rd, mut wr) = s.into_split();
        let (mut bytes, _live, _slot) = match self.take_ticket(&p.ticket) {
            Ok(t) => t,
            Err(reply) => {
                let _ = reply.write(&mut wr).await;
                let _ = wr.shutdown().await;
                return;
            }
        };
        if Reply::ok().write(&mut wr).await.is_err() {
            return;
        }
        let mut ended = "ok";
        let sent = async {
            loop {
                let next = tokio::select! {
                    next = bytes.0.next() => next,
                    // The front-end sends nothing more: any end of its side
                    // means the app is gone.
                    _ = rd.read_u8() => return Err(std::io::ErrorKind::BrokenPipe.into()),
                };
                match next {
                    None => {
                        wr.write_all(&frames::end()).await?;
                        break;
                    }
                    Some(Ok(mut chunk)) => {
                        while !chunk.is_empty() {
                            let piece = chunk.split_to(chunk.len().min(frames::MAX_DATA as usize));
                            let header = frames::data_header(piece.len() as u32);
                            wr.send(Bytes::copy_from_slice(&header)).await?;
                            wr.send(piece).await?;
                        }
                    }
                    Some(Err(e)) => {
                        let f = failure(&e);
                        ended = f.code().as_str_name();
                        wr.write_all(&frames::error(f.code as u32, &f.message))
                            .await?;
                        break;
                    }
                }
            }
            wr.shutdown().await
        };
        if let Err(e) = sent.await {
            debug!(error = %chain(&e), "bulk stream over the channel ended early");
            ended = READER_LEFT;
        }
        self.metrics().api_stream_ended(FETCH, ended);
    }
}
