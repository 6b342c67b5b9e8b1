//! The API's bulk data plane: the bytes of a content stream reach the app
//! through a shared-memory ring instead of `StreamData` frames on its session.
//!
//! ```text
//!  host mode:   p2pd ─────────────── ring (memfd) ──► app (guest-api)
//!  split:       p2pd ─ bulk frames over a channel session ─► front-end ─ ring ──► app
//! ```
//!
//! The control plane stays the API session: the app asks for a fetch with
//! `bulk`, the node answers with a one-time ticket, and the app opens a second
//! connection to the same API socket that presents the ticket ([`attach`]).
//! Whoever serves that socket — `p2pd` in host mode, the front-end in the
//! split platform — creates a [`ring`] (a sealed memfd), hands it over with
//! `SCM_RIGHTS`, and from then on the connection carries only one-byte
//! doorbells; its end is how each side learns the other is gone. Across the
//! inter-VM channel, where descriptors cannot travel, the back-end sends the
//! same bytes as [`frames`] on a channel session of their own and the
//! front-end copies them into the app's ring.
//!
//! Why: on the socket path every byte is copied by the kernel twice and
//! wakes a process per chunk; a ring costs one copy in, one copy out, and a
//! doorbell only when a side is asleep (`docs/api.md`, "Bulk streams").

#![forbid(unsafe_code)]

pub mod attach;
pub mod frames;
pub mod ring;

pub use attach::{Preamble, Reply};
pub use ring::{Ring, RingReader, RingWriter};

/// Why a bulk stream failed.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// The peer broke the ring or wire protocol (an index out of bounds, a
    /// malformed header, a ring that is not sealed...).
    #[error("bulk protocol violation: {0}")]
    Protocol(String),
    /// The other side went away (its connection ended).
    #[error("the other side of the bulk stream is gone")]
    PeerGone,
    /// The reading side closed the stream before its end.
    #[error("the reader closed the bulk stream")]
    Closed,
    /// The producer ended the stream with an error; `code` is an API error
    /// code (`pb::ErrorCode`).
    #[error("{message}")]
    Failed {
        /// The API error code.
        code: u32,
        /// What went wrong, for people.
        message: String,
    },
    /// An OS call failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl BulkError {
    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        Self::Protocol(msg.into())
    }
}

impl From<BulkError> for std::io::Error {
    fn from(e: BulkError) -> Self {
        match e {
            BulkError::Io(e) => e,
            BulkError::PeerGone => {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, BulkError::PeerGone)
            }
            BulkError::Closed => std::io::Error::new(std::io::ErrorKind::BrokenPipe, e),
            BulkError::Protocol(_) => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            BulkError::Failed { .. } => std::io::Error::other(e),
        }
    }
}
