//! Content addressing and verified streaming for p2pvm's content sharing
//! — the library under p2pd's content service:
//! verified ranges, partial downloads that can be served onwards, the store, signed
//! manifests, search keywords and the transfer protocol's messages.
//!
//! ```text
//!  publisher: bytes ─► outboard (BLAKE3 tree, 16 KiB chunk groups) ─► ContentId = root
//!  provider:  (file, outboard, block k) ─► block::encode ─► wire = proof ‖ bytes
//!  fetcher:   (ContentId, size, k, wire) ─► Partial::verify / block::verify ─► verified bytes
//!  fetcher:   (ContentId, claimed size, spine ‖ last chunk) ─► size_proof::verify ─► size proven
//! ```
//!
//! A content id is the plain BLAKE3 hash of the bytes. Every 256 KiB block,
//! including one in the middle of an item, is sent together with the tree
//! nodes that prove it, so the receiver checks every byte against the id
//! before handing it on; anything that does not verify is an error, never
//! data (after iroh-blobs and bao). [`encode_range`] / [`decode_range`] prove
//! arbitrary byte ranges in bao's own interleaved format.

#![forbid(unsafe_code)]

pub mod block;
pub mod keywords;
pub mod manifest;
mod partial;
pub mod size_proof;
pub mod store;
pub mod transfer;
mod verified;

pub use block::{BLOCK_BYTES, block_count, block_range};
pub use manifest::{Manifest, ManifestError, Rights, SignedManifest, inline_public_key};
pub use partial::Partial;
pub use store::{ItemInfo, Store, StoreError};
pub use verified::{ContentError, ContentId, Outboard, decode_range, encode_range};

/// Chunk group size used for trees: 16 chunks of 1 KiB. Larger groups shrink the
/// outboard (one 64-byte pair per 16 KiB, 0.4 % overhead) at the cost of verifying
/// in 16 KiB steps; the same value iroh-blobs uses.
pub const CHUNK_GROUP_LOG: u8 = 4;
/// Bytes per chunk group.
pub const CHUNK_GROUP_BYTES: u64 = 1024 << CHUNK_GROUP_LOG;
