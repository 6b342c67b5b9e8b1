//! Bridges between libp2p streams of app-defined protocols and `StreamData`
//! frames of one session, with the credit-based flow control of the API.
//!
//! Each direction of a stream may have at most `window` bytes in flight:
//! node → app data waits for `StreamCredit` from the app; app → node data is
//! credited back only after it was written to the peer, so a slow remote slows
//! only the app that writes to it.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::{AsyncReadExt, AsyncWriteExt};
use p2pvm_proto::{MAX_STREAM_CHUNK_BYTES, pb};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::session::internal::Internal;

/// App → peer bytes waiting for the writer task. A byte buffer rather than a
/// queue of frames: the window bounds it in bytes however finely the app cuts
/// its data, and appending never blocks the session loop.
#[derive(Debug, Default)]
struct Outbox {
    buf: BytesMut,
    /// The app half-closed: flush, then close the peer stream.
    closed: bool,
    /// Writing to the peer failed; further app data is dropped.
    failed: bool,
}
/// One bridged stream as the session tracks it.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    /// Bytes from the app for the peer, and their state.
    outbox: Arc<Mutex<Outbox>>,
    outbox_ready: Arc<Notify>,
    /// Bytes the app sent that are not yet credited back.
    inbound_outstanding: Arc<std::sync::atomic::AtomicU32>,
    /// Credit the app granted for node → app data.
    send_credit: Arc<Semaphore>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    pub reader_done: bool,
    pub writer_done: bool,
    /// The operation that opened it (`ContentFetch`, `OpenStream`, ...), for
    /// the metrics of how streams end.
    pub kind: &'static str,
}

/// Why the app's use of a stream broke the rules.
#[derive(Debug)]
pub(crate) enum StreamViolation {
    WindowExceeded,
    CreditOverflow,
    WriteAfterClose,
}

impl StreamViolation {
    pub fn message(&self, id: u64) -> String {
        match self {
            Self::WindowExceeded => format!("stream {id}: data beyond the flow-control window"),
            Self::CreditOverflow => format!("stream {id}: credit beyond the flow-control window"),
            Self::WriteAfterClose => format!("stream {id}: data after close"),
        }
    }
}

fn frame(kind: pb::frame::Kind) -> pb::Frame {
    pb::Frame::of(kind)
}

/// The error an app sees when its stream's source fails: a content error keeps
/// its own code (e.g. VERIFICATION_FAILED), anything else is the peer's failure.
pub(crate) fn stream_error(e: &std::io::Error) -> pb::Error {
    let content = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::content::ContentServiceError>());
    match content {
        Some(c) => super::ApiError::from(c.clone()).to_pb(),
        None => pb::Error::new(
            pb::ErrorCode::Unavailable,
            format!("peer stream failed: {e}"),
        ),
    }
}

impl StreamEntry {
    /// Starts the two copy tasks for `stream`: a peer's libp2p stream, or a
    /// node-side byte source/sink such as a content fetch or publish.
    pub fn spawn<S>(
        tasks: &crate::tasks::Tasks,
        id: u64,
        stream: S,
        window: u32,
        out: mpsc::Sender<pb::Frame>,
        internal: mpsc::Sender<Internal>,
    ) -> Self
    where
        S: futures::AsyncRead + futures::AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = stream.split();
        let send_credit = Arc::new(Semaphore::new(window as usize));
        let inbound_outstanding = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let outbox = Arc::new(Mutex::new(Outbox::default()));
        let outbox_ready = Arc::new(Notify::new());

        let reader = {
            let credit = send_credit.clone();
            let out = out.clone();
            let internal = internal.clone();
            tasks.spawn(async move {
                let mut buf = vec![0u8; MAX_STREAM_CHUNK_BYTES];
                let close = loop {
                    // Wait for at least one byte of credit, then read no more than
                    // the credit allows so nothing is ever buffered beyond it.
                    let Ok(first) = credit.acquire().await else {
                        break None;
                    };
                    first.forget();
                    let max = (credit.available_permits() + 1).min(buf.len());
                    match rd.read(&mut buf[..max]).await {
                        Ok(0) => {
                            credit.add_permits(1);
                            break Some(pb::StreamClose {
                                stream_id: id,
                                reset: false,
                                error: None,
                            });
                        }
                        Ok(n) => {
                            if n > 1 {
                                match credit.acquire_many(n as u32 - 1).await {
                                    Ok(p) => p.forget(),
                                    Err(_) => break None,
                                }
                            }
                            let data = pb::StreamData {
                                stream_id: id,
                                data: Bytes::copy_from_slice(&buf[..n]),
                            };
                            if out
                                .send(frame(pb::frame::Kind::StreamData(data)))
                                .await
                                .is_err()
                            {
                                break None;
                            }
                        }
                        Err(e) => {
                            let error = stream_error(&e);
                            let _ = internal.send(Internal::Failed(id, error)).await;
                            return;
                        }
                    }
                };
                if let Some(c) = close {
                    let _ = out.send(frame(pb::frame::Kind::StreamClose(c))).await;
                }
                let _ = internal.send(Internal::ReaderDone(id)).await;
            })
        };

        let writer = {
            let outstanding = inbound_outstanding.clone();
            let outbox = outbox.clone();
            let ready = outbox_ready.clone();
            tasks.spawn(async move {
                let failed = loop {
                    let (chunk, closed) = {
                        let mut o = outbox.lock().expect("lock");
                        (o.buf.split().freeze(), o.closed)
                    };
                    if chunk.is_empty() {
                        if closed {
                            break None;
                        }
                        ready.notified().await;
                        continue;
                    }
                    if let Err(e) = wr.write_all(&chunk).await {
                        break Some(e);
                    }
                    let n = chunk.len() as u32;
                    outstanding.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
                    let credit = pb::StreamCredit {
                        stream_id: id,
                        bytes: n,
                    };
                    if out
                        .send(frame(pb::frame::Kind::StreamCredit(credit)))
                        .await
                        .is_err()
                    {
                        break None;
                    }
                };
                match failed {
                    None => {
                        let _ = wr.close().await;
                        let _ = internal.send(Internal::WriterDone(id)).await;
                    }
                    Some(e) => {
                        outbox.lock().expect("lock").failed = true;
                        let error = pb::Error::new(
                            pb::ErrorCode::Unavailable,
                            format!("writing to the peer failed: {e}"),
                        );
                        let _ = internal.send(Internal::Failed(id, error)).await;
                    }
                }
            })
        };

        Self {
            outbox,
            outbox_ready,
            inbound_outstanding,
            send_credit,
            reader,
            writer,
            reader_done: false,
            writer_done: false,
            kind: "stream",
        }
    }

    /// Data from the app for the peer. Never blocks: the window bounds the buffer.
    pub fn data_from_app(&mut self, data: Bytes, window: u32) -> Result<(), StreamViolation> {
        let mut o = self.outbox.lock().expect("lock");
        if o.closed {
            return Err(StreamViolation::WriteAfterClose);
        }
        if o.failed || data.is_empty() {
            // The writer already reported the failure; the data has nowhere to go.
            return Ok(());
        }
        let n = data.len() as u32;
        let before = self
            .inbound_outstanding
            .fetch_add(n, std::sync::atomic::Ordering::AcqRel);
        if before.saturating_add(n) > window {
            return Err(StreamViolation::WindowExceeded);
        }
        o.buf.extend_from_slice(&data);
        drop(o);
        self.outbox_ready.notify_one();
        Ok(())
    }

    /// Credit from the app for node → app data.
    pub fn credit_from_app(&self, bytes: u32, window: u32) -> Result<(), StreamViolation> {
        if self.send_credit.available_permits() as u64 + bytes as u64 > window as u64 {
            return Err(StreamViolation::CreditOverflow);
        }
        self.send_credit.add_permits(bytes as usize);
        Ok(())
    }

    /// The app will send no more data.
    pub fn half_close(&mut self) {
        self.outbox.lock().expect("lock").closed = true;
        self.outbox_ready.notify_one();
    }

    /// Both directions finished.
    pub fn finished(&self) -> bool {
        self.reader_done && self.writer_done
    }

    /// Tears the stream down at once.
    pub fn reset(self) {
        self.reader.abort();
        self.writer.abort();
    }
}
