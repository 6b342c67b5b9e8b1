//! Swarm distribution: one publisher and N-1 downloaders, every node's upload
//! capped, all fetching the same item at once. Prints the time until every
//! downloader holds it, next to the upload-bound optimum and the time it
//! would take if every downloader fetched everything from the publisher.
//!
//! With upload cap U per node, size S and N-1 downloaders, the publisher must
//! upload every byte at least once (S/U), and the swarm must move (N-1)·S bytes
//! with N uploaders ((N-1)·S/(N·U)): optimum = max of the two. Everything from
//! the publisher takes (N-1)·S/U.
//!
//! The publisher publishes before anyone joins, as the first node of a swarm
//! does; the downloaders bootstrap from it. Each node's CPU seconds and peak
//! memory (VmHWM) are printed per kind of node.
//!
//! Run: `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench swarm`
//! (`P2PVM_SWARM_NODES`, `P2PVM_SWARM_MIB`, `P2PVM_SWARM_CAP_MIB` or
//! `P2PVM_SWARM_CAP_KIB` change the setup).

use anyhow::{Context, Result};
use p2pvm_e2e::swarm::{Swarm, SwarmSpec};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory of a process, in MiB.
fn peak_mib(pid: u32) -> Result<f64> {
    Ok(p2pvm_e2e::proc_status_kib(pid, "VmHWM")? as f64 / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // Without `--bench` (i.e. under `cargo test --all-targets`) a small smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let nodes = env("P2PVM_SWARM_NODES", if full { 8 } else { 4 }) as usize;
    let mib = env("P2PVM_SWARM_MIB", if full { 256 } else { 16 });
    let cap_mib = env("P2PVM_SWARM_CAP_MIB", 20);
    let size = mib << 20;
    // P2PVM_SWARM_CAP_KIB, when set, gives the cap in KiB/s instead.
    let cap = env("P2PVM_SWARM_CAP_KIB", cap_mib << 10) << 10;
    let cap_mib = cap as f64 / f64::from(1u32 << 20);
    // The distribution engine alone; the virus filter's cost is the virus_filter bench.
    let config =
        format!("[content]\nupload_rate_bytes_per_sec = {cap}\n[virus]\nenabled = false\n");
    let swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes: size as usize,
            config,
            log: None,
        },
        None,
    )
    .await?;
    let idle: Vec<f64> = swarm
        .downloaders
        .iter()
        .map(|d| peak_mib(d.pid()?))
        .collect::<Result<_>>()?;
    let cpu_before: Vec<f64> = std::iter::once(&swarm.publisher)
        .chain(&swarm.downloaders)
        .map(|n| p2pvm_e2e::cpu_secs(n.pid()?))
        .collect::<Result<_>>()?;
    let outcome = swarm.flash_crowd().await?;
    outcome.all_done()?;
    let all = outcome.done.last().context("no downloader")?.as_secs_f64();
    let n = nodes as f64;
    let s = size as f64;
    let u = cap as f64;
    let optimum = (s / u).max((n - 1.0) * s / (n * u));
    let from_publisher = (n - 1.0) * s / u;
    println!(
        "swarm: {nodes} nodes, {mib} MiB, upload cap {cap_mib} MiB/s per node; first done {:.1} s, all done {all:.1} s",
        outcome.done[0].as_secs_f64()
    );
    println!(
        "  upload-bound optimum {optimum:.1} s -> {:.2}x optimum (target <= 1.5); all-from-publisher {from_publisher:.1} s -> {:.2}x faster",
        all / optimum,
        from_publisher / all
    );
    let cpu: Vec<f64> = std::iter::once(&swarm.publisher)
        .chain(&swarm.downloaders)
        .zip(&cpu_before)
        .map(|(n, before)| Ok(p2pvm_e2e::cpu_secs(n.pid()?)? - before))
        .collect::<Result<_>>()?;
    let gib = s / f64::from(1u32 << 30);
    let fetched: f64 = cpu[1..].iter().sum();
    println!(
        "  CPU: publisher {:.2} s per GiB of the item; downloaders {:.2} s per GiB fetched (mean)",
        cpu[0] / gib,
        fetched / (n - 1.0) / gib
    );
    let peak = std::iter::once(&swarm.publisher)
        .chain(&swarm.downloaders)
        .map(|n| peak_mib(n.pid()?))
        .collect::<Result<Vec<f64>>>()?;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "  memory (peak RSS): idle downloader up to {:.0} MiB; after the run publisher {:.0} MiB, downloaders up to {:.0} MiB",
        max(&idle),
        peak[0],
        max(&peak[1..])
    );
    Ok(())
}
