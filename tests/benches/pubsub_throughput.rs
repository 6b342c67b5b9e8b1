//! Pubsub throughput: one publisher, two subscribers, three local p2pd nodes.
//! Prints messages/s delivered to both subscribers, and for scale the rate of
//! the same publisher publishing with nobody to deliver to beyond its node.
//!
//! Run: `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench pubsub_throughput`
//!
//! Under `cargo test --all-targets` (no `--bench`) it is a smoke run of 300
//! messages against the debug p2pds, which must all arrive: an unoptimised
//! node checks gossipsub's Ed25519 signatures at ~60 messages/s, so the full
//! 20,000 would overflow its peers' send queues and measure only that.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use p2pvm_e2e::{NodeOpts, TestNode, eventually};

const SIZE: usize = 256;
/// Publishes kept in flight at once; the API pipelines them.
const WINDOW: usize = 64;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let messages = if full { 20_000 } else { 300 };
    let a = TestNode::start(NodeOpts::default()).await?;
    let b = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        ..Default::default()
    })
    .await?;
    let c = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        ..Default::default()
    })
    .await?;
    let publisher = a.app("pub").await?;
    let sub_b = b.app("sub").await?;
    let sub_c = c.app("sub").await?;
    sub_b.connect("", [c.addr.as_str()]).await?;
    let rx_b = sub_b.subscribe("bench").await?;
    let rx_c = sub_c.subscribe("bench").await?;
    let _self_sub = publisher.subscribe("bench").await?;
    eventually(Duration::from_secs(30), "mesh", || async {
        (publisher.topic_peers("bench").await.ok()?.len() >= 2).then_some(())
    })
    .await
    .context("the publisher never saw both subscribers in its mesh")?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let hb = tokio::spawn(count(rx_b, messages));
    let hc = tokio::spawn(count(rx_c, messages));

    let start = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    for i in 0..messages {
        let mut payload = vec![0u8; SIZE];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let p = publisher.clone();
        inflight.push(async move {
            // LIMIT_EXCEEDED is gossipsub's back-pressure: wait and retry.
            loop {
                match p.publish("bench", payload.clone()).await {
                    Err(e) if e.code() == Some(guest_api::proto::ErrorCode::LimitExceeded) => {
                        tokio::time::sleep(Duration::from_millis(2)).await
                    }
                    r => return r,
                }
            }
        });
        if inflight.len() >= WINDOW {
            inflight
                .next()
                .await
                .expect("one in flight")
                .with_context(|| format!("publishing message {i}"))?;
        }
    }
    while let Some(r) = inflight.next().await {
        r.context("publishing the last messages")?;
    }
    let published = start.elapsed();
    let (nb, tb) = hb.await?;
    let (nc, tc) = hc.await?;
    let slowest = tb.max(tc).max(published);
    println!("pubsub: {messages} messages of {SIZE} B, 1 publisher -> 2 subscribers on 3 nodes");
    println!(
        "  publish rate        {:>9.0} msg/s",
        messages as f64 / published.as_secs_f64()
    );
    println!("  delivered to B      {nb}/{messages}");
    println!("  delivered to C      {nc}/{messages}");
    println!(
        "  end-to-end rate     {:>9.0} msg/s per subscriber ({:.1} MiB/s)",
        nb.min(nc) as f64 / slowest.as_secs_f64(),
        (nb.min(nc) * SIZE) as f64 / slowest.as_secs_f64() / (1 << 20) as f64
    );
    // The full run reports what arrived; the smoke run is slow enough for
    // every send queue to hold it, so anything missing is a lost message.
    if !full {
        ensure!(
            nb == messages && nc == messages,
            "smoke run lost messages: B got {nb}, C got {nc} of {messages}"
        );
    }
    Ok(())
}

/// Counts messages until all arrived or none came for 5 s.
async fn count<S>(mut rx: S, messages: usize) -> (usize, Duration)
where
    S: futures::Stream<Item = guest_api::Message> + Unpin,
{
    let mut n = 0usize;
    let start = Instant::now();
    let mut last = Duration::ZERO;
    while n < messages {
        match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
            Ok(Some(_)) => {
                n += 1;
                last = start.elapsed();
            }
            _ => break,
        }
    }
    (n, last)
}
