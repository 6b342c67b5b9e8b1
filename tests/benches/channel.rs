//! The split platform's channel, measured against its baselines in one run:
//!
//! - API round trip (node-info): app → front-end → shared-memory channel →
//!   sandboxed p2pd and back, vs host mode's direct Unix socket. Target ≤ 2×.
//! - A 1 GiB local item streamed to an app through the channel (bulk frames
//!   on a channel session, then the front-end's shared-memory ring to the
//!   app), vs a memcpy of the same bytes (and host mode, where p2pd fills the
//!   app's ring itself, for reference). Target ≥ 2 GB/s and ≥ 0.3× memcpy.
//!
//! Run: `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench channel`
//! (`P2PVM_BENCH_MIB` changes the item size.) Without `--bench` (as in
//! `cargo test --all-targets`) it is a small smoke run.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::{Client, proto};
use hdrhistogram::Histogram;
use p2pvm_e2e::split::Platform;
use p2pvm_e2e::{NodeOpts, TestNode, cpu_secs};

const NO_FILTER: &str = "[virus]\nenabled = false\n";

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn p50_us(h: &Histogram<u64>) -> f64 {
    h.value_at_quantile(0.5) as f64 / 1000.0
}

async fn rtt(
    channel: &Client,
    host: &Client,
    rounds: usize,
) -> Result<(Histogram<u64>, Histogram<u64>)> {
    let (mut hc, mut hh) = (hist(), hist());
    let warmup = rounds / 10;
    // Interleaved so machine noise hits both alike.
    for i in 0..rounds + warmup {
        let t = Instant::now();
        channel.node_info().await?;
        let c = t.elapsed();
        let t = Instant::now();
        host.node_info().await?;
        let h = t.elapsed();
        if i >= warmup {
            hc.record(c.as_nanos() as u64)?;
            hh.record(h.as_nanos() as u64)?;
        }
    }
    Ok((hc, hh))
}

async fn stream_once(c: &Client, id: &str, len: usize) -> Result<Duration> {
    let t = Instant::now();
    let (_, mut s) = c.fetch_content(id, 0, 0, true).await?;
    ensure!(s.is_bulk(), "the item comes through a ring");
    let n = p2pvm_e2e::drain(&mut s).await?;
    let d = t.elapsed();
    ensure!(n == len, "streamed {n} of {len} bytes");
    Ok(d)
}

fn memcpy_once(src: &[u8], dst: &mut [u8]) -> Duration {
    let t = Instant::now();
    dst.copy_from_slice(src);
    std::hint::black_box(&dst[dst.len() / 2]);
    t.elapsed()
}

fn gbs(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (full, mib) = p2pvm_e2e::bench_size(1024, 16);
    let (rounds, reps) = if full { (10_000, 5) } else { (200, 1) };

    let host = TestNode::start(NodeOpts {
        config_toml: Some(NO_FILTER.into()),
        ..Default::default()
    })
    .await?;
    let platform = Platform::up_with(&[], NO_FILTER).await?;
    let via_channel = platform.app("bench").await?;
    let via_socket = host.app("bench").await?;

    // CPU of the processes on each path: the sandboxed p2pd and the
    // front-end (whose pumps poll for answers), and the host-mode p2pd.
    let split_cpu = || -> Result<f64> {
        Ok(cpu_secs(platform.service_pid()?)? + cpu_secs(platform.frontend_pid()?)?)
    };
    let (c0, h0) = (split_cpu()?, cpu_secs(host.pid()?)?);
    let (hc, hh) = rtt(&via_channel, &via_socket, rounds).await?;
    let (c1, h1) = (split_cpu()?, cpu_secs(host.pid()?)?);
    let n = (rounds + rounds / 10) as f64;
    println!("API round trip (node-info), {rounds} rounds each, interleaved");
    println!(
        "  CPU per round trip: channel {:.1} µs (sandboxed p2pd + front-end), host mode {:.1} µs (p2pd)",
        (c1 - c0) / n * 1e6,
        (h1 - h0) / n * 1e6
    );
    println!(
        "  host mode, Unix socket   p50 {:>7.1} µs  p99 {:>7.1} µs",
        p50_us(&hh),
        hh.value_at_quantile(0.99) as f64 / 1000.0
    );
    println!(
        "  through the channel      p50 {:>7.1} µs  p99 {:>7.1} µs",
        p50_us(&hc),
        hc.value_at_quantile(0.99) as f64 / 1000.0
    );
    let r = p50_us(&hc) / p50_us(&hh);
    println!(
        "  ratio p50 channel/socket = {r:.2}x  (target <= 2.0x: {})",
        if r <= 2.0 { "met" } else { "NOT met" }
    );

    let len = mib << 20;
    let data = p2pvm_e2e::pseudo_random(len, 11);
    let meta = || proto::ContentPublishRequest {
        name: "bench.bin".into(),
        ..Default::default()
    };
    let id_c = via_channel
        .publish_content(meta(), &data[..])
        .await?
        .content_id;
    let id_h = via_socket
        .publish_content(meta(), &data[..])
        .await?
        .content_id;
    let mut dst = vec![0u8; len];
    let (mut tc, mut th, mut tm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        tm.push(memcpy_once(&data, &mut dst));
        tc.push(stream_once(&via_channel, &id_c, len).await?);
        th.push(stream_once(&via_socket, &id_h, len).await?);
    }
    let (c, h, m) = (
        p2pvm_e2e::median(tc),
        p2pvm_e2e::median(th),
        p2pvm_e2e::median(tm),
    );
    println!("Streaming a {mib} MiB local item to an app (median of {reps})");
    println!("  memcpy of the same bytes {:>7.2} GB/s", gbs(len, m));
    println!("  host mode (p2pd's ring)  {:>7.2} GB/s", gbs(len, h));
    println!("  through the channel      {:>7.2} GB/s", gbs(len, c));
    let ratio = gbs(len, c) / gbs(len, m);
    println!(
        "  channel/memcpy = {ratio:.3}x (target >= 0.3x: {}); channel {:.2} GB/s (target >= 2 GB/s: {})",
        if ratio >= 0.3 { "met" } else { "NOT met" },
        gbs(len, c),
        if gbs(len, c) >= 2.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
