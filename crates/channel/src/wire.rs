//! The message format inside one buffer: a 16-byte header and a payload.
//!
//! ```text
//! 0  kind    u8   OPEN | DATA | CREDIT | FIN | RST
//! 1  flags   u8   zero
//! 2  rsvd    u16  zero
//! 4  session u32  chosen by the front-end when it opens the session
//! 8  len     u32  payload bytes that follow the header
//! 12 value   u32  CREDIT: bytes returned to the sender's window; otherwise zero
//! ```
//! Little-endian throughout, like virtio.

/// Bytes of a message header.
pub const HEADER_LEN: usize = 16;

/// What a message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Front-end → back-end: a new session (one app connection) begins.
    Open = 1,
    /// Bytes of a session's stream.
    Data = 2,
    /// The receiver consumed `value` bytes: the sender may send that much more.
    Credit = 3,
    /// The sender will send no more bytes on this session (half-close).
    Fin = 4,
    /// The session is aborted in both directions.
    Rst = 5,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What it is.
    pub kind: Kind,
    /// Which session.
    pub session: u32,
    /// Payload length.
    pub len: u32,
    /// Kind-specific value.
    pub value: u32,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Unknown kind byte.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Reserved bits set.
    #[error("reserved header bits are set")]
    Reserved,
    /// Only DATA carries a payload.
    #[error("{0:?} message with a {1}-byte payload")]
    UnexpectedPayload(Kind, u32),
}

impl Header {
    /// A header without payload.
    pub fn control(kind: Kind, session: u32, value: u32) -> Self {
        Self {
            kind,
            session,
            len: 0,
            value,
        }
    }

    /// Encodes to bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[4..8].copy_from_slice(&self.session.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Decodes and checks everything that does not depend on session state.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
        let kind = match b[0] {
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Credit,
            4 => Kind::Fin,
            5 => Kind::Rst,
            k => return Err(HeaderError::Kind(k)),
        };
        if b[1] != 0 || b[2] != 0 || b[3] != 0 {
            return Err(HeaderError::Reserved);
        }
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = Self {
            kind,
            session: word(4),
            len: word(8),
            value: word(12),
        };
        if kind != Kind::Data && h.len != 0 {
            return Err(HeaderError::UnexpectedPayload(kind, h.len));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::array::uniform16(any::<u8>())) {
            if let Ok(h) = Header::decode(&b) {
                prop_assert_eq!(h.encode(), b);
            }
        }
    }

    #[test]
    fn round_trip() {
        let h = Header {
            kind: Kind::Data,
            session: 9,
            len: 100,
            value: 0,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[0] = 9;
        assert_eq!(Header::decode(&b), Err(HeaderError::Kind(9)));
    }
}
