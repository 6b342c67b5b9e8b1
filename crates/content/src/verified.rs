//! Outboards, content ids and verified range encode/decode.

use std::fmt;
use std::io::Cursor;
use std::ops::Range;
use std::str::FromStr;

use bao_tree::io::outboard::{EmptyOutboard, PreOrderOutboard};
use bao_tree::io::round_up_to_chunks;
use bao_tree::io::sync::{CreateOutboard, ReadAt, decode_ranges, encode_ranges_validated};
use bao_tree::{BaoTree, BlockSize, ByteRanges};

use crate::CHUNK_GROUP_LOG;

pub(crate) const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(CHUNK_GROUP_LOG);

/// Why content could not be encoded or verified.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The requested range is empty or reaches past the end of the item.
    #[error("Range {start}..{end} is not inside an item of {size} bytes")]
    BadRange {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// Item size.
        size: u64,
    },
    /// The bytes received do not match the content id (corrupt, truncated or forged).
    #[error("Data does not verify against the content id")]
    Verification(#[source] std::io::Error),
    /// The local data or outboard could not be read while encoding.
    #[error("Cannot encode the range")]
    Encode(#[source] std::io::Error),
    /// A content id string is not 64 hex digits.
    #[error("Invalid content id {0:?}")]
    BadId(String),
    /// Writing verified data to local storage failed (e.g. the disk is full);
    /// not the sender's fault.
    #[error("Cannot store the data")]
    Write(#[source] std::io::Error),
    /// A block that this partial download does not hold yet.
    #[error("Block {0} is not held")]
    NotHeld(u64),
    /// The download still misses blocks.
    #[error("The download is incomplete")]
    Incomplete,
}

pub(crate) fn verification(e: impl fmt::Display) -> ContentError {
    ContentError::Verification(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        e.to_string(),
    ))
}

/// A content id: the BLAKE3 hash of the item's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId(pub [u8; 32]);

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({self})")
    }
}

impl FromStr for ContentId {
    type Err = ContentError;
    fn from_str(s: &str) -> Result<Self, ContentError> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id).map_err(|_| ContentError::BadId(s.into()))?;
        Ok(Self(id))
    }
}

impl From<blake3::Hash> for ContentId {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

/// The hash tree of one item, kept beside its bytes so any range can be proven.
#[derive(Debug, Clone)]
pub struct Outboard {
    // Blocks are encoded from it in `block` (`Outboard::encode_block`).
    pub(crate) inner: PreOrderOutboard<Vec<u8>>,
}

impl Outboard {
    /// Hashes `data` and builds its tree.
    pub fn compute(data: &[u8]) -> Self {
        Self::from_reader(Cursor::new(data)).expect("reading memory cannot fail")
    }

    /// Hashes a seekable source (a file) in one streaming pass.
    pub fn from_reader(data: impl std::io::Read + std::io::Seek) -> std::io::Result<Self> {
        Ok(Self {
            inner: PreOrderOutboard::<Vec<u8>>::create(data, BLOCK_SIZE)?,
        })
    }

    /// Rebuilds an outboard from stored tree bytes.
    pub fn from_parts(id: ContentId, size: u64, tree_bytes: Vec<u8>) -> Self {
        Self {
            inner: PreOrderOutboard {
                root: blake3::Hash::from_bytes(id.0),
                tree: BaoTree::new(size, BLOCK_SIZE),
                data: tree_bytes,
            },
        }
    }

    /// The content id.
    pub fn id(&self) -> ContentId {
        self.inner.root.into()
    }

    /// The item's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.tree.size()
    }

    /// The tree bytes, for storage.
    pub fn tree_bytes(&self) -> &[u8] {
        &self.inner.data
    }
}

fn check_range(range: &Range<u64>, size: u64) -> Result<(), ContentError> {
    if range.start >= range.end || range.end > size {
        return Err(ContentError::BadRange {
            start: range.start,
            end: range.end,
            size,
        });
    }
    Ok(())
}

/// Encodes `range` of `data` with the proof nodes a receiver needs.
///
/// The range is widened to whole 1 KiB chunks on the wire; [`decode_range`]
/// trims it back. The local data is validated while encoding, so a corrupted
/// store is detected here rather than blamed on us by the peer.
pub fn encode_range(
    data: impl ReadAt,
    outboard: &Outboard,
    range: Range<u64>,
) -> Result<Vec<u8>, ContentError> {
    check_range(&range, outboard.size())?;
    let chunks = round_up_to_chunks(&ByteRanges::from(range));
    let mut wire = Vec::new();
    encode_ranges_validated(data, &outboard.inner, &chunks, &mut wire).map_err(|e| {
        ContentError::Encode(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        ))
    })?;
    Ok(wire)
}

/// Verifies `wire` against `id` and returns exactly the bytes of `range`.
///
/// `size` comes from the item's (signed) manifest; a lie about it cannot make
/// wrong bytes verify, because the size is part of what the root hash commits to.
pub fn decode_range(
    id: ContentId,
    size: u64,
    range: Range<u64>,
    wire: &[u8],
) -> Result<Vec<u8>, ContentError> {
    check_range(&range, size)?;
    let chunks = round_up_to_chunks(&ByteRanges::from(range.clone()));
    // The proof nodes are checked as they stream past; nothing needs keeping.
    let mut tree = EmptyOutboard {
        root: blake3::Hash::from_bytes(id.0),
        tree: BaoTree::new(size, BLOCK_SIZE),
    };
    // Leaves land at their absolute offsets (from the range start rounded down to
    // a 1 KiB chunk); shift them so a range deep inside a large item does not
    // allocate everything before it.
    let base = range.start & !1023;
    let mut target = Shifted {
        base,
        buf: Vec::new(),
    };
    decode_ranges(Cursor::new(wire), &chunks, &mut target, &mut tree).map_err(verification)?;
    let (start, end) = ((range.start - base) as usize, (range.end - base) as usize);
    if target.buf.len() < end {
        return Err(ContentError::Verification(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the response ended before the range",
        )));
    }
    target.buf.truncate(end);
    target.buf.drain(..start);
    Ok(target.buf)
}

/// A write target that holds only the bytes from `base` on.
struct Shifted {
    base: u64,
    buf: Vec<u8>,
}

impl bao_tree::io::sync::WriteAt for Shifted {
    fn write_at(&mut self, pos: u64, data: &[u8]) -> std::io::Result<usize> {
        let at = pos
            .checked_sub(self.base)
            .ok_or_else(|| std::io::Error::other("leaf before the requested range"))?
            as usize;
        if self.buf.len() < at + data.len() {
            self.buf.resize(at + data.len(), 0);
        }
        self.buf[at..at + data.len()].copy_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect()
    }

    #[test]
    fn id_is_plain_blake3_and_round_trips_as_hex() {
        let data = item(100_000);
        let ob = Outboard::compute(&data);
        assert_eq!(ob.id(), ContentId::from(blake3::hash(&data)));
        let s = ob.id().to_string();
        assert_eq!(s.parse::<ContentId>().unwrap(), ob.id());
        assert!("zz".parse::<ContentId>().is_err());
    }

    #[test]
    fn middle_range_verifies_and_is_exact() {
        let data = item(1 << 20);
        let ob = Outboard::compute(&data);
        let range = 300_001..500_123;
        let wire = encode_range(&data, &ob, range.clone()).unwrap();
        // Only the range (rounded to chunk groups) and its proof travel.
        assert!(wire.len() < 260_000, "{}", wire.len());
        let got = decode_range(ob.id(), ob.size(), range.clone(), &wire).unwrap();
        assert_eq!(got, &data[300_001..500_123]);
    }

    #[test]
    fn stored_outboard_reproduces_the_same_proofs() {
        let data = item(200_000);
        let ob = Outboard::compute(&data);
        let again = Outboard::from_parts(ob.id(), ob.size(), ob.tree_bytes().to_vec());
        let a = encode_range(&data, &ob, 0..200_000).unwrap();
        let b = encode_range(&data, &again, 0..200_000).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn wrong_id_truncation_and_bad_ranges_are_errors() {
        let data = item(70_000);
        let ob = Outboard::compute(&data);
        let wire = encode_range(&data, &ob, 0..70_000).unwrap();
        let other = ContentId::from(blake3::hash(b"something else"));
        assert!(matches!(
            decode_range(other, ob.size(), 0..70_000, &wire),
            Err(ContentError::Verification(_))
        ));
        assert!(decode_range(ob.id(), ob.size(), 0..70_000, &wire[..wire.len() - 1]).is_err());
        assert!(decode_range(ob.id(), ob.size() + 1, 0..70_000, &wire).is_err());
        assert!(matches!(
            encode_range(&data, &ob, 10..70_001),
            Err(ContentError::BadRange { .. })
        ));
        assert!(matches!(
            decode_range(ob.id(), ob.size(), 5..5, &wire),
            Err(ContentError::BadRange { .. })
        ));
    }

    #[test]
    fn corrupt_local_data_is_caught_when_encoding() {
        let mut data = item(50_000);
        let ob = Outboard::compute(&data);
        data[40_000] ^= 1;
        assert!(encode_range(&data, &ob, 0..50_000).is_err());
        // A range that does not touch the damaged chunk group still serves.
        encode_range(&data, &ob, 0..16_384).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Flipping any bit of the wire either fails verification or (when the
        /// bit is outside what the range needs) still yields exactly the right bytes:
        /// a wrong byte is never returned.
        #[test]
        fn a_flipped_bit_never_yields_wrong_bytes(
            len in 1usize..120_000,
            a in any::<prop::sample::Index>(),
            b in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let data = item(len);
            let ob = Outboard::compute(&data);
            let (x, y) = (a.index(len) as u64, b.index(len) as u64);
            let range = x.min(y)..x.max(y) + 1;
            let mut wire = encode_range(&data, &ob, range.clone()).unwrap();
            let i = flip.index(wire.len());
            wire[i] ^= 1 << bit;
            if let Ok(got) = decode_range(ob.id(), ob.size(), range.clone(), &wire) {
                prop_assert_eq!(&got[..], &data[range.start as usize..range.end as usize]);
            }
        }
    }
}
