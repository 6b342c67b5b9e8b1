//! A proof of an item's size that costs a couple of KiB instead of a block.
//!
//! A signed manifest may lie about the size, so a fetcher has it proven
//! before the size allocates or schedules anything. BLAKE3's tree shape
//! depends on the length: the path from the root down to the item's last
//! 1 KiB chunk, with that chunk, proves it (bao's answer to the same
//! question). The wire:
//!
//! ```text
//!  [ the right spine's parent pairs, 64 bytes each, root first ]
//!  [ the last chunk's bytes (1 to 1024)                         ]
//! ```
//!
//! A 16 MiB item's proof is 1,920 bytes, where its last block was 256 KiB.
//! In a flash crowd every newcomer asks the publisher for one: sending each of
//! them the last block had cost the publisher a whole item's upload before
//! anyone got a second block.
//!
//! Why a verified spine proves the size: the verifier derives the spine's depth
//! and the last chunk's index and length from the claimed size. Parents, and
//! chunks of different index or length, hash under different BLAKE3 flags and
//! counters, so a path that checks out against the root for one size cannot
//! also check out for another.

use blake3::hazmat::{ChainingValue, HasherExt, Mode, merge_subtrees_non_root};

use crate::block::{BLOCK_BYTES, block_count};
use crate::block::{Pair, leaf_cv, parent_cv};
use crate::verified::verification;
use crate::{ContentError, ContentId};

const CHUNK: u64 = 1024;
const CHUNKS_PER_BLOCK: u64 = BLOCK_BYTES / CHUNK;

/// Chunks in an item of `size` bytes (at least 1).
fn chunks(size: u64) -> u64 {
    size.div_ceil(CHUNK).max(1)
}

/// Parent pairs on the path from the root to the last chunk of a tree of
/// `n` chunks: each level's left subtree takes the largest power of two below
/// `n`, i.e. the top bit of `n - 1`, so one level per bit.
fn spine_depth(n: u64) -> u32 {
    (n - 1).count_ones()
}

/// Bytes in the last chunk of an item of `size` bytes.
fn last_chunk_len(size: u64) -> u64 {
    size - (chunks(size) - 1) * CHUNK
}

/// The exact wire length of the size proof of an item of `size` bytes (0 for
/// an empty item, whose id alone proves it): a receiver reads no more.
pub fn wire_len(size: u64) -> u64 {
    if size == 0 {
        return 0;
    }
    u64::from(spine_depth(chunks(size))) * 64 + last_chunk_len(size)
}

/// The chaining value of the subtree of whole chunks `data` starting at chunk
/// `start` (never the root).
fn subtree_cv(start: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(start * CHUNK);
    h.update(data);
    h.finalize_non_root()
}

/// Derives the size proof from the verified wire of the item's last block
/// ([`crate::block`]): its proof opens with the spine pairs above the block
/// (the block is a subtree on the spine, as blocks are aligned powers of two),
/// and the pairs below it come from hashing the block's bytes.
pub fn from_last_block(size: u64, wire: &[u8]) -> Result<Vec<u8>, ContentError> {
    let k = block_count(size)
        .checked_sub(1)
        .ok_or_else(|| verification("an empty item has no last block"))?;
    let data_len = (size - k * BLOCK_BYTES) as usize;
    let above = k.count_ones() as usize * 64;
    if wire.len() < above + data_len {
        return Err(verification("last block wire too short for its proof"));
    }
    let data = &wire[wire.len() - data_len..];
    let mut proof = Vec::with_capacity(wire_len(size) as usize);
    proof.extend_from_slice(&wire[..above]);
    // Down the block's own spine: each left subtree hashed once, then the
    // right-hand values built back up from the last chunk.
    let first = k * CHUNKS_PER_BLOCK;
    let (mut n, mut at) = (chunks(data_len as u64), 0u64);
    let mut lefts = Vec::new();
    while n > 1 {
        let left = 1u64 << (63 - (n - 1).leading_zeros());
        let bytes = &data[(at * CHUNK) as usize..((at + left) * CHUNK) as usize];
        lefts.push(subtree_cv(first + at, bytes));
        at += left;
        n -= left;
    }
    let mut right = subtree_cv(first + at, &data[(at * CHUNK) as usize..]);
    let mut pairs = Vec::with_capacity(lefts.len());
    for left in lefts.iter().rev() {
        pairs.push((*left, right));
        right = merge_subtrees_non_root(left, &right, Mode::Hash);
    }
    for (l, r) in pairs.iter().rev() {
        proof.extend_from_slice(l);
        proof.extend_from_slice(r);
    }
    proof.extend_from_slice(&data[(at * CHUNK) as usize..]);
    Ok(proof)
}

/// Checks that `proof` proves an item of `id` is `size` bytes long.
pub fn verify(id: ContentId, size: u64, proof: &[u8]) -> Result<(), ContentError> {
    if size == 0 {
        return if id == ContentId::from(blake3::hash(b"")) && proof.is_empty() {
            Ok(())
        } else {
            Err(verification("not the empty item"))
        };
    }
    if proof.len() as u64 != wire_len(size) {
        return Err(verification(format!(
            "size proof came as {} bytes where a proof of {size} bytes is {}",
            proof.len(),
            wire_len(size)
        )));
    }
    let n = chunks(size);
    let depth = spine_depth(n) as usize;
    let (pairs, chunk) = proof.split_at(depth * 64);
    let mut want = blake3::Hash::from_bytes(id.0);
    for (level, pair) in pairs.chunks_exact(64).enumerate() {
        let pair: &Pair = pair.try_into().expect("64 bytes");
        let (l, r) = pair.split_at(32);
        let l: ChainingValue = l.try_into().expect("32 bytes");
        let r: ChainingValue = r.try_into().expect("32 bytes");
        if parent_cv(&l, &r, level == 0) != want {
            return Err(verification(format!(
                "size proof level {level} does not match"
            )));
        }
        want = r.into();
    }
    if leaf_cv(n - 1, chunk, depth == 0) != want {
        return Err(verification("the last chunk does not match"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Outboard;
    use proptest::prelude::*;
    use std::io::Write;

    fn item(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 55) as u8)
            .collect()
    }

    fn proof_of(data: &[u8]) -> (ContentId, Vec<u8>) {
        let ob = Outboard::compute(data);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        let k = block_count(data.len() as u64) - 1;
        let wire = ob.encode_block(&f, k, true).unwrap();
        (ob.id(), from_last_block(data.len() as u64, &wire).unwrap())
    }

    /// The spine computed from the whole item, the slow and obvious way.
    fn spine_from_scratch(data: &[u8]) -> Vec<u8> {
        let (mut n, mut at) = (chunks(data.len() as u64), 0u64);
        let mut out = Vec::new();
        while n > 1 {
            let left = 1u64 << (63 - (n - 1).leading_zeros());
            let l = subtree_cv(
                at,
                &data[(at * CHUNK) as usize..((at + left) * CHUNK) as usize],
            );
            let r = subtree_cv(at + left, &data[((at + left) * CHUNK) as usize..]);
            out.extend_from_slice(&l);
            out.extend_from_slice(&r);
            at += left;
            n -= left;
        }
        out.extend_from_slice(&data[(at * CHUNK) as usize..]);
        out
    }

    #[test]
    fn a_proof_is_small_and_matches_the_tree() {
        for len in [
            1,
            1023,
            1024,
            1025,
            5_000,
            BLOCK_BYTES as usize,
            BLOCK_BYTES as usize + 1,
            3 * BLOCK_BYTES as usize - 7,
            16 << 20,
        ] {
            let data = item(len);
            let (id, proof) = proof_of(&data);
            assert_eq!(proof, spine_from_scratch(&data), "len {len}");
            assert_eq!(proof.len() as u64, wire_len(len as u64));
            verify(id, len as u64, &proof).unwrap();
            assert!(proof.len() as u64 <= 64 * 64 + CHUNK, "len {len}");
        }
        assert_eq!(wire_len(16 << 20), 14 * 64 + 1024);
        assert_eq!(wire_len(0), 0);
        verify(ContentId::from(blake3::hash(b"")), 0, &[]).unwrap();
    }

    #[test]
    fn no_other_size_is_proven() {
        let data = item(700_001);
        let (id, proof) = proof_of(&data);
        for size in [0, 1, 699_999, 700_000, 700_002, 700_001 + 1024, 1 << 20] {
            assert!(verify(id, size, &proof).is_err(), "size {size}");
        }
        // A proof of a neighbouring length proves only that one.
        let (other_id, other) = proof_of(&data[..700_000]);
        assert!(verify(id, 700_000, &other).is_err());
        assert!(verify(other_id, 700_001, &proof).is_err());
        assert!(verify(ContentId::from(blake3::hash(b"")), 0, &[0]).is_err());
        assert!(verify(id, 0, &[]).is_err());
    }

    #[test]
    fn a_short_last_block_wire_is_an_error() {
        assert!(from_last_block(600_000, &[0; 10]).is_err());
        assert!(from_last_block(0, &[]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// No flipped bit anywhere in a size proof verifies, nor a cut or
        /// lengthened one, nor the honest one for a neighbouring size.
        #[test]
        fn any_flipped_bit_or_other_size_is_refused(
            len in 1usize..1_200_000,
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            delta in 1u64..5000,
        ) {
            let data = item(len);
            let (id, proof) = proof_of(&data);
            prop_assert!(verify(id, len as u64, &proof).is_ok());
            let mut bad = proof.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(verify(id, len as u64, &bad).is_err());
            prop_assert!(verify(id, len as u64 + delta, &proof).is_err());
            prop_assert!(verify(id, (len as u64).saturating_sub(delta), &proof).is_err());
            prop_assert!(verify(id, len as u64, &proof[..proof.len() - 1]).is_err());
        }
    }
}
