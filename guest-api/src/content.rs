//! [`ContentReader`]: the verified bytes of a content fetch, as the app reads
//! them.
//!
//! Where the node offers bulk streams (every Unix-socket node of this version,
//! in host mode and behind the front-end alike), the bytes arrive through a
//! shared-memory ring the node hands over on a second connection: one copy
//! into the ring, one out of it, and no system call while both sides are
//! busy. Otherwise they arrive as stream frames on the session. Either way the
//! app reads a plain `AsyncRead`, and a failure (a corrupt provider, malware,
//! the node going away) is an error, never a short read that looks complete.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use p2pvm_bulk::{BulkError, RingReader};
use p2pvm_proto::pb;
use tokio::io::{AsyncRead, ReadBuf};

use crate::error::Error;
use crate::stream::AppStream;

/// The bytes of a content fetch; implements tokio's [`AsyncRead`].
#[derive(Debug)]
pub struct ContentReader(Via);

#[derive(Debug)]
enum Via {
    Ring(Box<RingReader>),
    Frames(AppStream),
}

impl ContentReader {
    pub(crate) fn ring(r: RingReader) -> Self {
        Self(Via::Ring(Box::new(r)))
    }

    pub(crate) fn frames(s: AppStream) -> Self {
        Self(Via::Frames(s))
    }

    /// Whether the bytes come through a shared-memory ring (a bulk stream).
    pub fn is_bulk(&self) -> bool {
        matches!(self.0, Via::Ring(_))
    }
}

/// A ring's failure as the app sees it: the node's error code and text
/// (as [`Error::Api`] inside the `io::Error`), or the node being gone.
pub(crate) fn ring_error(e: BulkError) -> std::io::Error {
    use std::io::ErrorKind;
    match e {
        BulkError::Failed { code, message } => {
            let code = pb::ErrorCode::try_from(code as i32).unwrap_or(pb::ErrorCode::Internal);
            std::io::Error::new(ErrorKind::ConnectionReset, Error::Api { code, message })
        }
        BulkError::PeerGone => std::io::Error::new(
            ErrorKind::ConnectionReset,
            "the node closed the stream before its end",
        ),
        other => other.into(),
    }
}

/// Why attaching a bulk stream failed, as a client error.
pub(crate) fn attach_error(e: BulkError, socket: &std::path::Path) -> Error {
    match e {
        BulkError::Failed { code, message } => Error::Api {
            code: pb::ErrorCode::try_from(code as i32).unwrap_or(pb::ErrorCode::Internal),
            message,
        },
        BulkError::PeerGone => Error::Disconnected,
        BulkError::Io(e) => Error::Connect {
            path: socket.display().to_string(),
            reason: e.to_string(),
        },
        other => Error::Protocol(format!("attaching a bulk stream: {other}")),
    }
}

impl AsyncRead for ContentReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Via::Frames(s) => Pin::new(s).poll_read(cx, buf),
            Via::Ring(r) => match ready!(Pin::new(r.as_mut()).poll_read(cx, buf)) {
                Ok(()) => Poll::Ready(Ok(())),
                Err(e) => Poll::Ready(Err(match e.into_inner() {
                    Some(inner) => match inner.downcast::<BulkError>() {
                        Ok(b) => ring_error(*b),
                        Err(other) => std::io::Error::other(other),
                    },
                    None => std::io::Error::other("bulk stream failed"),
                })),
            },
        }
    }
}
