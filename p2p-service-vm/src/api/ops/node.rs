//! The node itself: its identity and addresses, its peers, connecting and
//! disconnecting, finding a peer. Answered by one node call each.

use libp2p::Multiaddr;
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::{parse_peer, timeout_of};
use crate::api::apps::Principal;
use crate::api::{ApiError, ApiService};
use crate::node::{Command, PeerSummary};

fn parse_addr(s: &str) -> Result<Multiaddr, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad(format!("invalid multiaddr {s:?}")))
}

/// `p` as the API shows it; what this node serves each peer only to admin
/// callers (an app need not learn whom the node serves).
fn peer_info(svc: &ApiService, who: &Principal, p: PeerSummary) -> pb::PeerInfo {
    let content_streams = if who.admin {
        svc.content().streams_served_to(&p.peer_id) as u32
    } else {
        0
    };
    pb::PeerInfo {
        peer_id: p.peer_id.to_string(),
        addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
        agent_version: p.agent_version.unwrap_or_default(),
        rtt_micros: p.rtt.map(|d| d.as_micros() as u64).unwrap_or(0),
        content_streams,
        connections: p
            .connections
            .iter()
            .map(|c| pb::ConnectionInfo {
                remote_addr: c.remote.to_string(),
                kind: match (c.relayed, c.mapped) {
                    (true, _) => "relayed",
                    (false, true) => "mapped",
                    (false, false) => "direct",
                }
                .into(),
                transport: crate::node::transport_of(&c.remote).into(),
                outbound: c.outbound,
            })
            .collect(),
    }
}

/// Node info from the status the event loop publishes; answered inline.
pub(crate) fn node_info(svc: &ApiService) -> R {
    let node = &svc.inner.ctx.node;
    let (addrs, n) = node.status();
    let (used, peak, budget) = svc.content().memory();
    let reach = node.reach();
    let strings = |v: &[Multiaddr]| v.iter().map(|a| a.to_string()).collect();
    R::NodeInfo(pb::NodeInfo {
        peer_id: node.peer_id().to_string(),
        listen_addrs: addrs.iter().map(|a| a.to_string()).collect(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: p2pvm_proto::PROTOCOL_VERSION,
        connected_peers: n as u32,
        content_fast_path_port: svc.content().fast_path_port().map_or(0, u32::from),
        content_memory_used_bytes: used,
        content_memory_peak_bytes: peak,
        content_memory_budget_bytes: budget,
        reachability: reach.reachability.as_str().into(),
        external_addrs: strings(&reach.external),
        relayed_addrs: strings(&reach.relayed),
    })
}

/// Runs one of this domain's stateless operations.
pub(in crate::api) async fn run(svc: &ApiService, who: &Principal, op: Op) -> Result<R, ApiError> {
    let node = &svc.inner.ctx.node;
    match op {
        Op::NodeInfo(_) => Ok(node_info(svc)),
        Op::Peers(_) => {
            let peers = node.call(Command::Peers).await?;
            Ok(R::Peers(pb::PeerList {
                peers: peers.into_iter().map(|p| peer_info(svc, who, p)).collect(),
            }))
        }
        Op::Connect(r) => {
            let peer = if r.peer_id.is_empty() {
                None
            } else {
                Some(parse_peer(&r.peer_id)?)
            };
            let addrs = r
                .addrs
                .iter()
                .map(|a| parse_addr(a))
                .collect::<Result<Vec<_>, _>>()?;
            if peer.is_none() && addrs.is_empty() {
                return Err(ApiError::bad("give a peer id, addresses, or both"));
            }
            let peer = node
                .call_timeout(timeout_of(r.timeout_ms), |reply| Command::Connect {
                    peer,
                    addrs,
                    reply,
                })
                .await?;
            Ok(R::Peer(pb::PeerInfo {
                peer_id: peer.to_string(),
                ..Default::default()
            }))
        }
        Op::Disconnect(r) => {
            who.require_admin()?;
            let peer = parse_peer(&r.peer_id)?;
            node.call(|reply| Command::Disconnect(peer, reply)).await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::FindPeer(r) => {
            let peer = parse_peer(&r.peer_id)?;
            let found = node
                .call_timeout(timeout_of(r.timeout_ms), |reply| {
                    Command::FindPeer(peer, reply)
                })
                .await?;
            Ok(R::Peer(peer_info(svc, who, found)))
        }
        // The dispatcher routes only this domain's operations here.
        _ => Err(super::routed_wrongly()),
    }
}
