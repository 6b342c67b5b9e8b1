//! `GET /metrics` on a real `p2pd`, read with a Prometheus text-format parser
//! (`prometheus-parse`): the families are there, and the figures move when a
//! peer connects, an app makes requests and an item is transferred.

use std::time::Duration;

use anyhow::{Result, ensure};
use p2pvm_e2e::scrape::{Scrape, free_port, http};
use p2pvm_e2e::{NodeOpts, TestNode, eventually, publish_named};

const WAIT: Duration = Duration::from_secs(30);
/// Silent connections opened at once: more than the server takes.
const SILENT: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_figures_move_when_a_peer_connects_and_an_item_moves() -> Result<()> {
    let port = free_port()?;
    let a = TestNode::start(NodeOpts {
        config_toml: Some(format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")),
        ..Default::default()
    })
    .await?;
    let before = Scrape::of(port).await?;
    // Families with labels appear with their first sample; these have
    // none, or samples from the start.
    for family in [
        "libp2p_swarm_dial_attempt_total",
        "libp2p_identify_received_total",
        "libp2p_swarm_new_listen_addr_total",
        "p2pvm_api_sessions",
        "p2pvm_content_transfers",
        "p2pvm_credit_peers",
        "p2pvm_virus_scans_total",
    ] {
        ensure!(
            before.0.keys().any(|k| k.starts_with(family)),
            "no {family} in the first scrape: {:?}",
            before.0.keys().collect::<Vec<_>>()
        );
    }

    // A peer connects; an app (one session) asks for things.
    let b = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        ..Default::default()
    })
    .await?;
    let app = a.app("viewer").await?;
    eventually(WAIT, "a sees b", || async {
        let peers = app.peers().await.ok()?;
        peers.iter().any(|p| p.peer_id == b.peer_id).then_some(())
    })
    .await?;
    let data = p2pvm_e2e::pseudo_random(4 << 20, 3);
    let id = publish_named(&b.app("pub").await?, "scraped.bin", &data).await?;
    ensure!(p2pvm_e2e::fetch_whole(&app, &id).await? == data);

    let after = eventually(WAIT, "the transfer in the figures", || async {
        let s = Scrape::of(port).await.ok()?;
        (s.get("p2pvm_content_transfers_finished_total{outcome=complete}") >= 1.0).then_some(s)
    })
    .await?;
    let moved = |key: &str| after.get(key) - before.get(key);
    ensure!(
        moved("p2pvm_content_first_block_seconds_count{}") >= 1.0,
        "no first block timed"
    );
    ensure!(
        after.get("p2pvm_content_transfers{}") == 0.0,
        "a finished transfer still counts as running"
    );
    ensure!(
        after.get("p2pvm_credit_bytes{direction=in,standing=good}") >= data.len() as f64,
        "the item's bytes are not on the ledger's figures"
    );
    ensure!(
        moved("p2pvm_api_requests_total{op=Peers,result=ok}") >= 1.0,
        "the app's Peers requests are not counted"
    );
    ensure!(
        after.get("p2pvm_api_request_seconds_count{op=Peers}") >= 1.0,
        "the Peers requests are not timed"
    );
    // The fetch's stream ended cleanly, and is counted so (its request only
    // as started).
    let ended = eventually(WAIT, "the fetch stream's end in the figures", || async {
        let s = Scrape::of(port).await.ok()?;
        (s.get("p2pvm_api_streams_ended_total{op=ContentFetch,result=ok}") >= 1.0).then_some(s)
    })
    .await?;
    ensure!(
        ended.get("p2pvm_api_requests_total{op=ContentFetch,result=started}") >= 1.0,
        "the fetch's request is not counted as started"
    );
    ensure!(
        after.get("p2pvm_api_sessions{}") >= 1.0,
        "the app's open session is not counted"
    );
    ensure!(
        after.sum("libp2p_swarm_connections_incoming_total")
            > before.sum("libp2p_swarm_connections_incoming_total"),
        "b's connection is not in libp2p's figures"
    );
    ensure!(
        after.sum("libp2p_bandwidth_bytes_total") > before.sum("libp2p_bandwidth_bytes_total"),
        "libp2p's byte counts did not move"
    );
    // The fetched item was scanned (the suite runs a real clamd).
    ensure!(
        moved("p2pvm_virus_scans_total{verdict=clean}") >= 1.0,
        "the fetched item's scan is not counted"
    );

    // Only GET /metrics is served without a login (the dashboard's pages
    // send to theirs).
    ensure!(http(port, "GET", "/nothing").await?.0 == 404);
    ensure!(http(port, "GET", "/").await?.0 == 303);
    ensure!(http(port, "POST", "/metrics").await?.0 == 405);
    Ok(())
}

/// Connections that never send a request (more than the server's 16
/// places) hold them only until its header deadline (10 s): a scrape gets
/// through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_keep_scrapes_out() -> Result<()> {
    let port = free_port()?;
    let _a = TestNode::start(NodeOpts {
        config_toml: Some(format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")),
        ..Default::default()
    })
    .await?;
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
    }
    let started = std::time::Instant::now();
    eventually(WAIT, "a scrape past the silent connections", || async {
        Scrape::of(port).await.ok()
    })
    .await?;
    eprintln!(
        "a scrape got through {:?} after {SILENT} silent connections",
        started.elapsed()
    );
    // The node is whole, and the silent ones were closed by the server.
    let mut closed = 0;
    for mut s in silent {
        let mut b = [0u8; 1];
        use tokio::io::AsyncReadExt;
        if matches!(
            tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) {
            closed += 1;
        }
    }
    ensure!(
        closed == SILENT,
        "{closed} of {SILENT} silent connections closed"
    );
    Ok(())
}
