//! Feeds arbitrary bytes to the API frame decoder, with a small and the default
//! frame limit. It must never panic, and every frame it accepts must re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pvm_proto::{DEFAULT_MAX_FRAME_BYTES, decode_frame};

fuzz_target!(|data: &[u8]| {
    for limit in [256, DEFAULT_MAX_FRAME_BYTES] {
        for frame in decode_frame(data, limit).into_iter().flatten() {
            let mut codec = p2pvm_proto::FrameCodec::new(limit);
            let mut buf = bytes::BytesMut::new();
            tokio_util::codec::Encoder::encode(&mut codec, frame, &mut buf)
                .expect("an accepted frame re-encodes within the limit");
        }
    }
});
