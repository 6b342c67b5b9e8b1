//! Swarm distribution: one publisher and N-1 fetchers, every node's upload
//! capped, all fetching the same item at once. Prints the time until every
//! fetcher holds it, next to the upload-bound optimum and the time it would
//! take if every fetcher downloaded everything from the publisher.
//!
//! With upload cap U per node, size S and N-1 fetchers, the publisher must
//! upload every byte at least once (S/U), and the swarm must move (N-1)·S bytes
//! with N uploaders ((N-1)·S/(N·U)): optimum = max of the two. Everything from
//! the publisher takes (N-1)·S/U.
//!
//! Run: `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench swarm`
//! (`P2PVM_SWARM_NODES`, `P2PVM_SWARM_MIB`, `P2PVM_SWARM_CAP_MIB` change the setup).

use std::time::Instant;

use anyhow::Result;
use guest_api::proto;
use p2pvm_e2e::{NodeOpts, TestNode};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // Without `--bench` (i.e. under `cargo test --all-targets`) a small smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let nodes = env("P2PVM_SWARM_NODES", if full { 8 } else { 4 }) as usize;
    let mib = env("P2PVM_SWARM_MIB", if full { 256 } else { 16 });
    let cap_mib = env("P2PVM_SWARM_CAP_MIB", 20);
    let size = mib << 20;
    let cap = cap_mib << 20;
    // The distribution engine alone; the virus filter's cost is the virus_filter bench.
    let config =
        format!("[content]\nupload_rate_bytes_per_sec = {cap}\n[virus]\nenabled = false\n");

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("swarm.bin");
    std::fs::write(&file, p2pvm_e2e::pseudo_random(size as usize, 7))?;
    let publisher = TestNode::start(NodeOpts {
        config_toml: Some(config.clone()),
        ..Default::default()
    })
    .await?;
    let info = publisher
        .admin()
        .await?
        .publish_path(
            &file.to_string_lossy(),
            proto::ContentPublishRequest {
                name: "swarm.bin".into(),
                ..Default::default()
            },
        )
        .await?;
    let mut fetchers = Vec::new();
    for _ in 1..nodes {
        fetchers.push(
            TestNode::start(NodeOpts {
                bootstrap: vec![publisher.addr.clone()],
                config_toml: Some(config.clone()),
                ..Default::default()
            })
            .await?,
        );
    }
    let mut clients = Vec::new();
    for f in &fetchers {
        clients.push(f.admin().await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let id = info.content_id.clone();
            tokio::spawn(async move {
                c.download_content(&id).await?;
                Ok::<_, anyhow::Error>(start.elapsed())
            })
        })
        .collect();
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await??);
    }
    let all = start.elapsed().as_secs_f64();
    let n = nodes as f64;
    let s = size as f64;
    let u = cap as f64;
    let optimum = (s / u).max((n - 1.0) * s / (n * u));
    let from_publisher = (n - 1.0) * s / u;
    times.sort();
    println!(
        "swarm: {nodes} nodes, {mib} MiB, upload cap {cap_mib} MiB/s per node; first done {:.1} s, all done {all:.1} s",
        times[0].as_secs_f64()
    );
    println!(
        "  upload-bound optimum {optimum:.1} s -> {:.2}x optimum (target <= 1.5); all-from-publisher {from_publisher:.1} s -> {:.2}x faster",
        all / optimum,
        from_publisher / all
    );
    Ok(())
}
