//! The wire form of one transfer block: its proof, then its bytes.
//!
//! ```text
//!  [ parent pairs, 64 bytes each, in the order bao's pre-order walk meets them ]
//!  [ the block's bytes, contiguous                                             ]
//! ```
//!
//! The proof is exactly the tree nodes a bao encoding of the block's range
//! carries (the path from the root down to the block, then the block's inner
//! nodes), so it proves the same thing; only the leaves are not interleaved
//! with it. That lets both ends skip a copy: the provider reads the block from
//! its file straight behind the proof, and the receiver hashes the bytes where
//! they landed and hands on a slice of the very buffer it received.

use std::ops::Range;
use std::os::fd::AsFd;

use bao_tree::io::round_up_to_chunks;
use bao_tree::io::sync::Outboard as OutboardRead;
use bao_tree::iter::BaoChunk;
use bao_tree::{BaoTree, ByteRanges, ChunkRanges, TreeNode};
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::verified::{BLOCK_SIZE, verification};
use crate::{ContentError, ContentId, Outboard};

/// Bytes per transfer block: 16 chunk groups.
pub const BLOCK_BYTES: u64 = 256 * 1024;

/// Number of blocks of an item of `size` bytes.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_BYTES)
}

/// The byte range of block `k` of an item of `size` bytes.
pub fn block_range(size: u64, k: u64) -> Range<u64> {
    let start = k * BLOCK_BYTES;
    start..(start + BLOCK_BYTES).min(size)
}

/// One proof node: the left and right children's hashes.
pub type Pair = [u8; 64];

/// Where the pieces of block `k` of an item of `size` bytes lie.
#[derive(Debug, Clone)]
struct Layout {
    tree: BaoTree,
    chunks: ChunkRanges,
    /// The block's byte range in the item.
    range: Range<u64>,
    /// Proof bytes in front of the data.
    proof: usize,
}

impl Layout {
    fn new(size: u64, k: u64) -> Result<Self, ContentError> {
        if k >= block_count(size) {
            return Err(ContentError::BadRange {
                start: k.saturating_mul(crate::BLOCK_BYTES),
                end: k.saturating_add(1).saturating_mul(crate::BLOCK_BYTES),
                size,
            });
        }
        let tree = BaoTree::new(size, BLOCK_SIZE);
        let range = block_range(size, k);
        let chunks = round_up_to_chunks(&ByteRanges::from(range.clone()));
        let parents = tree
            .ranges_pre_order_chunks_iter_ref(&chunks, 0)
            .filter(|c| matches!(c, BaoChunk::Parent { .. }))
            .count();
        Ok(Self {
            tree,
            chunks,
            range,
            proof: parents * 64,
        })
    }

    fn wire_len(&self) -> usize {
        self.proof + (self.range.end - self.range.start) as usize
    }
}

/// The exact wire length of block `k` of an item of `size` bytes (`None` past
/// the end): a receiver reads no more than that.
pub fn wire_len(size: u64, k: u64) -> Option<u64> {
    Layout::new(size, k).ok().map(|l| l.wire_len() as u64)
}

pub(crate) fn parent_cv(
    left: &ChainingValue,
    right: &ChainingValue,
    is_root: bool,
) -> blake3::Hash {
    if is_root {
        merge_subtrees_root(left, right, Mode::Hash)
    } else {
        merge_subtrees_non_root(left, right, Mode::Hash).into()
    }
}

/// The hash of a leaf (a chunk group, or less at the end) starting at chunk
/// `start_chunk`; only a lone leaf is the root.
pub(crate) fn leaf_cv(start_chunk: u64, data: &[u8], is_root: bool) -> blake3::Hash {
    if is_root {
        blake3::hash(data)
    } else {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(start_chunk * 1024);
        h.update(data);
        h.finalize_non_root().into()
    }
}

/// Checks a block's wire against the content id and returns where its bytes
/// start (they run to the end of `wire`). Every proof node that checks out is
/// handed to `save`, so a partial download learns the tree as blocks arrive.
///
/// `size` comes from the signed manifest; a lie about it cannot make wrong
/// bytes verify, because the root hash commits to the size.
pub fn verify(
    id: ContentId,
    size: u64,
    k: u64,
    wire: &[u8],
    mut save: impl FnMut(TreeNode, &Pair),
) -> Result<usize, ContentError> {
    let layout = Layout::new(size, k)?;
    if wire.len() != layout.wire_len() {
        return Err(verification(format!(
            "block {k} came as {} bytes where its wire is {}",
            wire.len(),
            layout.wire_len()
        )));
    }
    let (proof, data) = wire.split_at(layout.proof);
    // Hashes still to be checked, the next one on top (a tree of up to 2^64
    // bytes is at most 64 levels deep).
    let mut expected: Vec<blake3::Hash> = Vec::with_capacity(64);
    expected.push(blake3::Hash::from_bytes(id.0));
    let (mut p, mut d) = (proof.chunks_exact(64), 0usize);
    for item in layout
        .tree
        .ranges_pre_order_chunks_iter_ref(&layout.chunks, 0)
    {
        let want = expected
            .pop()
            .ok_or_else(|| verification("proof walk out of step"))?;
        match item {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                let pair: &Pair = p
                    .next()
                    .and_then(|c| c.try_into().ok())
                    .ok_or_else(|| verification("proof ended early"))?;
                let (l, r) = pair.split_at(32);
                let l: ChainingValue = l.try_into().expect("32 bytes");
                let r: ChainingValue = r.try_into().expect("32 bytes");
                if parent_cv(&l, &r, is_root) != want {
                    return Err(verification(format!("proof node {node:?} does not match")));
                }
                save(node, pair);
                if right {
                    expected.push(r.into());
                }
                if left {
                    expected.push(l.into());
                }
            }
            BaoChunk::Leaf {
                start_chunk,
                size,
                is_root,
                ..
            } => {
                let leaf = data
                    .get(d..d + size)
                    .ok_or_else(|| verification("data ended early"))?;
                if leaf_cv(start_chunk.0, leaf, is_root) != want {
                    return Err(verification(format!(
                        "bytes at {} do not match",
                        start_chunk.to_bytes()
                    )));
                }
                d += size;
            }
        }
    }
    if d != data.len() || p.next().is_some() {
        return Err(verification(
            "block wire has bytes the proof does not cover",
        ));
    }
    Ok(layout.proof)
}

impl Outboard {
    /// Encodes block `k` of the item whose bytes are in `data` (see
    /// [`encode`]).
    pub fn encode_block(
        &self,
        data: impl AsFd,
        k: u64,
        validate: bool,
    ) -> Result<Vec<u8>, ContentError> {
        encode(data, &self.inner, k, validate)
    }
}

/// Encodes block `k`: its proof from `outboard`, then its bytes read from
/// `data` straight into the wire buffer (no zero-fill, no second copy). With
/// `validate` the result is checked like a receiver would, so bit rot on this
/// disk is caught here rather than sent.
pub fn encode(
    data: impl AsFd,
    outboard: impl OutboardRead,
    k: u64,
    validate: bool,
) -> Result<Vec<u8>, ContentError> {
    let tree = outboard.tree();
    let layout = Layout::new(tree.size(), k)?;
    let mut wire = Vec::with_capacity(layout.wire_len());
    for item in tree.ranges_pre_order_chunks_iter_ref(&layout.chunks, 0) {
        if let BaoChunk::Parent { node, .. } = item {
            let (l, r) = outboard
                .load(node)
                .map_err(ContentError::Encode)?
                .ok_or_else(|| {
                    ContentError::Encode(std::io::Error::other(format!(
                        "tree node {node:?} missing"
                    )))
                })?;
            wire.extend_from_slice(l.as_bytes());
            wire.extend_from_slice(r.as_bytes());
        }
    }
    read_into(data, &mut wire, layout.wire_len(), layout.range.start)
        .map_err(ContentError::Encode)?;
    if validate {
        verify(outboard.root().into(), tree.size(), k, &wire, |_, _| {})?;
    }
    Ok(wire)
}

/// Appends the file's bytes from `offset` to `buf` until it holds `want`
/// bytes, reading into the spare capacity without zeroing it first.
fn read_into(data: impl AsFd, buf: &mut Vec<u8>, want: usize, offset: u64) -> std::io::Result<()> {
    let start = buf.len();
    buf.reserve_exact(want - start);
    while buf.len() < want {
        let at = offset + (buf.len() - start) as u64;
        let n = rustix::io::pread(&data, rustix::buffer::spare_capacity(buf), at)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the data file is shorter than its item",
            ));
        }
    }
    // The capacity may exceed what was asked for, and a read may fill it.
    buf.truncate(want);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Outboard;
    use bao_tree::io::outboard::PreOrderOutboard;
    use proptest::prelude::*;
    use std::io::Write;

    fn item(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 53) as u8)
            .collect()
    }

    fn file(data: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    fn ignore(_: TreeNode, _: &Pair) {}

    fn tree(ob: &Outboard) -> PreOrderOutboard<&[u8]> {
        PreOrderOutboard {
            root: blake3::Hash::from_bytes(ob.id().0),
            tree: BaoTree::new(ob.size(), BLOCK_SIZE),
            data: ob.tree_bytes(),
        }
    }

    #[test]
    fn every_block_round_trips_and_carries_the_same_proof_as_bao() {
        // One leaf, a partial last group, and several blocks with a short tail.
        for len in [1, 5_000, 16_384, 300_000, 1_000_000] {
            let data = item(len);
            let ob = Outboard::compute(&data);
            let f = file(&data);
            for k in 0..block_count(len as u64) {
                let wire = encode(&f, tree(&ob), k, true).unwrap();
                assert_eq!(wire.len() as u64, wire_len(len as u64, k).unwrap());
                let mut saved = Vec::new();
                let at = verify(ob.id(), len as u64, k, &wire, |n, p| saved.push((n, *p))).unwrap();
                let r = block_range(len as u64, k);
                assert_eq!(&wire[at..], &data[r.start as usize..r.end as usize]);
                // bao's own encoding of the range holds the same nodes.
                let bao = crate::encode_range(&data[..], &ob, r.clone()).unwrap();
                assert_eq!(bao.len(), wire.len());
                assert_eq!(saved.len() * 64, at);
            }
        }
    }

    #[test]
    fn wrong_id_size_block_or_length_are_errors() {
        let data = item(600_000);
        let ob = Outboard::compute(&data);
        let f = file(&data);
        let wire = encode(&f, tree(&ob), 1, false).unwrap();
        let other = ContentId::from(blake3::hash(b"other"));
        let none = |_: TreeNode, _: &Pair| {};
        assert!(matches!(
            verify(other, 600_000, 1, &wire, none),
            Err(ContentError::Verification(_))
        ));
        // A size that the last block (which the fetcher checks first) does not
        // back up; the root hash commits to it there.
        let last = encode(&f, tree(&ob), 2, false).unwrap();
        verify(ob.id(), 600_000, 2, &last, none).unwrap();
        let mut padded = last.clone();
        padded.push(0);
        assert!(verify(ob.id(), 600_001, 2, &padded, none).is_err());
        assert!(verify(ob.id(), 599_999, 2, &last[..last.len() - 1], none).is_err());
        assert!(verify(ob.id(), 600_000, 0, &wire, none).is_err());
        assert!(verify(ob.id(), 600_000, 1, &wire[..wire.len() - 1], none).is_err());
        let mut longer = wire.clone();
        longer.push(0);
        assert!(verify(ob.id(), 600_000, 1, &longer, none).is_err());
        assert!(matches!(
            verify(ob.id(), 600_000, 3, &wire, none),
            Err(ContentError::BadRange { .. })
        ));
        assert!(matches!(
            encode(&f, tree(&ob), 3, false),
            Err(ContentError::BadRange { .. })
        ));
    }

    #[test]
    fn rot_in_the_local_file_is_caught_when_validating() {
        let mut data = item(400_000);
        let ob = Outboard::compute(&data);
        data[300_000] ^= 1;
        let f = file(&data);
        assert!(encode(&f, tree(&ob), 1, true).is_err());
        // Unvalidated, it goes out, and the receiver refuses it.
        let wire = encode(&f, tree(&ob), 1, false).unwrap();
        assert!(verify(ob.id(), 400_000, 1, &wire, |_, _| {}).is_err());
        // The other block is untouched.
        encode(&f, tree(&ob), 0, true).unwrap();
        // A file cut short is an error, not a short block.
        let short = file(&data[..350_000]);
        assert!(matches!(
            encode(&short, tree(&ob), 1, false),
            Err(ContentError::Encode(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// No flipped bit anywhere in a block's wire (proof or data) verifies.
        #[test]
        fn any_flipped_bit_is_refused(
            len in 1usize..700_000,
            pick in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let data = item(len);
            let ob = Outboard::compute(&data);
            let f = file(&data);
            let k = pick.index(block_count(len as u64) as usize) as u64;
            let mut wire = encode(&f, tree(&ob), k, false).unwrap();
            let i = flip.index(wire.len());
            wire[i] ^= 1 << bit;
            let refused = verify(ob.id(), len as u64, k, &wire, ignore).is_err();
            prop_assert!(refused);
        }
    }
}
