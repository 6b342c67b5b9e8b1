//! Streaming in a swarm on home lines, p2pvm and libtorrent side by side
//! (scenario 2 of the swarm issue): the same lab hosts and shaped lines as
//! `swarm_lab` (2-20 Mbit/s up, five times that down, round trips of
//! 20-150 ms and 0.25 % loss each way per line), the same item, one engine
//! after the other in one run.
//!
//! In each engine's swarm the publisher (the seed) and `P2PVM_LAB_HOLDERS`
//! downloaders (default: half of the others) first fetch the whole item; then
//! every other node plays it as a stream, one starting every
//! `P2PVM_LAB_GAP_MS` (2000), at 60 % of its line's download rate, seeking
//! once from 40 % to 70 % of the item (`playback::Streaming`). p2pvm's
//! viewers read through the API (`fetch_content`, keeping the item, so their
//! nodes fetch the rest of it behind the playback window as well);
//! libtorrent's run its sequential mode with deadlines on the first second
//! of media after each start and seek, and leave the part skipped by the
//! seek unfetched (`tests/torrent/peer.py view`). Both
//! are judged by one player model (`playback::play`: it starts once a second
//! of media is buffered, stalls when it would play bytes not yet there).
//!
//! Prints, per engine: start-up p50/p95/max (first plays and after the
//! seek, together), first byte p50, viewers that never stalled and the stall
//! time, then the ratio of p2pvm's p95 start-up to libtorrent's. The
//! issue's target: start-up <= 2 s p95, no stall for >= 95 % of viewers.
//!
//! Run (root, `apt-get install python3-libtorrent`):
//! `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench swarm_stream`
//! (`P2PVM_LAB_NODES`, default 60; `P2PVM_LAB_MIB`, default 64;
//! `P2PVM_LAB_TOML` is added to every p2pd's config; `P2PVM_LAB_ONLY_OURS=1`
//! skips libtorrent; `P2PVM_LAB_LOG=<filter>` with `P2PVM_LAB_LOGS=<dir>` keeps
//! each p2pd's log). Without `--bench` (under `cargo test`) a smoke run of
//! 5 nodes and 2 MiB.

use std::time::Duration;

use anyhow::{Context, Result};
use p2pvm_e2e::playback::{Playback, Streaming, Summary};
use p2pvm_e2e::swarm::{Swarm, SwarmSpec, home_lines, lab_bench_can_run, setting};
use p2pvm_e2e::torrent::TorrentSwarm;
use p2pvm_netlab::{Lab, Line};

async fn ours(
    lab: &Lab,
    lines: &[Line],
    plan: &Streaming,
    size: usize,
) -> Result<(Vec<Playback>, Vec<u8>)> {
    let swarm = Swarm::start(
        &SwarmSpec {
            nodes: lines.len(),
            bytes: size,
            config: format!(
                "[virus]\nenabled = false\n{}",
                std::env::var("P2PVM_LAB_TOML").unwrap_or_default()
            ),
            log: std::env::var("P2PVM_LAB_LOG").ok(),
        },
        Some(lab),
    )
    .await?;
    let plays = swarm.stream(lines, plan).await?;
    if let Some(dir) = std::env::var_os("P2PVM_LAB_LOGS") {
        swarm.keep_logs(dir.as_ref())?;
    }
    Ok((plays, swarm.data.clone()))
}

fn report(name: &str, plays: &[Playback]) -> Result<Summary> {
    let s = Summary::of(plays).context("no viewers")?;
    println!("{name:>10}: {s}");
    println!(
        "{:>10}  per viewer: start-up {:?} s, after the seek {:?} s, stalls {:?}",
        "",
        plays
            .iter()
            .map(|p| (p.startup.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        plays
            .iter()
            .map(|p| (p.startup_after_seek.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        plays.iter().map(|p| p.stalls).collect::<Vec<_>>(),
    );
    println!(
        "{:>10}  per viewer: bitrate {:?} Mbit/s, first byte {:?} s",
        "",
        plays
            .iter()
            .map(|p| (p.rate * 8.0 / 1e5).round() / 10.0)
            .collect::<Vec<_>>(),
        plays
            .iter()
            .map(|p| (p.first_byte.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
    );
    Ok(s)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    if !lab_bench_can_run("streaming swarm", true) {
        return Ok(());
    }
    let nodes = setting("P2PVM_LAB_NODES", if full { 60 } else { 5 }) as usize;
    anyhow::ensure!(nodes >= 3, "a publisher, a holder and a viewer at least");
    let mib = setting("P2PVM_LAB_MIB", if full { 64 } else { 2 });
    let size = mib << 20;
    let plan = Streaming {
        holders: setting("P2PVM_LAB_HOLDERS", (nodes as u64 - 1) / 2) as usize,
        gap: Duration::from_millis(setting("P2PVM_LAB_GAP_MS", 2000)),
        share: 0.6,
    };
    let lines = home_lines(nodes);
    let mut lab = Lab::new()?;
    for l in &lines {
        lab.add_host(*l)?;
    }
    println!(
        "lab: {nodes} nodes on home lines (2-20 Mbit/s up, 5x down, round trips of 20-150 ms, loss), {mib} MiB; \
         {} holders, then {} viewers {} ms apart at 60 % of their download rate, seeking from 40 % to 70 %",
        plan.holders,
        nodes - 1 - plan.holders,
        plan.gap.as_millis(),
    );
    let (p2p, data) = ours(&lab, &lines, &plan, size as usize).await?;
    let p2p = report("p2pvm", &p2p)?;
    if std::env::var_os("P2PVM_LAB_ONLY_OURS").is_some() {
        return Ok(());
    }
    let mut torrent = TorrentSwarm::start(&lab, &data).await?;
    let lt = torrent.stream(&lines, &plan, size).await?;
    let lt = report("libtorrent", &lt)?;
    println!(
        "start-up p95, p2pvm / libtorrent: {:.2}x; p2pvm's target: p95 <= 2 s ({:.2} s), >= 95 % of viewers without a stall ({} of {})",
        p2p.startup_p95.as_secs_f64() / lt.startup_p95.as_secs_f64().max(1e-9),
        p2p.startup_p95.as_secs_f64(),
        p2p.smooth,
        p2p.viewers,
    );
    Ok(())
}
