//! The p2pvm API wire protocol, shared by the node (`p2pd`), the front-end driver
//! and every client (`guest-api`, `p2pctl`).
//!
//! ```text
//!  app ── guest-api ──► [u32 BE length | protobuf Frame] ──► p2pd API service
//!                       (a Unix socket, or a session of the inter-VM channel)
//! ```
//!
//! The schema lives in `proto/p2pvm_api.proto` and is the source of truth: the Rust
//! types in [`pb`] are generated from it at build time. [`FrameCodec`] turns a byte
//! stream into [`pb::Frame`]s and back with a hard size limit, so any transport
//! that carries bytes carries the API unchanged. `docs/api.md` describes the
//! protocol for implementers in other languages.

#![forbid(unsafe_code)]

mod codec;
pub mod socket;

pub use codec::{FrameCodec, FrameError, decode_frame};

/// Generated protobuf types (package `p2pvm.api.v1`).
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/p2pvm.api.v1.rs"));
}

/// The protocol version this crate speaks; sent in `Hello` and `Welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The environment variables through which an app finds its node and proves
/// who it is; clients read them, and the node sets them for the operator's
/// console.
pub mod env {
    /// Names the API socket.
    pub const API_SOCKET: &str = "P2PVM_API_SOCKET";
    /// Holds an app token.
    pub const TOKEN: &str = "P2PVM_TOKEN";
    /// Names a file that holds an app token.
    pub const TOKEN_FILE: &str = "P2PVM_TOKEN_FILE";
}

/// Default ceiling on one frame's encoded size. 1 MiB holds any control message
/// with room to spare and keeps a hostile peer from making the node buffer more
/// than that per session before it notices.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1 << 20;

/// Default initial per-stream send window. A content stream's throughput is at
/// most one window per round trip; through the inter-VM channel the round trip
/// under load is a few hundred µs, so 2 MiB keeps it busy (256 KiB held a 1 GiB
/// local stream to ~0.7 GB/s) while bounding what a slow reader makes the node
/// hold.
pub const DEFAULT_STREAM_WINDOW_BYTES: u32 = 2 << 20;

/// Largest payload carried in one `StreamData` frame; leaves headroom under the
/// smallest frame limit a node may announce (64 KiB).
pub const MAX_STREAM_CHUNK_BYTES: usize = 60 << 10;

/// The smallest `max_frame_bytes` a node may announce.
pub const MIN_MAX_FRAME_BYTES: u32 = 64 << 10;

impl pb::Error {
    /// Builds an error with a code and a human-readable message.
    pub fn new(code: pb::ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code as i32,
            message: message.into(),
        }
    }
}

impl pb::Frame {
    /// Wraps a frame kind.
    pub fn of(kind: pb::frame::Kind) -> Self {
        Self { kind: Some(kind) }
    }
}
