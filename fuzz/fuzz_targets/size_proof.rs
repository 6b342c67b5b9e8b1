//! A peer's proof of an item's size against the verifier, for an item whose
//! content id is known. Input: the first byte picks the true size (up to
//! ~1 MiB), the next two a claimed size near it; the rest is the proof, or
//! edits to the honest one. The verifier must never panic, and must accept
//! nothing but the honest proof of the true size.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use p2pvm_content::{Outboard, block_count, size_proof};

const MAX: usize = 1 << 20;

fn data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| (0..MAX as u64).map(|i| (i.wrapping_mul(0x9E37_79B9) >> 7) as u8).collect())
}

fuzz_target!(|input: &[u8]| {
    let [a, b, c, rest @ ..] = input else {
        return;
    };
    let size = (usize::from(*a) * 4099 + 1).min(MAX);
    let item = &data()[..size];
    let ob = Outboard::compute(item);
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(item).unwrap();
    let last = ob.encode_block(&f, block_count(size as u64) - 1, true).unwrap();
    let honest = size_proof::from_last_block(size as u64, &last).unwrap();
    let claimed = (size as u64).wrapping_add_signed(i64::from(i16::from_le_bytes([*b, *c])));
    let proof = if rest.first() == Some(&0) {
        let mut p = honest.clone();
        for e in rest[1..].chunks_exact(3) {
            let at = usize::from(u16::from_le_bytes([e[0], e[1]])) % p.len();
            p[at] ^= e[2];
        }
        p
    } else {
        rest.to_vec()
    };
    if size_proof::verify(ob.id(), claimed, &proof).is_ok() {
        assert_eq!(claimed, size as u64);
        assert_eq!(proof, honest);
    }
});
