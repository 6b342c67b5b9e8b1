//! Bridges between libp2p streams of app-defined protocols and `StreamData`
//! frames of one session, with the credit-based flow control of the API.
//!
//! Each direction of a stream may have at most `window` bytes in flight:
//! node → app data waits for `StreamCredit` from the app; app → node data is
//! credited back only after it was written to the peer, so a slow remote slows
//! only the app that writes to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt};
use p2pvm_proto::{MAX_STREAM_CHUNK_BYTES, pb};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::session::Internal;

/// Queue depth of app → peer chunks per stream; the byte window is the real
/// bound, this only limits how many small frames queue before the session waits.
const TO_REMOTE_QUEUE: usize = 64;

/// One bridged stream as the session tracks it.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    /// Chunks from the app to the peer; `None` once the app half-closed.
    to_remote: Option<mpsc::Sender<Bytes>>,
    /// Bytes the app sent that are not yet credited back.
    inbound_outstanding: Arc<AtomicU32>,
    /// Credit the app granted for node → app data.
    send_credit: Arc<Semaphore>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    pub reader_done: bool,
    pub writer_done: bool,
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

impl StreamEntry {
    /// Starts the two copy tasks for `stream`.
    pub fn spawn(
        id: u64,
        stream: libp2p::Stream,
        window: u32,
        out: mpsc::Sender<pb::Frame>,
        internal: mpsc::Sender<Internal>,
    ) -> Self {
        let (mut rd, mut wr) = stream.split();
        let send_credit = Arc::new(Semaphore::new(window as usize));
        let inbound_outstanding = Arc::new(AtomicU32::new(0));
        let (to_remote, mut from_app) = mpsc::channel::<Bytes>(TO_REMOTE_QUEUE);

        let reader = {
            let credit = send_credit.clone();
            let out = out.clone();
            let internal = internal.clone();
            tokio::spawn(async move {
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
                            break Some(pb::StreamClose {
                                stream_id: id,
                                reset: true,
                                error: Some(pb::Error::new(
                                    pb::ErrorCode::Unavailable,
                                    format!("peer stream failed: {e}"),
                                )),
                            });
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
            tokio::spawn(async move {
                let mut failed = None;
                while let Some(chunk) = from_app.recv().await {
                    if let Err(e) = wr.write_all(&chunk).await {
                        failed = Some(e);
                        break;
                    }
                    let n = chunk.len() as u32;
                    outstanding.fetch_sub(n, Ordering::AcqRel);
                    let credit = pb::StreamCredit {
                        stream_id: id,
                        bytes: n,
                    };
                    if out
                        .send(frame(pb::frame::Kind::StreamCredit(credit)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                match failed {
                    None => {
                        let _ = wr.close().await;
                    }
                    Some(e) => {
                        let close = pb::StreamClose {
                            stream_id: id,
                            reset: true,
                            error: Some(pb::Error::new(
                                pb::ErrorCode::Unavailable,
                                format!("writing to the peer failed: {e}"),
                            )),
                        };
                        let _ = out.send(frame(pb::frame::Kind::StreamClose(close))).await;
                    }
                }
                let _ = internal.send(Internal::WriterDone(id)).await;
            })
        };

        Self {
            to_remote: Some(to_remote),
            inbound_outstanding,
            send_credit,
            reader,
            writer,
            reader_done: false,
            writer_done: false,
        }
    }

    /// Data from the app for the peer. Waits if the copy queue is full, which
    /// back-pressures only this session.
    pub async fn data_from_app(&mut self, data: Bytes, window: u32) -> Result<(), StreamViolation> {
        let Some(tx) = &self.to_remote else {
            return Err(StreamViolation::WriteAfterClose);
        };
        let n = data.len() as u32;
        let before = self.inbound_outstanding.fetch_add(n, Ordering::AcqRel);
        if before.saturating_add(n) > window {
            return Err(StreamViolation::WindowExceeded);
        }
        if tx.send(data).await.is_err() {
            // The writer already failed and reported it; drop the data.
            self.to_remote = None;
        }
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
        self.to_remote = None;
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
