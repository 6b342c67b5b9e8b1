//! What `/metrics` costs the node: the same content transfer between two
//! local p2pds with nobody scraping and with both nodes scraped once a
//! second (as a Prometheus server would, at a short interval), rounds
//! interleaved so the machine's noise hits both alike (a round streams a
//! 512 MiB item ten times, seconds of transfer). Prints the ratio of
//! the rates (the issue asks for no measurable cost), the CPU seconds per
//! GiB of each node beside it, and how long a scrape takes (p50/p95/max).
//!
//! Run: `cargo build --release --bins && P2PVM_BIN_DIR=$CARGO_TARGET_DIR/release
//! cargo bench -p p2pvm-e2e --bench metrics_cost` (`P2PVM_BENCH_MIB`, 512 by
//! default; under `cargo test`, a smoke run of 16 MiB and one round).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::proto;
use p2pvm_e2e::scrape::{Scrape, config};
use p2pvm_e2e::{NodeOpts, TestNode, cpu_secs, median};

/// Scrapes `ports` once a second until `stop`; each scrape's time.
async fn scraper(ports: [u16; 2], stop: Arc<AtomicBool>) -> Result<Vec<Duration>> {
    let mut took = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for port in ports {
            let t = Instant::now();
            let s = Scrape::of(port).await?;
            took.push(t.elapsed());
            ensure!(!s.0.is_empty(), "an empty scrape");
        }
    }
    Ok(took)
}

struct Round {
    scraped: bool,
    secs: f64,
    /// CPU seconds of the provider and the fetcher.
    cpu: [f64; 2],
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (full, mib) = p2pvm_e2e::bench_size(512, 16);
    let size = mib << 20;
    let data = p2pvm_e2e::pseudo_random(size, 11);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("item.bin");
    std::fs::write(&file, &data)?;
    // The transfer engine alone (the virus filter's cost is its own bench).
    let ((ma, pa), (mb, pb)) = (config()?, config()?);
    let a = TestNode::start(NodeOpts {
        config_toml: Some(format!("{ma}[virus]\nenabled = false\n")),
        ..Default::default()
    })
    .await?;
    let b = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        config_toml: Some(format!("{mb}[virus]\nenabled = false\n")),
        ..Default::default()
    })
    .await?;
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
    // Warm-up: connections and the DHT in place.
    let mut s = viewer
        .fetch_content(&info.content_id, 0, 1 << 20, false)
        .await?
        .1;
    p2pvm_e2e::drain(&mut s).await?;

    // A round streams the item `repeats` times: seconds of transfer, so a
    // scraped round holds several scrapes of each node.
    let (rounds, repeats) = if full { (4, 10) } else { (1, 1) };
    let (pid_a, pid_b) = (a.pid()?, b.pid()?);
    let mut rows = Vec::new();
    let mut scrapes = Vec::new();
    for _ in 0..rounds {
        for scraped in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let scraping = scraped.then(|| tokio::spawn(scraper([pa, pb], stop.clone())));
            let before = [cpu_secs(pid_a)?, cpu_secs(pid_b)?];
            let t = Instant::now();
            for _ in 0..repeats {
                let (_, mut s) = viewer.fetch_content(&info.content_id, 0, 0, false).await?;
                let got = p2pvm_e2e::drain(&mut s).await?;
                ensure!(got == size, "the stream ended after {got} of {size} bytes");
            }
            let secs = t.elapsed().as_secs_f64();
            let after = [cpu_secs(pid_a)?, cpu_secs(pid_b)?];
            stop.store(true, Ordering::Relaxed);
            if let Some(h) = scraping {
                scrapes.extend(h.await??);
            }
            rows.push(Round {
                scraped,
                secs,
                cpu: [after[0] - before[0], after[1] - before[1]],
            });
        }
    }
    let gib = (size * repeats) as f64 / (1u64 << 30) as f64;
    println!(
        "metrics_cost: {mib} MiB streamed a -> b {repeats} time(s) a round, {rounds} round(s) of each, interleaved"
    );
    let mut ratios = Vec::new();
    for pair in rows.chunks(2) {
        let [quiet, busy] = pair else { continue };
        ratios.push(quiet.secs / busy.secs);
        for r in [quiet, busy] {
            println!(
                "  {:<12} {:>7.1} MiB/s   CPU s/GiB: provider {:.2}, fetcher {:.2}",
                if r.scraped {
                    "scraped 1/s"
                } else {
                    "not scraped"
                },
                (mib * repeats) as f64 / r.secs,
                r.cpu[0] / gib,
                r.cpu[1] / gib,
            );
        }
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "rate scraped / not scraped: {}",
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !scrapes.is_empty() {
        let n = scrapes.len();
        let mut sorted = scrapes.clone();
        sorted.sort();
        println!(
            "scrape time over {n}: p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            median(scrapes).as_secs_f64() * 1e3,
            sorted[(n * 95 / 100).min(n - 1)].as_secs_f64() * 1e3,
            sorted[n - 1].as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
