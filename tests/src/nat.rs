//! Nodes behind the network lab's routers, and the steps of getting through
//! them that the NAT tests and the `nat_punch` bench share: waiting for a
//! node to learn whether it is reachable, finding a private peer's relayed
//! address in the DHT, dialling it and waiting for the hole punch.

use std::time::{Duration, Instant};

use anyhow::Result;
use guest_api::{Client, proto};
use p2pvm_netlab::Host;

use crate::{NodeOpts, TestNode, eventually};

/// Long enough for reachability, reservations and hole punches: AutoNAT
/// probes every 5 s, and a test host may be loaded.
pub const WAIT: Duration = Duration::from_secs(90);

/// A `p2pd` in `host` (virus filter off, log captured), bootstrapped from
/// `bootstrap`, with `config` added to its TOML.
pub async fn lab_node(host: &Host, bootstrap: &[&TestNode], config: &str) -> Result<TestNode> {
    TestNode::start(NodeOpts {
        bootstrap: bootstrap.iter().map(|n| n.addr.clone()).collect(),
        config_toml: Some(format!("{config}\n[virus]\nenabled = false\n")),
        capture_log: true,
        host: Some(host.clone()),
        ..Default::default()
    })
    .await
}

/// Waits until `c` reports `reachability`, and for a private node until it
/// holds a relayed address.
pub async fn reaches(c: &Client, reachability: &'static str) -> Result<proto::NodeInfo> {
    eventually(WAIT, &format!("reachability {reachability}"), || async {
        let i = c.node_info().await.ok()?;
        let relayed = reachability != "private" || !i.relayed_addrs.is_empty();
        (i.reachability == reachability && relayed).then_some(i)
    })
    .await
}

/// The connections `c` has to `peer`, as (kind, transport).
pub async fn connections(c: &Client, peer: &str) -> Result<Vec<(String, String)>> {
    let peers = c.peers().await?;
    let p = peers.iter().find(|p| p.peer_id == peer);
    Ok(p.map(|p| {
        p.connections
            .iter()
            .map(|c| (c.kind.clone(), c.transport.clone()))
            .collect()
    })
    .unwrap_or_default())
}

/// `peer`'s addresses as the DHT gives them to `c`, once they include a
/// relayed one.
pub async fn find_relayed(c: &Client, peer: &str) -> Result<Vec<String>> {
    eventually(WAIT, "a relayed address in the DHT", || async {
        let p = c.find_peer(peer).await.ok()?;
        p.addrs
            .iter()
            .any(|x| x.contains("p2p-circuit"))
            .then_some(p.addrs)
    })
    .await
}

/// Dials `peer` at `addrs` (relayed ones among them) and waits up to
/// `within` for a direct connection and no relayed one: how long it took
/// from the dial, or `None` if it did not come.
pub async fn punch(
    c: &Client,
    peer: &str,
    addrs: &[String],
    within: Duration,
) -> Result<Option<Duration>> {
    let start = Instant::now();
    c.connect(peer, addrs).await?;
    while start.elapsed() < within {
        let conns = connections(c, peer).await?;
        let direct = conns.iter().any(|(k, _)| k == "direct");
        if direct && !conns.iter().any(|(k, _)| k == "relayed") {
            return Ok(Some(start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

/// What each node logged, on stderr: why a scenario failed.
pub fn dump_logs(nodes: &[(&str, &TestNode)]) {
    for (name, n) in nodes {
        eprintln!("===== {name}'s log (peer {}):\n{}", n.peer_id, n.log());
    }
}
