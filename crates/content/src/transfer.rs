//! Messages of the content transfer protocol (`/p2pvm/content/2`), spoken on
//! libp2p streams between nodes.
//!
//! A stream carries any number of request/response exchanges in order, so a
//! fetcher pipelines several requests on one stream. Each request is a 4-byte
//! big-endian length and a protobuf [`TransferRequest`]; each answer is a
//! length-prefixed [`TransferResponse`] header followed by `payload_len` raw
//! bytes (a verified block encoding, a signed manifest, a bitfield or search
//! hits). The header bounds the payload before any of it is read.

use prost::Message;

/// Protocol name.
pub const PROTOCOL: &str = "/p2pvm/content/2";
/// Largest request or response header accepted.
pub const MAX_HEADER_BYTES: u32 = 16 * 1024;
/// Largest payload accepted: a block, its proof, and room for search hits.
pub const MAX_PAYLOAD_BYTES: u64 = 4 * 1024 * 1024;

/// A request to a provider.
#[derive(Clone, PartialEq, Message)]
pub struct TransferRequest {
    /// What is asked.
    #[prost(oneof = "Op", tags = "1, 2, 3, 4, 6, 7, 8")]
    pub op: Option<Op>,
}

/// The request kinds.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Op {
    /// One block of an item.
    #[prost(message, tag = "1")]
    Block(BlockRequest),
    /// An item's signed manifest.
    #[prost(bytes, tag = "2")]
    Manifest(Vec<u8>),
    /// Which blocks of an item the provider holds.
    #[prost(bytes, tag = "3")]
    Have(Vec<u8>),
    /// Manifests of the provider's items matching keywords.
    #[prost(message, tag = "4")]
    Search(SearchRequest),
    // Tag 5 was a member certificate shown on a plain stream; group
    // membership is now proven by a group session's handshake only.
    /// A trusted group's topic key of an epoch, for a member in a group
    /// session (answered with the key, or `Forbidden`).
    #[prost(message, tag = "6")]
    GroupKey(GroupKeyRequest),
    /// Whether the provider holds an item and would be found as its
    /// provider: a connected peer's question when the DHT names none.
    /// Answered `Complete` (all of it) or `Ok` (part, no bitfield follows);
    /// `NotFound` from a node that does not announce the item (a private
    /// node), which must not be found this way either.
    #[prost(bytes, tag = "7")]
    Holds(Vec<u8>),
    /// Proof of an item's size (see [`crate::size_proof`]): asked by a
    /// fetcher that got the item's manifest, before it trusts the size.
    /// Answered by anyone who serves the manifest, downloaders included.
    #[prost(bytes, tag = "8")]
    SizeProof(Vec<u8>),
}

/// One block of an item.
#[derive(Clone, PartialEq, Message)]
pub struct BlockRequest {
    /// Content id (32 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub content_id: Vec<u8>,
    /// Block index ([`crate::BLOCK_BYTES`] each).
    #[prost(uint64, tag = "2")]
    pub block: u64,
}

/// A keyword search on one provider.
/// Which group topic key is asked for.
#[derive(Clone, PartialEq, Message)]
pub struct GroupKeyRequest {
    /// The group's id (32 hex digits).
    #[prost(string, tag = "1")]
    pub group_id: String,
    /// The key epoch (the group's CRL number).
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct SearchRequest {
    /// Lower-cased keywords; a hit matches all of them.
    #[prost(string, repeated, tag = "1")]
    pub keywords: Vec<String>,
    /// Most hits wanted.
    #[prost(uint32, tag = "2")]
    pub limit: u32,
}

/// Search hits: signed manifests, each verified by the receiver.
#[derive(Clone, PartialEq, Message)]
pub struct SearchHits {
    /// Encoded [`crate::SignedManifest`]s.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub manifests: Vec<Vec<u8>>,
}

/// The header of every answer.
#[derive(Clone, PartialEq, Message)]
pub struct TransferResponse {
    /// Outcome.
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
    /// Bytes that follow the header.
    #[prost(uint64, tag = "2")]
    pub payload_len: u64,
    /// Human-readable reason for a failure.
    #[prost(string, tag = "3")]
    pub message: String,
    /// In answers to `Have`: the TCP port of the provider's fast path (a TLS
    /// 1.3 connection for blocks beside libp2p), 0 when it has none.
    #[prost(uint32, tag = "4")]
    pub fast_path_port: u32,
}

/// Outcome of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Status {
    /// The payload is the answer.
    Ok = 0,
    /// The provider does not know the item.
    NotFound = 1,
    /// The provider is still downloading and lacks this block.
    NotHeld = 2,
    /// The request makes no sense (bad id, block out of range).
    BadRequest = 3,
    /// The provider cannot serve it (local error, shutting down).
    Unavailable = 4,
    /// The provider holds all blocks (answer to `Have`, no bitfield follows).
    Complete = 5,
    /// The provider's DRM checker refuses to serve this peer the item; the
    /// message starts with the failed check (`DRM_EXPIRED: ...`).
    Forbidden = 6,
    /// The provider sends blocks to as many peers as it has upload slots
    /// for; ask again shortly (or another provider meanwhile). No fault of
    /// either end.
    Busy = 7,
    /// The provider already serves this peer on as many content streams as
    /// it allows one peer; this stream ends. Use the open ones, or ask again
    /// later. No fault of either end.
    TooManyStreams = 8,
}

impl TransferResponse {
    /// A header for `payload_len` bytes of answer.
    pub fn ok(payload_len: u64) -> Self {
        Self {
            status: Status::Ok as i32,
            payload_len,
            message: String::new(),
            fast_path_port: 0,
        }
    }

    /// A header without payload.
    pub fn failed(status: Status, message: impl Into<String>) -> Self {
        Self {
            status: status as i32,
            payload_len: 0,
            message: message.into(),
            fast_path_port: 0,
        }
    }
}

/// Length-prefixes an encoded message.
pub fn frame(msg: &impl Message) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut out).expect("vec grows");
    out
}

/// The wire length of a size proof of an item of `size` bytes.
pub fn size_proof_wire(size: u64) -> u64 {
    crate::size_proof::wire_len(size)
}

/// The wire length of block `k` of an item of `size` bytes (0 past the end):
/// a block answer of any other length is refused before it is read.
pub fn block_wire(size: u64, k: u64) -> u64 {
    crate::block::wire_len(size, k).unwrap_or(0)
}
