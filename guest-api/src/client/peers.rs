//! The node itself and its peers: who this node is, whom it is connected
//! to, connecting and disconnecting, finding a peer in the DHT.

use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::error::Result;

impl Client {
    /// This node's peer id, listen addresses and version.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// println!("{}", c.node_info().await?.peer_id);
    /// # Ok(()) }
    /// ```
    pub async fn node_info(&self) -> Result<pb::NodeInfo> {
        let op = Op::NodeInfo(pb::NodeInfoRequest {});
        self.call(op, reply!(NodeInfo)).await
    }

    /// Connected peers.
    pub async fn peers(&self) -> Result<Vec<pb::PeerInfo>> {
        let op = Op::Peers(pb::PeersRequest {});
        Ok(self.call(op, reply!(Peers)).await?.peers)
    }

    /// Connects to a peer by multiaddr(s) (ending in `/p2p/<id>`) or by id.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// c.connect("", ["/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo…"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect<I, S>(&self, peer_id: &str, addrs: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let op = Op::Connect(pb::ConnectRequest {
            peer_id: peer_id.into(),
            addrs: addrs.into_iter().map(Into::into).collect(),
            timeout_ms: 0,
        });
        Ok(self.call(op, reply!(Peer)).await?.peer_id)
    }

    /// Closes all connections to a peer (admin only).
    pub async fn disconnect(&self, peer_id: &str) -> Result<()> {
        self.ok(Op::Disconnect(pb::DisconnectRequest {
            peer_id: peer_id.into(),
        }))
        .await
    }

    /// Looks a peer up in the DHT.
    pub async fn find_peer(&self, peer_id: &str) -> Result<pb::PeerInfo> {
        let op = Op::FindPeer(pb::FindPeerRequest {
            peer_id: peer_id.into(),
            timeout_ms: 0,
        });
        self.call(op, reply!(Peer)).await
    }
}
