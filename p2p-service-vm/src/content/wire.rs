//! Length-prefixed protobuf messages and bounded payloads on a libp2p stream.

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
        .map_err(|e| invalid(e.to_string()))
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
    if len > max {
        return Err(invalid(format!(
            "payload of {len} bytes where at most {max} fit"
        )));
    }
    // Exactly `len` bytes: futures' `read_to_end` grows a full buffer to probe
    // for the end, which reallocates (and copies) every payload once more.
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("payload ended before its {len} bytes"),
            )
        } else {
            e
        }
    })?;
    Ok(buf)
}
