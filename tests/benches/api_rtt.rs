//! API round trip (node-info) over the Unix socket vs a raw Unix-socket echo of
//! the same number of bytes, measured in the same run. Target: p50 ≤ 2× raw.
//!
//! Run: `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench api_rtt`

use std::io::{Read, Write};
use std::os::unix::net::UnixListener as StdListener;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use p2pvm_e2e::{NodeOpts, TestNode};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WARMUP: usize = 2_000;
const ROUNDS: usize = 20_000;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<28} p50 {:>7.1} µs   p90 {:>7.1} µs   p99 {:>7.1} µs   (n={})",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.9) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.len()
    );
}

/// A blocking echo server on its own thread: the cheapest possible peer.
fn spawn_echo(path: std::path::PathBuf, size: usize) {
    let listener = StdListener::bind(&path).expect("bind echo socket");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; size];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let node = TestNode::start(NodeOpts::default()).await?;
    let client = node.app("bench").await?;
    let info = client.node_info().await?;
    // Bytes on the wire for one node-info exchange (request + response frames).
    let req = guest_api::proto::Frame::of(guest_api::proto::frame::Kind::Request(
        guest_api::proto::Request {
            id: 1,
            op: Some(guest_api::proto::request::Op::NodeInfo(Default::default())),
        },
    ));
    let resp = guest_api::proto::Frame::of(guest_api::proto::frame::Kind::Response(
        guest_api::proto::Response {
            id: 1,
            result: Some(guest_api::proto::response::Result::NodeInfo(info)),
        },
    ));
    let size = 4 + resp.encoded_len().max(req.encoded_len());

    let dir = tempfile::tempdir()?;
    let echo_path = dir.path().join("echo.sock");
    spawn_echo(echo_path.clone(), size);
    let mut raw = tokio::net::UnixStream::connect(&echo_path).await?;
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];

    let mut h_api = hist();
    let mut h_raw = hist();
    // Interleave the two so machine noise hits both alike.
    for round in 0..(WARMUP + ROUNDS) {
        let t = Instant::now();
        client.node_info().await?;
        let api = t.elapsed();
        let t = Instant::now();
        raw.write_all(&out).await?;
        raw.read_exact(&mut back).await?;
        let echo = t.elapsed();
        if round >= WARMUP {
            h_api.record(api.as_nanos() as u64)?;
            h_raw.record(echo.as_nanos() as u64)?;
        }
    }
    println!("API round trip vs raw Unix-socket echo of {size} bytes, {ROUNDS} rounds each");
    report("raw echo", &h_raw);
    report("API node-info", &h_api);
    let ratio = h_api.value_at_quantile(0.5) as f64 / h_raw.value_at_quantile(0.5) as f64;
    println!(
        "ratio p50 API/raw = {ratio:.2}x  (target <= 2.0x: {})",
        if ratio <= 2.0 { "met" } else { "NOT met" }
    );
    let _ = Duration::ZERO;
    Ok(())
}
