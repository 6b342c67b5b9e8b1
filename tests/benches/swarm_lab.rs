//! A flash crowd on home lines, p2pvm and libtorrent side by side: the same
//! lab hosts (a network namespace each), the same shaped lines, the same
//! item, one after the other in one run.
//!
//! Lines: uploads spread over 2-20 Mbit/s, downloads five times the upload
//! (`swarm::home_lines`); the publisher/seed gets 11 Mbit/s up. The lower
//! bound (`swarm::lower_bound`) is the longest of: the publisher sending the
//! item once, the downloaders' copies crossing the sum of all uploads, and
//! the slowest download line receiving the item; it ignores latency. Every
//! line adds a round trip of 20-150 ms and 0.25 % loss each way through the
//! lab's delay lines (this kernel has no netem); `P2PVM_LAB_DELAY=0` runs on
//! rates alone, as the figures before 2026-12-06 were measured. The delay
//! lines run in the bench's own process, and their CPU is printed per engine.
//!
//! Prints, for each engine: first and last finisher, p50/p90 of the finish
//! times, the ratio of the last finisher to the bound and to the other
//! engine, the publisher's upload as a multiple of the item (its line's
//! frame bytes for both, and libtorrent's payload count beside it), CPU
//! seconds per GiB moved and peak memory per node kind. Before p2pvm's
//! crowd starts, its nodes sit idle for `P2PVM_LAB_IDLE_SECS` (default 20,
//! 0 in the smoke run under `cargo test`), all joined and the item published, and the bench prints
//! what an idle node costs: CPU (% of a core) and resident memory. Then
//! (scenario 4) `P2PVM_LAB_DHT_ITEMS` small items (100; 10 in the smoke run)
//! are published across the nodes and each one's first provider is looked up
//! from another node: p50/p95 time to the first provider, and a keyword
//! search's recall; then pub/sub: half as many messages from the publisher to
//! every other node on one topic (delivery ratio, p50/p95 latency).
//!
//! Run (root, `apt-get install python3-libtorrent`):
//! `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench swarm_lab`
//! (`P2PVM_LAB_NODES`, default 60; `P2PVM_LAB_MIB`, default 64; for
//! experiments, `P2PVM_LAB_TOML` is added to every p2pd's config (e.g.
//! `[content]` settings), `P2PVM_LAB_ONLY_OURS=1` skips libtorrent, and
//! `P2PVM_LAB_LOG=<filter>` with `P2PVM_LAB_LOGS=<dir>` keeps each p2pd's
//! log at that filter in `<dir>/<node>.log`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use p2pvm_e2e::swarm::{
    CrowdOutcome, LINE_LOSS_PERCENT, LINE_RTT_MS, Swarm, SwarmSpec, home_lines, lab_bench_can_run,
    lower_bound, setting, without_delay,
};
use p2pvm_e2e::torrent::TorrentSwarm;
use p2pvm_netlab::{Lab, Traffic};

/// One engine's figures.
struct Run {
    name: &'static str,
    crowd: CrowdOutcome,
    /// The publisher's line, frame bytes sent.
    publisher_sent: u64,
    /// Each downloader's line, frame bytes received.
    received: Vec<u64>,
    cpu: Vec<f64>,
    peak_kib: Vec<u64>,
    /// CPU seconds of this process (the lab's delay lines) during the crowd.
    lab_cpu: f64,
    /// How long the crowd ran, for the delay lines' share of a core.
    span: Duration,
}

/// CPU seconds this process (the delay lines' threads) has used.
fn own_cpu() -> Result<f64> {
    p2pvm_e2e::cpu_secs(std::process::id())
}

fn traffic(lab: &Lab) -> Result<Vec<Traffic>> {
    lab.hosts()
        .iter()
        .map(|h| lab.traffic(h).map_err(Into::into))
        .collect()
}

fn received(before: &[Traffic], after: &[Traffic]) -> Vec<u64> {
    after[1..]
        .iter()
        .zip(&before[1..])
        .map(|(a, b)| a.received - b.received)
        .collect()
}

async fn ours(lab: &Lab, nodes: usize, data_len: usize, idle: Duration) -> Result<(Run, Vec<u8>)> {
    let swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes: data_len,
            // No upload cap in the app: the lines are the limit, as at home.
            config: format!(
                "[virus]\nenabled = false\n{}",
                std::env::var("P2PVM_LAB_TOML").unwrap_or_default()
            ),
            log: std::env::var("P2PVM_LAB_LOG").ok(),
        },
        Some(lab),
    )
    .await?;
    let pids: Vec<u32> = swarm.nodes().map(|n| n.pid()).collect::<Result<_>>()?;
    if !idle.is_zero() {
        idle_cost(&pids, idle).await?;
    }
    let dht_items = setting("P2PVM_LAB_DHT_ITEMS", if idle.is_zero() { 10 } else { 100 }) as usize;
    if dht_items > 0 {
        dht_at_size(&swarm, dht_items).await?;
        pubsub_at_size(&swarm, dht_items / 2).await?;
    }
    let cpu_before: Vec<f64> = pids
        .iter()
        .map(|p| p2pvm_e2e::cpu_secs(*p))
        .collect::<Result<_>>()?;
    let before = traffic(lab)?;
    let (lab_cpu, started) = (own_cpu()?, std::time::Instant::now());
    let crowd = swarm.flash_crowd().await?;
    let (lab_cpu, span) = (own_cpu()? - lab_cpu, started.elapsed());
    let after = traffic(lab)?;
    if let Some(dir) = std::env::var_os("P2PVM_LAB_LOGS") {
        swarm.keep_logs(dir.as_ref())?;
    }
    let cpu = pids
        .iter()
        .zip(&cpu_before)
        .map(|(p, b)| Ok(p2pvm_e2e::cpu_secs(*p)? - b))
        .collect::<Result<_>>()?;
    let peak_kib = pids
        .iter()
        .map(|p| p2pvm_e2e::proc_status_kib(*p, "VmHWM"))
        .collect::<Result<_>>()?;
    let run = Run {
        name: "p2pvm",
        crowd,
        publisher_sent: after[0].sent - before[0].sent,
        received: received(&before, &after),
        cpu,
        peak_kib,
        lab_cpu,
        span,
    };
    Ok((run, swarm.data.clone()))
}

/// Prints what the nodes cost while nothing is asked of them for `span`:
/// CPU as a share of one core, and resident memory at the end.
async fn idle_cost(pids: &[u32], span: Duration) -> Result<()> {
    let cpu = |p: &u32| p2pvm_e2e::cpu_secs(*p);
    let before: Vec<f64> = pids.iter().map(cpu).collect::<Result<_>>()?;
    tokio::time::sleep(span).await;
    let mut pct: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|(p, b)| Ok((cpu(p)? - b) / span.as_secs_f64() * 100.0))
        .collect::<Result<_>>()?;
    let mut rss: Vec<f64> = pids
        .iter()
        .map(|p| Ok(p2pvm_e2e::proc_status_kib(*p, "VmRSS")? as f64 / 1024.0))
        .collect::<Result<_>>()?;
    pct.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    let mid = |v: &[f64]| v[v.len() / 2];
    let max = |v: &[f64]| v[v.len() - 1];
    println!(
        "{:>10}: {} nodes idle for {} s: CPU per node median {:.2} % of a core (max {:.2} %, all {:.1} %); RSS median {:.0} MiB (max {:.0} MiB)",
        "idle",
        pids.len(),
        span.as_secs(),
        mid(&pct),
        max(&pct),
        pct.iter().sum::<f64>(),
        mid(&rss),
        max(&rss),
    );
    Ok(())
}

/// Scenario 4 (the DHT at size): `items` small items, each published by one
/// node (spread over all of them) under a word of its own and a word they
/// all share; after 10 s, one node other than its publisher looks up each
/// item's first provider (`find_providers` with a limit of 1, as a download
/// starts), one after another, timed; then three nodes search for the
/// shared word. Prints p50/p95/max of the lookups, the misses, and the
/// search's recall.
async fn dht_at_size(swarm: &Swarm, items: usize) -> Result<()> {
    let nodes: Vec<&p2pvm_e2e::TestNode> = swarm.nodes().collect();
    let n = nodes.len();
    anyhow::ensure!(n >= 2, "the DHT phase needs two nodes");
    let mut published = Vec::with_capacity(items);
    let started = Instant::now();
    for k in 0..items {
        let at = (k * 7 + 3) % n;
        let data = p2pvm_e2e::pseudo_random(4096, 10_000 + k as u64);
        let meta = guest_api::proto::ContentPublishRequest {
            name: format!("labitem{k:03} labshared.bin"),
            ..Default::default()
        };
        let info = nodes[at]
            .admin()
            .await?
            .publish_content(meta, &data[..])
            .await?;
        published.push((info.content_id, at));
    }
    let publishing = started.elapsed();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut took = Vec::with_capacity(items);
    let mut missed = 0;
    for (k, (id, at)) in published.iter().enumerate() {
        let from = (at + 1 + (k * 13) % (n - 1)) % n;
        let key = p2p_service_vm::content::content_key(&id.parse()?);
        let client = nodes[from].admin().await?;
        let t = Instant::now();
        match client.find_providers(key.as_ref(), 1).await {
            Ok(p) if !p.is_empty() => took.push(t.elapsed()),
            _ => missed += 1,
        }
    }
    took.sort();
    let mut recall = Vec::new();
    for from in [0, n / 3, 2 * n / 3] {
        let hits = nodes[from]
            .admin()
            .await?
            .search_content("labshared", items as u32 * 2)
            .await?;
        let found = published
            .iter()
            .filter(|(id, _)| hits.iter().any(|h| &h.content_id == id))
            .count();
        recall.push(format!("{:.0} %", found as f64 / items as f64 * 100.0));
    }
    println!(
        "{:>10}: {items} items published by {n} nodes in {:.1} s; first provider p50 {:.3} s, p95 {:.3} s, max {:.3} s ({missed} not found); search recall from 3 nodes: {}",
        "dht",
        publishing.as_secs_f64(),
        pct(&took, 0.5),
        pct(&took, 0.95),
        took.last().map_or(f64::NAN, Duration::as_secs_f64),
        recall.join(", "),
    );
    Ok(())
}

/// Scenario 4 (pub/sub at size): every node but the publisher subscribes to
/// one topic; after 5 s for the mesh to form, the publisher sends `messages`
/// numbered messages, 5 a second. Prints the delivery ratio and p50/p95/max
/// of the time from send to receipt (one clock: the subscribers' streams
/// end in this process).
async fn pubsub_at_size(swarm: &Swarm, messages: usize) -> Result<()> {
    use futures::StreamExt;
    const TOPIC: &str = "lab-pubsub";
    const EVERY: Duration = Duration::from_millis(200);
    let nodes: Vec<&p2pvm_e2e::TestNode> = swarm.nodes().collect();
    let mut subscribers = Vec::new();
    for node in &nodes[1..] {
        let c = node.admin().await?;
        let stream = c.subscribe(TOPIC).await?;
        subscribers.push((c, stream));
    }
    let publisher = nodes[0].admin().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let start = Instant::now();
    let until = start + EVERY * messages as u32 + Duration::from_secs(10);
    let receivers: Vec<_> = subscribers
        .into_iter()
        .map(|(client, mut stream)| {
            tokio::spawn(async move {
                let _client = client;
                let mut got: Vec<(usize, Duration)> = Vec::new();
                while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), stream.next()).await {
                    if let Ok(seq) = <[u8; 8]>::try_from(&m.data[..]) {
                        got.push((u64::from_be_bytes(seq) as usize, start.elapsed()));
                    }
                }
                got
            })
        })
        .collect();
    let mut sent_at = Vec::with_capacity(messages);
    for seq in 0..messages {
        sent_at.push(start.elapsed());
        publisher
            .publish(TOPIC, (seq as u64).to_be_bytes().to_vec())
            .await?;
        tokio::time::sleep(EVERY).await;
    }
    let (mut delivered, mut latency) = (0usize, Vec::new());
    for r in receivers {
        let mut got = r.await?;
        got.sort();
        got.dedup_by_key(|(seq, _)| *seq);
        for (seq, at) in got.into_iter().filter(|(seq, _)| *seq < messages) {
            delivered += 1;
            latency.push(at.saturating_sub(sent_at[seq]));
        }
    }
    latency.sort();
    let expected = messages * (nodes.len() - 1);
    println!(
        "{:>10}: {messages} messages to {} subscribers: {delivered}/{expected} delivered ({:.1} %); latency p50 {:.3} s, p95 {:.3} s, max {:.3} s",
        "pubsub",
        nodes.len() - 1,
        delivered as f64 / expected.max(1) as f64 * 100.0,
        pct(&latency, 0.5),
        pct(&latency, 0.95),
        latency.last().map_or(f64::NAN, Duration::as_secs_f64),
    );
    Ok(())
}

async fn libtorrent(lab: &Lab, data: &[u8], deadline: Duration) -> Result<(Run, u64)> {
    let mut swarm = TorrentSwarm::start(lab, data).await?;
    let before = traffic(lab)?;
    let (lab_cpu, started) = (own_cpu()?, std::time::Instant::now());
    let out = swarm.flash_crowd(deadline).await?;
    let (lab_cpu, span) = (own_cpu()? - lab_cpu, started.elapsed());
    let after = traffic(lab)?;
    // Spot-check the bytes, as the p2pvm side's test does.
    if out.crowd.failures.is_empty() {
        let got = std::fs::read(swarm.leecher_file(0))?;
        anyhow::ensure!(got == data, "a libtorrent leecher holds other bytes");
    }
    let run = Run {
        name: "libtorrent",
        crowd: out.crowd,
        publisher_sent: after[0].sent - before[0].sent,
        received: received(&before, &after),
        cpu: out.cpu_secs,
        peak_kib: out.peak_kib,
        lab_cpu,
        span,
    };
    Ok((run, out.seed_uploaded))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64()
}

fn report(run: &Run, size: u64, bound: Duration, downloaders: usize) {
    let c = &run.crowd;
    let failed: usize = c.failures.values().sum();
    let last = c.done.last().map_or(f64::NAN, Duration::as_secs_f64);
    println!(
        "{:>10}: {}/{downloaders} done; first {:.1} s, p50 {:.1} s, p90 {:.1} s, last {last:.1} s = {:.2}x the bound",
        run.name,
        c.done.len(),
        pct(&c.done, 0.0),
        pct(&c.done, 0.5),
        pct(&c.done, 0.9),
        last / bound.as_secs_f64(),
    );
    for (why, n) in &c.failures {
        println!("{:>10}  {n} failed: {why}", "");
    }
    if failed > 0 {
        println!("{:>10}  (ratios above count finishers only)", "");
    }
    let gib = size as f64 / f64::from(1u32 << 30);
    let fetched: f64 = run.cpu[1..].iter().sum::<f64>() / downloaders as f64;
    let max_mib = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
    let mut got: Vec<f64> = run
        .received
        .iter()
        .map(|b| *b as f64 / size as f64)
        .collect();
    got.sort_by(f64::total_cmp);
    println!(
        "{:>10}  downloaders' lines received {:.2}x-{:.2}x the item (median {:.2}x)",
        "",
        got.first().copied().unwrap_or(f64::NAN),
        got.last().copied().unwrap_or(f64::NAN),
        got.get(got.len() / 2).copied().unwrap_or(f64::NAN),
    );
    println!(
        "{:>10}  publisher's line sent {:.2}x the item; CPU: publisher {:.1} s/GiB of the item, downloader {:.1} s/GiB fetched (mean); peak RSS: publisher {:.0} MiB, downloaders up to {:.0} MiB",
        "",
        run.publisher_sent as f64 / size as f64,
        run.cpu[0] / gib,
        fetched / gib,
        run.peak_kib[0] as f64 / 1024.0,
        max_mib(&run.peak_kib[1..]),
    );
    println!(
        "{:>10}  the lab's delay lines (this process): {:.1} CPU s over {:.1} s, {:.0} % of a core",
        "",
        run.lab_cpu,
        run.span.as_secs_f64(),
        run.lab_cpu / run.span.as_secs_f64().max(1e-9) * 100.0,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // Without `--bench` (under `cargo test --all-targets`) a small smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    if !lab_bench_can_run("lab swarm", true) {
        return Ok(());
    }
    let nodes = setting("P2PVM_LAB_NODES", if full { 60 } else { 5 }) as usize;
    let mib = setting("P2PVM_LAB_MIB", if full { 64 } else { 2 });
    let size = mib << 20;
    let delayed = setting("P2PVM_LAB_DELAY", 1) != 0;
    let lines = if delayed {
        home_lines(nodes)
    } else {
        without_delay(&home_lines(nodes))
    };
    let mut lab = Lab::new()?;
    for l in &lines {
        lab.add_host(*l)?;
    }
    let bound = lower_bound(&lines, size);
    let (rtt_lo, rtt_hi) = LINE_RTT_MS;
    let latency = if delayed {
        format!("line round trips {rtt_lo}-{rtt_hi} ms, {LINE_LOSS_PERCENT} % loss each way")
    } else {
        "no latency or loss".into()
    };
    println!(
        "lab: {nodes} nodes on home lines (2-20 Mbit/s up, 5x down; publisher 11 up; {latency}), {mib} MiB; lower bound {:.1} s",
        bound.as_secs_f64()
    );
    let idle = Duration::from_secs(setting("P2PVM_LAB_IDLE_SECS", if full { 20 } else { 0 }));
    let (p2p, data) = ours(&lab, nodes, size as usize, idle).await?;
    // libtorrent gets as long as p2pvm's last finisher took, several times over.
    let ours_last = p2p.crowd.done.last().copied().unwrap_or(bound);
    let deadline = (ours_last * 4).max(bound * 4).max(Duration::from_secs(60));
    let downloaders = nodes - 1;
    if std::env::var_os("P2PVM_LAB_ONLY_OURS").is_some() {
        report(&p2p, size, bound, downloaders);
        return Ok(());
    }
    let (lt, seed_payload) = libtorrent(&lab, &data, deadline).await?;
    report(&p2p, size, bound, downloaders);
    report(&lt, size, bound, downloaders);
    println!(
        "{:>10}  (the seed's own payload count: {:.2}x the item)",
        "",
        seed_payload as f64 / size as f64
    );
    let last = |r: &Run| r.crowd.done.last().map(Duration::as_secs_f64);
    let ratio = last(&p2p)
        .zip(last(&lt))
        .map(|(a, b)| a / b)
        .context("an engine had no finisher")?;
    println!("last finisher, p2pvm / libtorrent: {ratio:.2}x (target <= 1.0)");
    Ok(())
}
