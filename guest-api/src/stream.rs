//! [`AppStream`]: a byte stream to a remote app over an app-defined protocol,
//! carried over the API session with credit-based flow control.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use p2pvm_proto::{MAX_STREAM_CHUNK_BYTES, pb};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// State the connection task shares with one stream.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Bytes we may still send.
    pub credit: u32,
    pub write_waker: Option<Waker>,
    /// Set when the node reset the stream or the session dropped.
    pub reset: Option<String>,
    /// Received bytes not yet read by the app; the node never sends more than
    /// the credit we returned, so this stays within one window.
    pub inbound: BytesMut,
    /// The peer half-closed: EOF once `inbound` is drained.
    pub eof: bool,
    pub read_waker: Option<Waker>,
}

impl Shared {
    pub fn new(window: u32) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            credit: window,
            write_waker: None,
            reset: None,
            inbound: BytesMut::new(),
            eof: false,
            read_waker: None,
        }))
    }

    pub fn fail(&mut self, why: String) {
        self.reset.get_or_insert(why);
        self.wake_all();
    }

    pub fn wake_all(&mut self) {
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }
}

/// A bidirectional byte stream to a remote peer's app; implements tokio's
/// [`AsyncRead`] and [`AsyncWrite`].
///
/// `shutdown()` half-closes (the peer reads EOF, you may keep reading);
/// dropping the stream without shutting down resets it.
///
/// ```no_run
/// # async fn f(client: guest_api::Client, peer: &str) -> guest_api::Result<()> {
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// let mut s = client.open_stream(peer, "/echo/1.0.0").await?;
/// s.write_all(b"hello").await.unwrap();
/// s.shutdown().await.unwrap();
/// let mut back = Vec::new();
/// s.read_to_end(&mut back).await.unwrap();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AppStream {
    id: u64,
    peer: String,
    protocol: String,
    shared: Arc<Mutex<Shared>>,
    out: PollSender<pb::Frame>,
    credit_tx: mpsc::Sender<pb::Frame>,
    unreturned: u32,
    window: u32,
    write_closed: bool,
    read_eof: bool,
}

fn frame(kind: pb::frame::Kind) -> pb::Frame {
    pb::Frame::of(kind)
}

impl AppStream {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        peer: String,
        protocol: String,
        shared: Arc<Mutex<Shared>>,
        out: mpsc::Sender<pb::Frame>,
        window: u32,
    ) -> Self {
        Self {
            id,
            peer,
            protocol,
            shared,
            credit_tx: out.clone(),
            out: PollSender::new(out),
            unreturned: 0,
            window,
            write_closed: false,
            read_eof: false,
        }
    }

    pub(crate) fn set_meta(&mut self, peer: String, protocol: String) {
        self.peer = peer;
        self.protocol = protocol;
    }

    /// The stream id within the session.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The remote peer.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The protocol name.
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    /// Returns consumed bytes to the node in batches of a quarter window, so
    /// credit frames cost little while the sender never stalls on a full window.
    fn return_credit(&mut self, n: usize, drained: bool) {
        self.unreturned += n as u32;
        if self.unreturned >= self.window / 4 || (drained && self.unreturned > 0) {
            let credit = pb::StreamCredit {
                stream_id: self.id,
                bytes: self.unreturned,
            };
            let f = frame(pb::frame::Kind::StreamCredit(credit));
            match self.credit_tx.try_send(f) {
                Ok(()) => self.unreturned = 0,
                Err(mpsc::error::TrySendError::Full(f)) => {
                    // Never lose credit: hand it to a task that waits for room.
                    let tx = self.credit_tx.clone();
                    self.unreturned = 0;
                    tokio::spawn(async move {
                        let _ = tx.send(f).await;
                    });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

fn broken(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, why.to_owned())
}

impl AsyncRead for AppStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let (n, drained) = {
            let mut sh = this.shared.lock().expect("lock");
            if sh.inbound.is_empty() {
                if let Some(why) = &sh.reset {
                    return Poll::Ready(Err(broken(why)));
                }
                if sh.eof {
                    this.read_eof = true;
                    return Poll::Ready(Ok(()));
                }
                sh.read_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = sh.inbound.len().min(buf.remaining());
            buf.put_slice(&sh.inbound[..n]);
            sh.inbound.advance(n);
            (n, sh.inbound.is_empty())
        };
        if n > 0 {
            this.return_credit(n, drained);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for AppStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(broken("stream already shut down for writing")));
        }
        let n = {
            let mut sh = this.shared.lock().expect("lock");
            if let Some(why) = &sh.reset {
                return Poll::Ready(Err(broken(why)));
            }
            if sh.credit == 0 {
                sh.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            buf.len()
                .min(sh.credit as usize)
                .min(MAX_STREAM_CHUNK_BYTES)
        };
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        match this.out.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(broken("session closed"))),
            Poll::Pending => return Poll::Pending,
        }
        let data = pb::StreamData {
            stream_id: this.id,
            data: Bytes::copy_from_slice(&buf[..n]),
        };
        if this
            .out
            .send_item(frame(pb::frame::Kind::StreamData(data)))
            .is_err()
        {
            return Poll::Ready(Err(broken("session closed")));
        }
        this.shared.lock().expect("lock").credit -= n as u32;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        match this.out.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(broken("session closed"))),
            Poll::Pending => return Poll::Pending,
        }
        let close = pb::StreamClose {
            stream_id: this.id,
            reset: false,
            error: None,
        };
        let _ = this
            .out
            .send_item(frame(pb::frame::Kind::StreamClose(close)));
        this.write_closed = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for AppStream {
    fn drop(&mut self) {
        if !(self.write_closed && self.read_eof) {
            let close = pb::StreamClose {
                stream_id: self.id,
                reset: true,
                error: None,
            };
            let _ = self
                .credit_tx
                .try_send(frame(pb::frame::Kind::StreamClose(close)));
        }
    }
}
