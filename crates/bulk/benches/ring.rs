//! The bulk ring alone: 1 GiB from a producer thread to a consumer thread
//! (each with its own runtime, as two processes would be), against a Unix
//! socket pair carrying the same bytes and a memcpy of them, in one run.
//!
//! Run: `cargo bench -p p2pvm-bulk --bench ring` (`P2PVM_BENCH_MIB` sets the size;
//! without `--bench` it is a small smoke run).

use std::time::{Duration, Instant};

use p2pvm_bulk::ring::{Ring, RingReader, RingWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const CHUNK: usize = 256 * 1024;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A connected, non-blocking socket pair for tokio.
fn socket_pair() -> (
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
) {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (a, b)
}

/// The lengths of the writes that make up `total` bytes.
fn pieces(total: usize) -> impl Iterator<Item = usize> {
    (0..total)
        .step_by(CHUNK)
        .map(move |at| (total - at).min(CHUNK))
}

fn ring_once(total: usize) -> Duration {
    let ring = Ring::create(0).expect("ring");
    let theirs = Ring::open(ring.file().try_clone().expect("dup")).expect("open");
    let (a, b) = socket_pair();
    let start = Instant::now();
    let producer = std::thread::spawn(move || {
        rt().block_on(async move {
            let mut w = RingWriter::new(ring, UnixStream::from_std(a).expect("tokio"));
            let src = vec![7u8; CHUNK];
            for n in pieces(total) {
                w.write_all(&src[..n]).await.expect("write");
            }
            w.finish();
        })
    });
    let got = rt().block_on(async move {
        let mut r = RingReader::new(theirs, UnixStream::from_std(b).expect("tokio"));
        drain(&mut r).await
    });
    let t = start.elapsed();
    producer.join().expect("producer");
    assert_eq!(got, total);
    t
}

fn socket_once(total: usize) -> Duration {
    let (a, b) = socket_pair();
    let start = Instant::now();
    let producer = std::thread::spawn(move || {
        rt().block_on(async move {
            let mut s = UnixStream::from_std(a).expect("tokio");
            let src = vec![7u8; CHUNK];
            for n in pieces(total) {
                s.write_all(&src[..n]).await.expect("write");
            }
        })
    });
    let got = rt().block_on(async move {
        let mut s = UnixStream::from_std(b).expect("tokio");
        drain(&mut s).await
    });
    let t = start.elapsed();
    producer.join().expect("producer");
    assert_eq!(got, total);
    t
}

async fn drain(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> usize {
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0;
    loop {
        match r.read(&mut buf).await.expect("read") {
            0 => return n,
            k => n += k,
        }
    }
}

fn memcpy_once(src: &[u8], dst: &mut [u8]) -> Duration {
    let t = Instant::now();
    dst.copy_from_slice(src);
    std::hint::black_box(&dst[dst.len() / 2]);
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn gbs(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mib: usize = std::env::var("P2PVM_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1024 } else { 16 });
    let total = mib << 20;
    let reps = if full { 5 } else { 1 };
    let src = vec![3u8; total];
    // Touched once, so the memcpy measures copying rather than page faults.
    let mut dst = vec![1u8; total];
    let (mut r, mut s, mut m) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        m.push(memcpy_once(&src, &mut dst));
        r.push(ring_once(total));
        s.push(socket_once(total));
    }
    let (r, s, m) = (median(r), median(s), median(m));
    println!("{mib} MiB producer thread -> consumer thread, median of {reps}");
    println!("  memcpy              {:>6.2} GB/s", gbs(total, m));
    println!("  Unix socket pair    {:>6.2} GB/s", gbs(total, s));
    println!(
        "  bulk ring           {:>6.2} GB/s  ({:.2}x the socket, {:.2}x memcpy)",
        gbs(total, r),
        s.as_secs_f64() / r.as_secs_f64(),
        m.as_secs_f64() / r.as_secs_f64()
    );
}
