//! A block's wire from a peer (proof, then bytes) against the verifier, for
//! an item whose content id is known. Input: the first two bytes pick the
//! item size (up to ~1 MiB) and block; the rest is the wire, or edits to the
//! honest wire. The verifier must never panic, and whatever it accepts must
//! be exactly the honest block.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use p2pvm_content::{BLOCK_BYTES, Outboard, block, block_count, block_range};

const MAX: usize = 1 << 20;

fn data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| (0..MAX as u64).map(|i| (i.wrapping_mul(0x9E37_79B9) >> 7) as u8).collect())
}

fuzz_target!(|input: &[u8]| {
    let [a, b, rest @ ..] = input else {
        return;
    };
    let size = (usize::from(*a) * 4099 + 1).min(MAX);
    let item = &data()[..size];
    let ob = Outboard::compute(item);
    let k = u64::from(*b) % block_count(size as u64);
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(item).unwrap();
    let honest = ob.encode_block(&f, k, true).unwrap();
    let r = block_range(size as u64, k);
    let truth = &item[r.start as usize..r.end as usize];
    // Either arbitrary bytes, or the honest wire with byte edits (pairs of
    // position, xor) so the fuzzer reaches past the first hash check.
    let wire = if rest.first() == Some(&0) {
        let mut w = honest.clone();
        for e in rest[1..].chunks_exact(3) {
            let at = usize::from(u16::from_le_bytes([e[0], e[1]])) * 7 % w.len();
            w[at] ^= e[2];
        }
        w
    } else {
        rest.to_vec()
    };
    if let Ok(at) = block::verify(ob.id(), size as u64, k, &wire, |_, _| {}) {
        assert_eq!(&wire[at..], truth);
        assert!(wire.len() as u64 <= BLOCK_BYTES + 64 * 64);
    }
});
