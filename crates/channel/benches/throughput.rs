//! The channel by itself, in one process: 1 GiB from a back-end session to a
//! front-end session through the shared-memory rings (real memfd, eventfds and
//! both pumps), against a memcpy of the same bytes in the same run.
//!
//! Run: `cargo bench -p p2pvm-channel --bench throughput`

use std::time::{Duration, Instant};

use p2pvm_channel::{Broker, Layout, Side};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

fn endpoint(broker: &Broker, dir: &std::path::Path, side: Side) -> p2pvm_channel::Endpoint {
    let path = dir.join(format!("{side:?}.sock"));
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let client = std::thread::spawn(move || p2pvm_channel::attach(&path, side).unwrap());
    let (conn, _) = listener.accept().unwrap();
    broker.answer(conn).unwrap();
    client.join().unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let total: usize = if full { 1 << 30 } else { 32 << 20 };
    let chunk = vec![0x5au8; 256 * 1024];
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::new(Layout::standard()).unwrap();
    let stop = CancellationToken::new();
    let dev = endpoint(&broker, dir.path(), Side::Device);
    let (pump, mut acc) = p2pvm_channel::device(dev.region.clone(), dev.events().unwrap());
    tokio::spawn(pump.run(stop.clone()));
    let drv = endpoint(&broker, dir.path(), Side::Driver);
    let (pump, conn) = p2pvm_channel::driver(drv.region.clone(), drv.events().unwrap());
    tokio::spawn(pump.run(stop.clone()));

    let mut times = Vec::new();
    for _ in 0..if full { 3 } else { 1 } {
        let s = conn.open();
        let mut served = acc.accept().await.unwrap();
        let data = chunk.clone();
        let t = Instant::now();
        let writer = tokio::spawn(async move {
            let mut left = total;
            while left > 0 {
                let n = left.min(data.len());
                served.write_all(&data[..n]).await.unwrap();
                left -= n;
            }
            served.shutdown().await.unwrap();
        });
        let (mut r, _w) = s.into_split();
        let mut got = 0;
        while let Some(b) = r.chunk().await.unwrap() {
            got += b.len();
        }
        writer.await.unwrap();
        assert_eq!(got, total);
        times.push(t.elapsed());
    }
    times.sort();
    let t = times[times.len() / 2];
    let src = vec![1u8; total];
    let mut dst = vec![0u8; total];
    // Touch the destination first: page faults are not what memcpy costs.
    dst.copy_from_slice(&src);
    let m = Instant::now();
    dst.copy_from_slice(&src);
    std::hint::black_box(&dst[total / 2]);
    let m = m.elapsed().max(Duration::from_nanos(1));
    let gbs = |d: Duration| total as f64 / d.as_secs_f64() / 1e9;
    println!(
        "{} MiB back-end -> front-end session through the rings",
        total >> 20
    );
    println!("  memcpy   {:>6.2} GB/s", gbs(m));
    println!(
        "  channel  {:>6.2} GB/s  ({:.3}x memcpy)",
        gbs(t),
        gbs(t) / gbs(m)
    );
    stop.cancel();
}
