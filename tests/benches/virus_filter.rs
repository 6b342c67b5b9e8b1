//! Transfer throughput with the virus filter (a real clamd) on vs off, in one run.
//!
//! Two pairs of local nodes, identical except `[virus] enabled`; each pair moves
//! the same item: downloaded into the store (the whole item streamed to clamd
//! as it arrives; the verdict gates the commit) and streamed to an app (each
//! 4 MiB segment scanned before delivery).
//!
//! Run: `scripts/clamd.sh && cargo build --release --bins && cargo bench -p p2pvm-e2e --bench virus_filter`
//! (`P2PVM_BENCH_MIB` changes the size.)

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::proto;
use p2pvm_e2e::{NodeOpts, TestNode};

async fn pair(config: &str) -> Result<(TestNode, TestNode)> {
    let a = TestNode::start(NodeOpts {
        config_toml: Some(config.into()),
        ..Default::default()
    })
    .await?;
    let b = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        config_toml: Some(config.into()),
        ..Default::default()
    })
    .await?;
    Ok((a, b))
}

async fn run(config: &str, file: &std::path::Path, size: usize) -> Result<(Duration, Duration)> {
    let (a, b) = pair(config).await?;
    let info = a
        .admin()
        .await?
        .publish_path(
            &file.to_string_lossy(),
            proto::ContentPublishRequest {
                name: "bench.bin".into(),
                ..Default::default()
            },
        )
        .await?;
    let viewer = b.admin().await?;
    let t = Instant::now();
    let (_, mut s) = viewer.fetch_content(&info.content_id, 0, 0, false).await?;
    let total = p2pvm_e2e::drain(&mut s).await?;
    let stream = t.elapsed();
    ensure!(total == size);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    viewer.download_content(&info.content_id).await?;
    Ok((stream, t.elapsed()))
}

fn mib_s(size: usize, t: Duration) -> f64 {
    size as f64 / t.as_secs_f64() / 1048576.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (_, mib) = p2pvm_e2e::bench_size(1024, 8);
    let size = mib << 20;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("item.bin");
    std::fs::write(&file, p2pvm_e2e::pseudo_random(size, 7))?;
    let off = run("[virus]\nenabled = false\n", &file, size).await?;
    let on = run("", &file, size).await?;
    println!(
        "virus filter, {mib} MiB between two nodes: stream to an app off {:.1} MiB/s, on {:.1} MiB/s -> {:.2}; download into the store off {:.1} MiB/s, on {:.1} MiB/s -> {:.2} (target >= 0.5)",
        mib_s(size, off.0),
        mib_s(size, on.0),
        off.0.as_secs_f64() / on.0.as_secs_f64(),
        mib_s(size, off.1),
        mib_s(size, on.1),
        off.1.as_secs_f64() / on.1.as_secs_f64()
    );
    Ok(())
}
