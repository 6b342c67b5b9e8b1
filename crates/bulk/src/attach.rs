//! Attaching a bulk stream: the second connection an app opens to the API
//! socket, presenting the ticket its fetch was answered with.
//!
//! ```text
//!  app → server   "P2VB" | version u32 | capacity u32 | ticket [16]        (28 bytes)
//!  server → app   code u32 | length u32 | message                          (code 0: accepted,
//!                 the ring's memfd rides the first bytes with SCM_RIGHTS)
//!  then           one-byte doorbells both ways, until either side closes
//! ```
//!
//! Integers are little-endian. The magic, read as an API frame's big-endian
//! length prefix, is over a gigabyte — larger than any frame a node accepts —
//! so one socket serves both kinds of connection and the first four bytes
//! tell them apart. On the inter-VM hop the front-end forwards the same
//! preamble on a channel session and the back-end answers with the same
//! reply (without a descriptor), followed by [`crate::frames`].

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::BulkError;
use crate::ring::{Ring, RingReader, RingWriter};

/// First bytes of an attaching connection.
pub const MAGIC: [u8; 4] = *b"P2VB";
/// Attach protocol version.
pub const VERSION: u32 = 1;
/// Bytes of a preamble, magic included.
pub const PREAMBLE_BYTES: usize = 28;
/// Bytes of a ticket.
pub const TICKET_BYTES: usize = 16;
/// Longest reply message.
pub const MAX_MESSAGE: usize = 4096;

/// A stream's one-time ticket, as the node issued it.
pub type Ticket = [u8; TICKET_BYTES];

/// What an attaching app sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Ring data bytes wanted (0: the server's default; always bounded).
    pub capacity: u32,
    /// The ticket the fetch was answered with.
    pub ticket: Ticket,
}

impl Preamble {
    /// The wire form.
    pub fn encode(&self) -> [u8; PREAMBLE_BYTES] {
        let mut b = [0u8; PREAMBLE_BYTES];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.capacity.to_le_bytes());
        b[12..].copy_from_slice(&self.ticket);
        b
    }

    /// Reads the rest of a preamble whose magic was already read (and matched).
    pub async fn read_after_magic(r: &mut (impl AsyncRead + Unpin)) -> Result<Self, BulkError> {
        let mut b = [0u8; PREAMBLE_BYTES - 4];
        r.read_exact(&mut b).await?;
        let version = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(BulkError::protocol(format!(
                "bulk attach version {version}, this build speaks {VERSION}"
            )));
        }
        Ok(Self {
            capacity: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            ticket: b[8..].try_into().expect("16 bytes"),
        })
    }
}

/// Whether a connection's first four bytes start a bulk attachment.
pub fn is_attach(first: &[u8; 4]) -> bool {
    *first == MAGIC
}

/// The server's answer to a preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 0 when accepted, else an API `ErrorCode`.
    pub code: u32,
    /// Why not (empty when accepted).
    pub message: String,
}

impl Reply {
    /// Accepted.
    pub fn ok() -> Self {
        Self {
            code: 0,
            message: String::new(),
        }
    }

    /// Refused with an API error code.
    pub fn refused(code: u32, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self { code, message }
    }

    fn header(&self) -> [u8; 8] {
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&self.code.to_le_bytes());
        h[4..].copy_from_slice(&(self.message.len() as u32).to_le_bytes());
        h
    }

    /// Writes the reply on a byte stream (the channel hop).
    pub async fn write(&self, w: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
        w.write_all(&self.header()).await?;
        w.write_all(self.message.as_bytes()).await?;
        w.flush().await
    }

    /// Reads a reply from a byte stream; `header` when its first 8 bytes were
    /// already received.
    pub async fn read(r: &mut (impl AsyncRead + Unpin)) -> Result<Self, BulkError> {
        let mut h = [0u8; 8];
        r.read_exact(&mut h).await?;
        Self::read_rest(h, r).await
    }

    async fn read_rest(h: [u8; 8], r: &mut (impl AsyncRead + Unpin)) -> Result<Self, BulkError> {
        let code = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(h[4..].try_into().expect("4 bytes")) as usize;
        if len > MAX_MESSAGE {
            return Err(BulkError::protocol(format!("a reply of {len} bytes")));
        }
        let mut m = vec![0u8; len];
        r.read_exact(&mut m).await?;
        Ok(Self {
            code,
            message: String::from_utf8_lossy(&m).into_owned(),
        })
    }
}

/// Server side: creates a ring of (about) `capacity` bytes, hands it to the app
/// on `conn`, and returns the producer end.
pub async fn offer_ring(conn: UnixStream, capacity: u64) -> Result<RingWriter, BulkError> {
    let ring = Ring::create(capacity)?;
    let header = Reply::ok().header();
    let fds = [ring.file().as_fd()];
    let sent = conn
        .async_io(Interest::WRITABLE, || {
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut anc = SendAncillaryBuffer::new(&mut space);
            anc.push(SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(
                &conn,
                &[IoSlice::new(&header)],
                &mut anc,
                SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        })
        .await?;
    if sent != header.len() {
        // Eight bytes into an empty socket buffer: anything else means the
        // app's end is broken.
        return Err(BulkError::PeerGone);
    }
    Ok(RingWriter::new(ring, conn))
}

/// Server side: refuses the attachment.
pub async fn refuse(mut conn: UnixStream, reply: &Reply) {
    let _ = reply.write(&mut conn).await;
}

/// App side: connects to the API socket at `path`, presents the ticket and
/// maps the ring it is given.
pub async fn attach(path: &Path, preamble: &Preamble) -> Result<RingReader, BulkError> {
    let mut conn = UnixStream::connect(path).await?;
    conn.write_all(&preamble.encode()).await?;
    let mut h = [0u8; 8];
    let mut fds: Vec<OwnedFd> = Vec::new();
    let got = conn
        .async_io(Interest::READABLE, || {
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let r = rustix::net::recvmsg(
                &conn,
                &mut [IoSliceMut::new(&mut h)],
                &mut anc,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            for msg in anc.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = msg {
                    fds.extend(rights);
                }
            }
            Ok(r.bytes)
        })
        .await?;
    if got == 0 {
        return Err(BulkError::PeerGone);
    }
    if got < h.len() {
        conn.read_exact(&mut h[got..]).await?;
    }
    let reply = Reply::read_rest(h, &mut conn).await?;
    if reply.code != 0 {
        return Err(BulkError::Failed {
            code: reply.code,
            message: reply.message,
        });
    }
    let [fd]: [OwnedFd; 1] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
        BulkError::protocol(format!("expected the ring's descriptor, got {}", v.len()))
    })?;
    let ring = Ring::open(File::from(fd))?;
    Ok(RingReader::new(ring, conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_magic_is_no_frame_length() {
        // A node's frame limit is far below what the magic reads as.
        assert!(u32::from_be_bytes(MAGIC) > 1 << 30);
    }

    #[tokio::test]
    async fn preambles_and_replies_round_trip() {
        let p = Preamble {
            capacity: 1 << 20,
            ticket: [7; TICKET_BYTES],
        };
        let wire = p.encode();
        assert!(is_attach(wire[..4].try_into().unwrap()));
        let got = Preamble::read_after_magic(&mut &wire[4..]).await.unwrap();
        assert_eq!(got, p);
        let mut bad = wire;
        bad[4] = 9;
        assert!(Preamble::read_after_magic(&mut &bad[4..]).await.is_err());

        let r = Reply::refused(5, "x".repeat(10_000));
        let mut buf = Vec::new();
        r.write(&mut buf).await.unwrap();
        let back = Reply::read(&mut buf.as_slice()).await.unwrap();
        assert_eq!(back.code, 5);
        assert_eq!(back.message.len(), MAX_MESSAGE);
    }
}
