//! Length-prefixed protobuf messages and bounded payloads on a content stream
//! (a libp2p stream, or the fast path's sealed frames).

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use p2pvm_content::transfer::{self, MAX_HEADER_BYTES};
use prost::Message;

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Reads one message; `None` at a clean end of stream.
pub(crate) async fn read_msg<M: Message + Default>(
    r: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<M>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(invalid(format!("message of {len} bytes is too large")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    M::decode(buf.as_slice())
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes one message (not flushed).
pub(crate) async fn write_msg(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &impl Message,
) -> std::io::Result<()> {
    w.write_all(&transfer::frame(msg)).await
}

/// Reads a payload the header announced, refusing more than `max` bytes.
pub(crate) async fn read_payload(
    r: &mut (impl AsyncRead + Unpin),
    len: u64,
    max: u64,
) -> std::io::Result<Vec<u8>> {
    within(len, max)?;
    // Exactly `len` bytes: futures' `read_to_end` grows a full buffer to probe
    // for the end, which reallocates (and copies) every payload once more.
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await.map_err(short(len))?;
    Ok(buf)
}

/// Refuses a payload larger than any honest answer before reading any of it.
fn within(len: u64, max: u64) -> std::io::Result<()> {
    if len > max {
        return Err(invalid(format!(
            "payload of {len} bytes where at most {max} fit"
        )));
    }
    Ok(())
}

/// Names a payload that ended early as such.
fn short(len: u64) -> impl Fn(std::io::Error) -> std::io::Error {
    move |e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("payload ended before its {len} bytes"),
            )
        } else {
            e
        }
    }
}

/// The reading half of a content stream. Payloads come out as `Bytes`: the
/// fast path hands over the buffer a payload was decrypted in.
pub(crate) trait PayloadRead: AsyncRead + Unpin + Send + 'static {
    /// Reads exactly `len` payload bytes.
    fn read_bytes(&mut self, len: usize) -> impl Future<Output = std::io::Result<Bytes>> + Send;
}

/// The writing half of a content stream.
pub(crate) trait PayloadWrite: AsyncWrite + Unpin + Send + 'static {
    /// Writes a payload after what was written before it (not flushed); the
    /// fast path seals it in place.
    fn write_payload(
        &mut self,
        payload: Vec<u8>,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl<S: AsyncRead + Send + 'static> PayloadRead for futures::io::ReadHalf<S> {
    async fn read_bytes(&mut self, len: usize) -> std::io::Result<Bytes> {
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf).await?;
        Ok(buf.into())
    }
}

impl<S: AsyncWrite + Send + 'static> PayloadWrite for futures::io::WriteHalf<S> {
    async fn write_payload(&mut self, payload: Vec<u8>) -> std::io::Result<()> {
        self.write_all(&payload).await
    }
}

impl PayloadRead for p2pvm_security::sealed::SealedReader {
    fn read_bytes(&mut self, len: usize) -> impl Future<Output = std::io::Result<Bytes>> + Send {
        p2pvm_security::sealed::SealedReader::read_bytes(self, len)
    }
}

impl PayloadWrite for p2pvm_security::sealed::SealedWriter {
    fn write_payload(
        &mut self,
        payload: Vec<u8>,
    ) -> impl Future<Output = std::io::Result<()>> + Send {
        p2pvm_security::sealed::SealedWriter::write_payload(self, payload)
    }
}

/// [`read_payload`] on a stream half, keeping the bytes where they landed.
pub(crate) async fn read_payload_bytes(
    r: &mut impl PayloadRead,
    len: u64,
    max: u64,
) -> std::io::Result<Bytes> {
    within(len, max)?;
    r.read_bytes(len as usize).await.map_err(short(len))
}

/// A connection's two halves as one stream (a group session's sealed
/// reader and writer), for the request-answer helpers.
pub(crate) struct Duplex<R, W>(pub R, pub W);

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Duplex<R, W> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Duplex<R, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.1).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.1).poll_flush(cx)
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.1).poll_close(cx)
    }
}
