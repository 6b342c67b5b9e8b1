//! Length-delimited framing: a 4-byte big-endian length, then one protobuf `Frame`.
//!
//! The length is checked against the limit before any payload is buffered, so an
//! oversized or hostile prefix costs the receiver four bytes, not a large allocation.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::pb;

const LEN_PREFIX_BYTES: usize = 4;

/// Why bytes could not be turned into a frame (or a frame into bytes).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("Frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The payload is not a valid protobuf `Frame`.
    #[error("Malformed frame")]
    Malformed(#[source] prost::DecodeError),
    /// The frame decoded but carries no kind.
    #[error("Frame has no kind")]
    Empty,
    /// The underlying transport failed.
    #[error("Transport I/O failed")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The API error code to report to the other side.
    pub fn code(&self) -> pb::ErrorCode {
        match self {
            FrameError::TooLarge { .. } => pb::ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) | FrameError::Empty => pb::ErrorCode::MalformedFrame,
            FrameError::Io(_) => pb::ErrorCode::Unavailable,
        }
    }
}

/// A `tokio_util` codec for API frames with a maximum frame size.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl FrameCodec {
    /// A codec that refuses frames larger than `max_frame_bytes`.
    pub fn new(max_frame_bytes: u32) -> Self {
        Self {
            max_frame_bytes: max_frame_bytes as usize,
        }
    }

    /// The limit in force.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(crate::DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Decoder for FrameCodec {
    type Item = pb::Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<pb::Frame>, FrameError> {
        if src.len() < LEN_PREFIX_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        if src.len() < LEN_PREFIX_BYTES + len {
            src.reserve(LEN_PREFIX_BYTES + len - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX_BYTES);
        let payload = src.split_to(len).freeze();
        let frame = pb::Frame::decode(payload).map_err(FrameError::Malformed)?;
        if frame.kind.is_none() {
            return Err(FrameError::Empty);
        }
        Ok(Some(frame))
    }
}

impl Encoder<pb::Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: pb::Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = frame.encoded_len();
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        dst.reserve(LEN_PREFIX_BYTES + len);
        dst.put_u32(len as u32);
        frame
            .encode(dst)
            .expect("buffer reserved for the frame's encoded length");
        Ok(())
    }
}

/// Decodes every frame in `data` until the bytes run out or an error occurs.
///
/// This is the body of the `frame_decoder` fuzz target and of the property tests:
/// whatever the input, it must return, never panic, and never hold more than the
/// limit per frame.
pub fn decode_frame(data: &[u8], max_frame_bytes: u32) -> Vec<Result<pb::Frame, FrameError>> {
    let mut codec = FrameCodec::new(max_frame_bytes);
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => out.push(Ok(frame)),
            Ok(None) => break,
            Err(e) => {
                out.push(Err(e));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::frame::Kind;
    use proptest::prelude::*;

    fn publish(topic: String, data: Vec<u8>, id: u64) -> pb::Frame {
        pb::Frame::of(Kind::Request(pb::Request {
            id,
            op: Some(pb::request::Op::Publish(pb::PublishRequest {
                topic,
                data: data.into(),
            })),
        }))
    }

    fn stream_data(stream_id: u64, data: Vec<u8>) -> pb::Frame {
        pb::Frame::of(Kind::StreamData(pb::StreamData {
            stream_id,
            data: data.into(),
        }))
    }

    fn arb_frame() -> impl Strategy<Value = pb::Frame> {
        prop_oneof![
            (
                ".{0,64}",
                proptest::collection::vec(any::<u8>(), 0..2048),
                any::<u64>()
            )
                .prop_map(|(t, d, id)| publish(t, d, id)),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..4096)
            )
                .prop_map(|(s, d)| stream_data(s, d)),
            (any::<u32>(), ".{0,40}", ".{0,40}").prop_map(|(v, token, name)| pb::Frame::of(
                Kind::Hello(pb::Hello {
                    version: v,
                    token,
                    client_name: name
                })
            )),
            (any::<u64>(), 0i32..14, ".{0,80}").prop_map(|(id, code, msg)| pb::Frame::of(
                Kind::Response(pb::Response {
                    id,
                    result: Some(pb::response::Result::Error(pb::Error {
                        code,
                        message: msg
                    })),
                })
            )),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(arb_frame(), 1..8)) {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            for f in &frames {
                codec.encode(f.clone(), &mut buf).unwrap();
            }
            let decoded: Vec<_> = decode_frame(&buf, crate::DEFAULT_MAX_FRAME_BYTES)
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            prop_assert_eq!(decoded, frames);
        }

        #[test]
        fn split_delivery_yields_same_frames(frames in proptest::collection::vec(arb_frame(), 1..6), cut in any::<prop::sample::Index>()) {
            let mut codec = FrameCodec::default();
            let mut wire = BytesMut::new();
            for f in &frames {
                codec.encode(f.clone(), &mut wire).unwrap();
            }
            let cut = cut.index(wire.len());
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() { got.push(f); }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = codec.decode(&mut buf).unwrap() { got.push(f); }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let results = decode_frame(&data, 1024);
            // At most one error, and it is the last thing returned.
            let errors = results.iter().filter(|r| r.is_err()).count();
            prop_assert!(errors <= 1);
            if errors == 1 { prop_assert!(results.last().unwrap().is_err()); }
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0x00, 0x10, 0x00, 0x00, 1, 2, 3][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0x10_0000,
                max: 1024
            }
        ));
        assert_eq!(err.code(), pb::ErrorCode::FrameTooLarge);
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert_eq!(err.code(), pb::ErrorCode::MalformedFrame);
    }

    #[test]
    fn empty_frame_is_refused() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::Empty)));
    }

    #[test]
    fn encoder_refuses_frames_over_limit() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::new();
        let err = codec
            .encode(stream_data(1, vec![0; 200]), &mut buf)
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(buf.is_empty());
    }
}
