//! Transfer throughput with the virus filter (a real clamd) on vs off, and
//! against clamd's own speed, in one run.
//!
//! Two pairs of local nodes, identical except `[virus] enabled`; each pair
//! moves the same item: streamed to an app (each 4 MiB segment scanned before
//! delivery), downloaded into the store (the whole item streamed to clamd as
//! it arrives; the verdict gates the commit), then — deleted again — streamed
//! and downloaded once more: with the filter on, the item's clean verdict is
//! cached, so these are not scanned. Beside them, clamd alone: the same bytes
//! sent to it as one INSTREAM scan (the download's parallelism: one stream),
//! the physical limit of a filtered download.
//!
//! Targets (issue 12): filtered download >= 0.8x clamd alone; a cached
//! re-fetch >= 0.9x the unfiltered one.
//!
//! Run: `scripts/clamd.sh && cargo build --release --bins && cargo bench -p p2pvm-e2e --bench virus_filter`
//! (`P2PVM_BENCH_MIB` changes the size.)

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::proto;
use p2pvm_e2e::{NodeOpts, TestNode};
use p2pvm_security::{ClamdAddr, Verdict, VirusFilter};

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

/// One pair's timings.
#[derive(Debug, Clone, Copy)]
struct Figures {
    stream: Duration,
    download: Duration,
    restream: Duration,
    redownload: Duration,
}

async fn run(config: &str, file: &std::path::Path, size: usize) -> Result<Figures> {
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
    let stream = || async {
        let t = Instant::now();
        let (_, mut s) = viewer.fetch_content(&info.content_id, 0, 0, false).await?;
        let total = p2pvm_e2e::drain(&mut s).await?;
        ensure!(total == size);
        // Let the download wind down before the next transfer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, anyhow::Error>(t.elapsed())
    };
    let download = || async {
        let t = Instant::now();
        viewer.download_content(&info.content_id).await?;
        let took = t.elapsed();
        viewer.delete_content(&info.content_id).await?;
        Ok::<_, anyhow::Error>(took)
    };
    let first_stream = stream().await?;
    let first_download = download().await?;
    Ok(Figures {
        stream: first_stream,
        download: first_download,
        restream: stream().await?,
        redownload: download().await?,
    })
}

/// clamd scanning the file as one INSTREAM stream, fed as a download feeds it.
async fn clamd_alone(file: &std::path::Path) -> Result<Duration> {
    let filter = VirusFilter::clamd(ClamdAddr::Socket(p2pvm_e2e::clamd_socket()));
    let data = bytes::Bytes::from(std::fs::read(file)?);
    let t = Instant::now();
    let mut scan = filter.scanner();
    for k in (0..data.len()).step_by(256 * 1024) {
        scan.feed(data.slice(k..(k + 256 * 1024).min(data.len())))
            .await;
    }
    ensure!(scan.finish().await? == Verdict::Clean);
    Ok(t.elapsed())
}

fn mib_s(size: usize, t: Duration) -> f64 {
    size as f64 / t.as_secs_f64() / 1048576.0
}

/// Median, lowest and highest.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (full, mib) = p2pvm_e2e::bench_size(1024, 8);
    let size = mib << 20;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("item.bin");
    std::fs::write(&file, p2pvm_e2e::pseudo_random(size, 7))?;
    let rounds = if full { 2 } else { 1 };
    let mut rows = Vec::new();
    for _ in 0..rounds {
        // Interleaved, so machine noise hits all three alike.
        let off = run("[virus]\nenabled = false\n", &file, size).await?;
        let on = run("", &file, size).await?;
        let clamd = clamd_alone(&file).await?;
        println!(
            "  round: clamd alone {:.1} MiB/s | stream off {:.1} on {:.1} cached {:.1} MiB/s | download off {:.1} on {:.1} cached {:.1} MiB/s",
            mib_s(size, clamd),
            mib_s(size, off.stream),
            mib_s(size, on.stream),
            mib_s(size, on.restream),
            mib_s(size, off.download),
            mib_s(size, on.download),
            mib_s(size, on.redownload),
        );
        rows.push((off, on, clamd));
    }
    let ratio =
        |f: &dyn Fn(&(Figures, Figures, Duration)) -> f64| spread(rows.iter().map(f).collect());
    let s = |d: Duration| d.as_secs_f64();
    let report = |what: &str, (mid, lo, hi): (f64, f64, f64), target: &str| {
        println!("{what}: {mid:.2} (range {lo:.2}-{hi:.2}; {target})");
    };
    println!(
        "virus filter, {mib} MiB between two nodes, {rounds} round(s), medians of per-round ratios:"
    );
    report(
        "  stream to an app, on vs off",
        ratio(&|r| s(r.0.stream) / s(r.1.stream)),
        "the segments wait for clamd",
    );
    report(
        "  download into the store, on vs off",
        ratio(&|r| s(r.0.download) / s(r.1.download)),
        "bounded by clamd",
    );
    report(
        "  download into the store, on vs clamd alone",
        ratio(&|r| s(r.2) / s(r.1.download)),
        "target >= 0.8",
    );
    report(
        "  cached re-stream, on vs off",
        ratio(&|r| s(r.0.restream) / s(r.1.restream)),
        "target >= 0.9",
    );
    report(
        "  cached re-download, on vs off",
        ratio(&|r| s(r.0.redownload) / s(r.1.redownload)),
        "target >= 0.9",
    );
    Ok(())
}
