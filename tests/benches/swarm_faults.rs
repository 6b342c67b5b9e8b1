//! A flash crowd at size with faults (scenarios 3 and 5 of the swarm issue),
//! on the lab's home lines (2-20 Mbit/s up, five times that down, round trips
//! of 20-150 ms and 0.25 % loss each way per line), one fresh swarm per phase:
//!
//! - **Churn.** Every downloader starts at once; 30 % of them are killed
//!   (`kill -9`) at random moments of the first `P2PVM_LAB_KILL_WITHIN` seconds
//!   (default 40, most of a 16 MiB crowd; kills start after its first fifth) and half of those come
//!   back after 10 s on the same store. Prints who died and came back, how
//!   many of the nodes alive at the end finished, when, and how many of the
//!   returners resumed a checkpoint (their log says so).
//! - **Bad peers.** 5 peers that serve corrupt blocks and 5 that never answer
//!   join the swarm and announce the item like any provider. Prints when the
//!   honest nodes finished, how many downloader-bad peer meetings ended
//!   refused, and the bytes wasted on corrupt blocks.
//! - **Pub/sub under churn** (scenario 4): every downloader subscribes to one
//!   topic and the publisher sends 150 messages, 5 a second, while 30 % of
//!   the subscribers are killed and half of those come back. Prints the
//!   delivery ratio and latency of the subscribers never killed, and what
//!   the returners got of the messages sent after they were back.
//!
//! Run (root): `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench swarm_faults`
//! (`P2PVM_LAB_NODES`, default 60 honest nodes; `P2PVM_LAB_MIB`, default 16;
//! `P2PVM_LAB_PHASES=churn,bad,pubsub`). Without `--bench` (under `cargo
//! test`) a smoke run of 6 nodes and 2 MiB with 2 bad peers and 75 messages.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use p2pvm_e2e::swarm::{Churn, Swarm, SwarmSpec, home_lines, lab_bench_can_run, setting};
use p2pvm_netlab::Lab;

const CONFIG: &str = "[virus]\nenabled = false\n";

async fn churn(lab: &Lab, nodes: usize, size: usize, kill_within: Duration) -> Result<()> {
    let mut swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes: size,
            config: CONFIG.into(),
            log: Some("warn,p2p_service_vm::content::fetch::driver=info".into()),
        },
        Some(lab),
    )
    .await?;
    let downloaders = nodes - 1;
    let killed = (downloaders * 3 / 10).max(1);
    let plan = Churn {
        killed,
        returning: killed.div_ceil(2),
        kill_within,
        away: Duration::from_secs(10),
        seed: 33,
    };
    let started = Instant::now();
    let out = swarm.flash_crowd_with_churn(&plan).await?;
    let alive = downloaders - plan.killed + plan.returning;
    let resumed = out
        .returned
        .iter()
        .filter(|i| {
            swarm.downloaders[**i]
                .log()
                .contains("resuming an unfinished download")
        })
        .count();
    let must_resume = out
        .returned
        .iter()
        .filter(|i| out.checkpointed.contains(i))
        .count();
    let failed: usize = out.crowd.failures.values().sum();
    println!(
        "{:>10}: {nodes} nodes, {} MiB: {} killed between {:.1} and {:.1} s, {} back after {} s; \
         {}/{alive} alive at the end finished (first {:.1} s, last {:.1} s), {failed} failed; \
         {resumed} of {} returners resumed ({must_resume} had a checkpoint); {} finished before their kill; run {:.0} s",
        "churn",
        size >> 20,
        out.killed.len(),
        out.killed.first().map_or(f64::NAN, |k| k.1.as_secs_f64()),
        out.killed.last().map_or(f64::NAN, |k| k.1.as_secs_f64()),
        out.returned.len(),
        plan.away.as_secs(),
        out.crowd.done.len(),
        out.crowd
            .done
            .first()
            .map_or(f64::NAN, Duration::as_secs_f64),
        out.crowd
            .done
            .last()
            .map_or(f64::NAN, Duration::as_secs_f64),
        out.returned.len(),
        out.finished_before_kill.len(),
        started.elapsed().as_secs_f64(),
    );
    for (why, n) in &out.crowd.failures {
        println!("{:>10}  {n} failed: {why}", "");
    }
    out.crowd.all_done()?;
    ensure!(
        resumed >= must_resume,
        "returners with a checkpoint started over"
    );
    Ok(())
}

async fn bad_peers(
    lab: &Lab,
    nodes: usize,
    size: usize,
    rotten: usize,
    silent: usize,
) -> Result<()> {
    let swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes: size,
            config: CONFIG.into(),
            log: None,
        },
        Some(lab),
    )
    .await?;
    let bad = swarm
        .add_bad_peers(Some(lab), nodes, rotten, silent, CONFIG)
        .await?;
    let out = swarm.flash_crowd().await?;
    let tally = bad.tally(&swarm).await?;
    let failed: usize = out.failures.values().sum();
    println!(
        "{:>10}: {nodes} honest nodes and {rotten}+{silent} bad peers, {} MiB: {}/{} finished \
         (p50 {:.1} s, last {:.1} s), {failed} failed; {tally}",
        "bad peers",
        size >> 20,
        out.done.len(),
        nodes - 1,
        out.done
            .get(out.done.len() / 2)
            .map_or(f64::NAN, Duration::as_secs_f64),
        out.done.last().map_or(f64::NAN, Duration::as_secs_f64),
    );
    for (why, n) in &out.failures {
        println!("{:>10}  {n} failed: {why}", "");
    }
    out.all_done()?;
    ensure!(tally.wronged.is_empty(), "honest nodes refused");
    ensure!(tally.lenient.is_empty(), "bad peers met and not refused");
    Ok(())
}

/// Pub/sub under churn: every downloader subscribes to one topic; the
/// publisher sends `messages` numbered messages, 5 a second, while 30 % of
/// the subscribers are killed at random moments and half of those come back
/// 5 s later and subscribe again. Prints the delivery ratio and latency of
/// the subscribers never killed, and the returners' delivery of what was
/// sent from 3 s after their return.
async fn pubsub_under_churn(lab: &Lab, nodes: usize, messages: usize) -> Result<()> {
    use futures::StreamExt;
    use std::collections::HashMap;
    const TOPIC: &str = "lab-churn";
    const EVERY: Duration = Duration::from_millis(200);
    const AWAY: Duration = Duration::from_secs(5);
    const REJOIN: Duration = Duration::from_secs(3);
    let mut swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes: 1 << 20,
            config: CONFIG.into(),
            log: None,
        },
        Some(lab),
    )
    .await?;
    let subs = swarm.downloaders.len();
    let killed = (subs * 3 / 10).max(1);
    let returning = killed.div_ceil(2);
    let span = EVERY * messages as u32;
    // Receivers listen until well after the last message: the mesh's 5 s,
    // the sending, restarts that delay it, and 10 s for stragglers.
    let until = Instant::now() + Duration::from_secs(5) + span + Duration::from_secs(30);
    let receiver = |client: guest_api::Client| {
        tokio::spawn(async move {
            let mut stream = client.subscribe(TOPIC).await?;
            let mut got: Vec<(usize, Instant)> = Vec::new();
            while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), stream.next()).await {
                if let Ok(seq) = <[u8; 8]>::try_from(&m.data[..]) {
                    got.push((u64::from_be_bytes(seq) as usize, Instant::now()));
                }
            }
            Ok::<_, anyhow::Error>(got)
        })
    };
    let mut first = Vec::with_capacity(subs);
    for d in &swarm.downloaders {
        first.push(receiver(d.admin().await?));
    }
    let mut second = HashMap::new();
    // The mesh forms.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let publisher = swarm.publisher.admin().await?;
    let start = Instant::now();
    let sending = tokio::spawn(async move {
        let mut sent_at = Vec::with_capacity(messages);
        for seq in 0..messages {
            sent_at.push(Instant::now());
            publisher
                .publish(TOPIC, (seq as u64).to_be_bytes().to_vec())
                .await?;
            tokio::time::sleep_until((start + EVERY * (seq as u32 + 1)).into()).await;
        }
        Ok::<_, anyhow::Error>(sent_at)
    });
    // Kills early enough that returners are back (and joined) while
    // messages still flow.
    let kill_within = span.saturating_sub(AWAY + REJOIN + Duration::from_secs(5));
    let plan = p2pvm_e2e::swarm::churn_plan(killed, subs, kill_within, 34);
    let mut events: Vec<(Duration, usize, bool)> = plan
        .iter()
        .map(|(i, at)| (*at, *i, false))
        .chain(
            plan.iter()
                .take(returning)
                .map(|(i, at)| (*at + AWAY, *i, true)),
        )
        .collect();
    events.sort_by_key(|e| e.0);
    let mut back_at: HashMap<usize, Instant> = HashMap::new();
    for (at, i, back) in events {
        tokio::time::sleep_until((start + at).into()).await;
        if back {
            swarm.downloaders[i].restart().await?;
            second.insert(i, receiver(swarm.downloaders[i].admin().await?));
            back_at.insert(i, Instant::now());
        } else {
            swarm.downloaders[i].kill().await?;
        }
    }
    let sent_at = sending.await??;
    let killed_set: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
    let (mut delivered, mut latency) = (0usize, Vec::new());
    for (i, r) in first.into_iter().enumerate() {
        // A killed subscriber's stream ended with its node; what it got is
        // not counted.
        let got = r.await?;
        if killed_set.contains(&i) {
            continue;
        }
        let mut got = got?;
        got.sort_by_key(|g| g.0);
        got.dedup_by_key(|g| g.0);
        for (seq, at) in got.into_iter().filter(|g| g.0 < messages) {
            delivered += 1;
            latency.push(at.saturating_duration_since(sent_at[seq]));
        }
    }
    let stable = subs - killed_set.len();
    let (mut back_delivered, mut back_expected) = (0usize, 0usize);
    for (i, r) in second {
        let mut got = r.await??;
        got.sort_by_key(|g| g.0);
        got.dedup_by_key(|g| g.0);
        let from = back_at[&i] + REJOIN;
        let due = |seq: usize| sent_at[seq] >= from;
        back_expected += (0..messages).filter(|s| due(*s)).count();
        back_delivered += got.iter().filter(|g| g.0 < messages && due(g.0)).count();
    }
    latency.sort();
    let pct = |p: f64| {
        latency
            .get(((latency.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(f64::NAN, Duration::as_secs_f64)
    };
    let ratio = delivered as f64 / (messages * stable).max(1) as f64;
    println!(
        "{:>10}: {messages} messages to {subs} subscribers, {} killed during them, {returning} back after {} s: \
         the {stable} never killed got {delivered}/{} ({:.1} %), latency p50 {:.3} s, p95 {:.3} s, max {:.3} s; \
         returners got {back_delivered}/{back_expected} of what was sent from {} s after their return",
        "pubsub",
        killed_set.len(),
        AWAY.as_secs(),
        messages * stable,
        ratio * 100.0,
        pct(0.5),
        pct(0.95),
        latency.last().map_or(f64::NAN, Duration::as_secs_f64),
        REJOIN.as_secs(),
    );
    ensure!(
        ratio >= 0.9,
        "subscribers never killed got {:.1} % of the messages",
        ratio * 100.0
    );
    ensure!(
        back_expected > 0,
        "no message was due to a returner: the phase tested no return"
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    if !lab_bench_can_run("swarm fault", false) {
        return Ok(());
    }
    let nodes = setting("P2PVM_LAB_NODES", if full { 60 } else { 6 }) as usize;
    ensure!(nodes >= 3, "a publisher and two downloaders at least");
    let size = (setting("P2PVM_LAB_MIB", if full { 16 } else { 2 }) << 20) as usize;
    let (rotten, silent) = if full { (5, 5) } else { (1, 1) };
    let phases = std::env::var("P2PVM_LAB_PHASES").unwrap_or_else(|_| "churn,bad,pubsub".into());
    let mut lab = Lab::new()?;
    for l in home_lines(nodes + rotten + silent) {
        lab.add_host(l)?;
    }
    println!(
        "lab: {nodes} honest nodes (+{} hosts for bad peers) on home lines (2-20 Mbit/s up, 5x down, \
         round trips of 20-150 ms, loss), {} MiB",
        rotten + silent,
        size >> 20
    );
    for phase in phases.split(',') {
        match phase.trim() {
            "churn" => {
                let within = Duration::from_secs(setting(
                    "P2PVM_LAB_KILL_WITHIN",
                    if full { 40 } else { 8 },
                ));
                churn(&lab, nodes, size, within).await?;
            }
            "bad" => bad_peers(&lab, nodes, size, rotten, silent).await?,
            "pubsub" => pubsub_under_churn(&lab, nodes, if full { 150 } else { 75 }).await?,
            other => anyhow::bail!("unknown phase {other:?} (churn, bad, pubsub)"),
        }
    }
    Ok(())
}
