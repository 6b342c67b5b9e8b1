//! Bulk frames: a bulk stream's bytes and its end on a plain byte stream — the
//! channel session that carries it between the back-end and the front-end,
//! where descriptors (and so rings) cannot travel.
//!
//! Each frame is an 8-byte header, `kind: u8`, three zero bytes, `len: u32`
//! (little-endian), then `len` bytes:
//!
//! | kind | name | body |
//! |---|---|---|
//! | 1 | DATA | 1 ..= [`MAX_DATA`] stream bytes |
//! | 2 | END | none: the stream is complete |
//! | 3 | ERROR | `code: u32` (an API `ErrorCode`), then UTF-8 text; ≤ 4 KiB |
//!
//! The receiver (the front-end) treats the sender as untrusted input like any
//! other: an unknown kind, non-zero padding, or a length out of bounds is a
//! protocol error.

use bytes::{Buf, Bytes, BytesMut};

use crate::BulkError;

/// Largest DATA body.
pub const MAX_DATA: u32 = 1 << 20;
/// Largest ERROR body.
pub const MAX_ERROR: u32 = 4096;
/// Header bytes.
pub const HEADER: usize = 8;

const DATA: u8 = 1;
const END: u8 = 2;
const ERROR: u8 = 3;

/// The header of a DATA frame of `len` bytes (the body follows separately,
/// so it is never copied to be framed).
pub fn data_header(len: u32) -> [u8; HEADER] {
    debug_assert!(len > 0 && len <= MAX_DATA);
    header(DATA, len)
}

/// An END frame.
pub fn end() -> [u8; HEADER] {
    header(END, 0)
}

/// An ERROR frame.
pub fn error(code: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR as usize - 4);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let body = 4 + end;
    let mut f = Vec::with_capacity(HEADER + body);
    f.extend_from_slice(&header(ERROR, body as u32));
    f.extend_from_slice(&code.to_le_bytes());
    f.extend_from_slice(&message.as_bytes()[..end]);
    f
}

fn header(kind: u8, len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind;
    h[4..].copy_from_slice(&len.to_le_bytes());
    h
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Stream bytes (possibly a piece of one DATA frame's body).
    Data(Bytes),
    /// The stream is complete.
    End,
    /// The stream failed.
    Error {
        /// The API error code.
        code: u32,
        /// Its text.
        message: String,
    },
}

/// Splits a byte stream, fed in arbitrary chunks, into frames. DATA bodies
/// come out as slices of the chunks fed in: nothing is copied.
#[derive(Debug, Default)]
pub struct Decoder {
    header: BytesMut,
    /// Body bytes of the current DATA frame still to come.
    data_left: u32,
    /// Body of an ERROR frame being gathered, and its length.
    error: Option<(BytesMut, u32)>,
    done: bool,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next frame from `chunk` (consuming what it used), `None` when the
    /// chunk is used up without completing one.
    pub fn next(&mut self, chunk: &mut Bytes) -> Result<Option<Frame>, BulkError> {
        loop {
            if chunk.is_empty() {
                return Ok(None);
            }
            if self.done {
                return Err(BulkError::protocol("bytes after the end of a bulk stream"));
            }
            if self.data_left > 0 {
                let n = chunk.len().min(self.data_left as usize);
                self.data_left -= n as u32;
                return Ok(Some(Frame::Data(chunk.split_to(n))));
            }
            if let Some((body, len)) = &mut self.error {
                let n = chunk.len().min(*len as usize - body.len());
                body.extend_from_slice(&chunk.split_to(n));
                if body.len() == *len as usize {
                    let mut body = self.error.take().expect("gathering an error").0;
                    self.done = true;
                    let code = body.get_u32_le();
                    return Ok(Some(Frame::Error {
                        code,
                        message: String::from_utf8_lossy(&body).into_owned(),
                    }));
                }
                continue;
            }
            let n = chunk.len().min(HEADER - self.header.len());
            self.header.extend_from_slice(&chunk.split_to(n));
            if self.header.len() < HEADER {
                continue;
            }
            let h = std::mem::take(&mut self.header);
            if h[1..4] != [0, 0, 0] {
                return Err(BulkError::protocol(
                    "non-zero padding in a bulk frame header",
                ));
            }
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            match h[0] {
                DATA if (1..=MAX_DATA).contains(&len) => self.data_left = len,
                END if len == 0 => {
                    self.done = true;
                    return Ok(Some(Frame::End));
                }
                ERROR if (4..=MAX_ERROR).contains(&len) => {
                    self.error = Some((BytesMut::with_capacity(len as usize), len))
                }
                kind => {
                    return Err(BulkError::protocol(format!(
                        "bulk frame kind {kind} with {len} bytes"
                    )));
                }
            }
        }
    }

    /// Whether the stream ended (END or ERROR seen).
    pub fn finished(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(data: &[&[u8]], tail: Option<(u32, &str)>) -> Vec<u8> {
        let mut out = Vec::new();
        for d in data {
            out.extend_from_slice(&data_header(d.len() as u32));
            out.extend_from_slice(d);
        }
        match tail {
            None => out.extend_from_slice(&end()),
            Some((code, m)) => out.extend_from_slice(&error(code, m)),
        }
        out
    }

    fn decode_in_pieces(wire: &[u8], cut: usize) -> Result<(Vec<u8>, Frame), BulkError> {
        let mut d = Decoder::new();
        let mut data = Vec::new();
        for piece in wire.chunks(cut.max(1)) {
            let mut chunk = Bytes::copy_from_slice(piece);
            while let Some(f) = d.next(&mut chunk)? {
                match f {
                    Frame::Data(b) => data.extend_from_slice(&b),
                    other => return Ok((data, other)),
                }
            }
        }
        Err(BulkError::protocol("no end"))
    }

    proptest! {
        #[test]
        fn any_cut_decodes_the_same(cut in 1usize..64, n in 1usize..5, code in 1u32..20) {
            let body: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
            let parts: Vec<&[u8]> = (0..n).map(|i| &body[..(i + 1) * 37]).collect();
            let want: Vec<u8> = parts.concat();
            let (got, end) = decode_in_pieces(&encode(&parts, None), cut).unwrap();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(end, Frame::End);
            let (got, end) = decode_in_pieces(&encode(&parts, Some((code, "no such item"))), cut).unwrap();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(end, Frame::Error { code, message: "no such item".into() });
        }

        #[test]
        fn arbitrary_bytes_never_panic(wire in proptest::collection::vec(any::<u8>(), 0..2048), cut in 1usize..100) {
            let _ = decode_in_pieces(&wire, cut);
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            header(DATA, 0),
            header(DATA, MAX_DATA + 1),
            header(END, 1),
            header(ERROR, 2),
            header(ERROR, MAX_ERROR + 1),
            header(9, 0),
            [DATA, 1, 0, 0, 1, 0, 0, 0],
        ] {
            let mut chunk = Bytes::copy_from_slice(&bad);
            assert!(
                matches!(Decoder::new().next(&mut chunk), Err(BulkError::Protocol(_))),
                "{bad:?}"
            );
        }
        let mut wire = Bytes::from(encode(&[b"x"], None));
        wire = [wire, Bytes::from_static(b"more")].concat().into();
        let mut d = Decoder::new();
        let mut seen_end = false;
        let r = loop {
            match d.next(&mut wire) {
                Ok(Some(Frame::End)) => seen_end = true,
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        assert!(seen_end && r.is_err(), "bytes after END are refused");
    }
}
