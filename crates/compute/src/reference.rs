//! Native equivalents of the example jobs in `examples/compute/`: the
//! baseline the compute benchmark measures against, and what tests check a
//! job's output with.

/// The example job's path, from the workspace root.
pub const HASHCHAIN_WAT: &str = include_str!("../../../examples/compute/hashchain.wat");

/// `examples/compute/hashchain.wat` in Rust: `input` is an 8-byte
/// little-endian round count and the data; the result is 16 hex digits.
/// `None` when the input has no round count.
pub fn hashchain(input: &[u8]) -> Option<String> {
    let (count, data) = input.split_first_chunk::<8>()?;
    let rounds = u64::from_le_bytes(*count);
    // The words once, zero-padded, as the module lays them out in memory.
    let words: Vec<u64> = data
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    let mut h: u64 = 0x243F_6A88_85A3_08D3;
    for r in 0..rounds {
        for &w in &words {
            h = (h ^ w).rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            h ^= h >> 32;
        }
        h = h.wrapping_add(r);
    }
    Some(format!("{h:016x}"))
}

/// An input for [`hashchain`]: `rounds`, then `data_len` bytes of a fixed
/// pattern.
pub fn hashchain_input(rounds: u64, data_len: usize) -> Vec<u8> {
    let mut v = rounds.to_le_bytes().to_vec();
    v.extend((0..data_len).map(|i| (i as u64).wrapping_mul(2_654_435_761) as u8));
    v
}
