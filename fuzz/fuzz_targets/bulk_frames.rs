//! The front-end's bulk frame decoder against arbitrary bytes from the service
//! side, cut into arbitrary pieces (the first byte picks the cut). It must
//! never panic, never yield more DATA bytes than it was fed, and never yield
//! anything after the stream's end.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use p2pvm_bulk::frames::{Decoder, Frame};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, wire)) = data.split_first() else {
        return;
    };
    let mut d = Decoder::new();
    let mut out = 0usize;
    for piece in wire.chunks(usize::from(cut).max(1)) {
        let mut chunk = Bytes::copy_from_slice(piece);
        loop {
            match d.next(&mut chunk) {
                Ok(Some(Frame::Data(b))) => {
                    assert!(!b.is_empty());
                    out += b.len();
                }
                Ok(Some(_)) => assert!(d.finished()),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert!(out <= wire.len());
});
