//! apibench: what an app sees of the API where it runs — the round trip of a
//! small request (node info) and the rate at which a local item streams in.
//! The VM-mode benchmark runs it in the client VM and against the sandbox
//! backend in the same test host (`tests/vm/benches/vm_mode.rs`).
//!
//! ```text
//! P2PVM_TOKEN=... cargo run --release -p guest-api --example apibench -- --rounds 2000 --fetch <ID>
//! ```
//!
//! Prints one line: `APIBENCH rtt_p50_us=… rtt_p90_us=… rtt_p99_us=… [stream_mib_s=…
//! stream_bytes=…] cpu_s=…` (this process's CPU time).

use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::AsyncReadExt;

#[derive(Debug, Parser)]
struct Args {
    /// Round trips to time (after a tenth as many for warm-up).
    #[arg(long, default_value_t = 1000)]
    rounds: usize,
    /// Also stream this item (already in the node's store) to the end.
    #[arg(long)]
    fetch: Option<String>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// User plus system CPU seconds of this process, from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here, in
    // clock ticks (100 per second on Linux).
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let client = guest_api::Client::builder()
        .name("apibench")
        .connect()
        .await?;
    let cpu0 = cpu_seconds();
    let mut times = Vec::with_capacity(args.rounds);
    for i in 0..args.rounds + args.rounds / 10 {
        let t = Instant::now();
        client.node_info().await?;
        if i >= args.rounds / 10 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let mut line = format!(
        "APIBENCH rtt_p50_us={:.1} rtt_p90_us={:.1} rtt_p99_us={:.1}",
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        percentile(&times, 0.99)
    );
    if let Some(id) = &args.fetch {
        let t = Instant::now();
        let (_, mut stream) = client.fetch_content(id, 0, 0, false).await?;
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        line.push_str(&format!(
            " stream_mib_s={:.1} stream_bytes={total}",
            total as f64 / secs / f64::from(1 << 20)
        ));
    }
    line.push_str(&format!(" cpu_s={:.2}", cpu_seconds() - cpu0));
    println!("{line}");
    Ok(())
}
