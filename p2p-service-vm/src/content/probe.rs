//! A misbehaving peer, for end-to-end tests of the content server's defences:
//! it speaks the content protocol over the fast path as any peer would, then
//! breaks the rules a test names. Nothing in the node uses it.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use p2pvm_content::ContentId;
use p2pvm_content::transfer::{BlockRequest, Op, TransferRequest};

use super::fastpath::FastPath;
use super::wire::write_msg;
use p2pvm_security::sealed::{SealedReader, SealedWriter};

/// A fast-path connection whose answers nobody has read.
#[derive(Debug)]
pub struct Unread {
    rd: SealedReader,
    // Held so that the connection stays open from this end.
    _wr: SealedWriter,
}

/// Dials `peer`'s content fast path at `addr` as the node with `key` and asks
/// for blocks `0..blocks` of `item`, `rounds` times over, reading no answer:
/// a peer that keeps asking and never reads.
pub async fn ask_without_reading(
    key: &Keypair,
    peer: PeerId,
    addr: SocketAddr,
    item: ContentId,
    blocks: u64,
    rounds: u32,
) -> std::io::Result<Unread> {
    let fast = FastPath::new(key).map_err(std::io::Error::other)?;
    let (rd, mut wr) = fast.dial(peer, addr).await?;
    for _ in 0..rounds {
        for block in 0..blocks {
            let ask = TransferRequest {
                op: Some(Op::Block(BlockRequest {
                    content_id: item.0.to_vec(),
                    block,
                })),
            };
            write_msg(&mut wr, &ask).await?;
        }
    }
    wr.flush().await?;
    Ok(Unread { rd, _wr: wr })
}

impl Unread {
    /// Reads what arrives until the provider ends the connection: the bytes
    /// that came, or `None` if it was still open after `within`.
    pub async fn drain(mut self, within: Duration) -> Option<u64> {
        let read_all = async {
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            loop {
                match self.rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n as u64,
                }
            }
        };
        tokio::time::timeout(within, read_all).await.ok()
    }
}
