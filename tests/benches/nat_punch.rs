//! Hole punching on the network lab's routers (the reachable issue's
//! benchmarks): how often two private nodes get a direct connection, how
//! long it takes from the dial, and what the punched connection carries
//! beside the same two lines on one flat segment.
//!
//! Topology: a seed and a relay on the lab's "internet" (the hub); pairs of
//! private nodes, each behind a home router of its own (scenario 1) or, on
//! one side, behind a home router behind a carrier-grade NAT (scenario 2).
//! Every router's WAN line and every public line holds frames 12.5 ms each
//! way, so two routers are 50 ms apart, and carries `P2PVM_NAT_MBIT` (50)
//! Mbit/s each way. Each attempt is a fresh pair of `p2pd`s (fresh ports,
//! fresh NAT mappings); `P2PVM_NAT_BATCH` pairs (10) run at once. An attempt
//! counts as punched when the dialling node holds a direct connection and no
//! relayed one within 30 s of the dial; the time is from the dial (through
//! the relay) to that moment. Pairs that never got as far as holding a
//! reservation are reported apart: they test the relay, not the punch.
//!
//! Then `P2PVM_BENCH_MIB` (64) MiB moves between one punched pair and
//! between two public hosts on the same kind of line, and the ratio of the
//! two rates is printed with each receiver's CPU seconds per GiB.
//!
//! Run (root, nftables): `cargo build --release --bins &&
//! P2PVM_BIN_DIR=$CARGO_TARGET_DIR/release cargo bench -p p2pvm-e2e --bench nat_punch`
//! (`P2PVM_NAT_ATTEMPTS`, default 50 per scenario). Under `cargo test`, a
//! smoke run of 2 attempts per scenario and 4 MiB.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use p2pvm_e2e::nat::{find_relayed, lab_node, punch, reaches};
use p2pvm_e2e::swarm::{lab_bench_can_run, setting};
use p2pvm_e2e::{TestNode, bench_size, cpu_secs, fetch_whole, publish_named};
use p2pvm_netlab::{Host, Lab, Line, Nat, Router};

/// How long a dialled pair has to become direct.
const PUNCH_WITHIN: Duration = Duration::from_secs(30);

fn line() -> Line {
    let mbit = setting("P2PVM_NAT_MBIT", 50) as f64;
    Line::mbit(mbit, mbit).with_delay(Duration::from_micros(12_500))
}

#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// Both behind home routers.
    Home,
    /// One behind a home router behind a carrier-grade NAT.
    DoubleNat,
}

/// The lab's public side: the seed the relay joins through (so AutoNAT can
/// confirm the relay), and the relay.
struct Public {
    seed: TestNode,
    relay: TestNode,
}

async fn public(lab: &mut Lab) -> Result<Public> {
    let (sh, rh) = (lab.add_host(line())?, lab.add_host(line())?);
    let seed = lab_node(&sh, &[], "").await?;
    let relay = lab_node(&rh, &[&seed], "").await?;
    reaches(&relay.admin().await?, "public").await?;
    Ok(Public { seed, relay })
}

/// A router in front of one private node of `scenario`.
fn router(lab: &mut Lab, scenario: Scenario, dialler: bool) -> Result<Router> {
    Ok(match (scenario, dialler) {
        (Scenario::DoubleNat, true) => {
            let cgnat = lab.add_router(line(), Nat::Cone)?;
            lab.add_router_behind(&cgnat, Nat::Cone)?
        }
        _ => lab.add_router(line(), Nat::Cone)?,
    })
}

/// A pair of private nodes, started and holding reservations.
async fn pair(lab: &mut Lab, p: &Public, scenario: Scenario) -> Result<(TestNode, TestNode)> {
    let (ra, rb) = (router(lab, scenario, true)?, router(lab, scenario, false)?);
    let a_host = lab.add_host_behind(&ra, Line::UNSHAPED)?;
    let b_host = lab.add_host_behind(&rb, Line::UNSHAPED)?;
    let boot = [&p.relay, &p.seed];
    let a = lab_node(&a_host, &boot, "").await?;
    let b = lab_node(&b_host, &boot, "").await?;
    Ok((a, b))
}

/// How one attempt went.
enum Attempt {
    /// A node never learnt it is private and held a reservation.
    NotPrivate,
    /// The dialler never found the other's relayed address in the DHT.
    NotFound,
    /// Dialled through the relay: the time to a direct connection, if any.
    Dialled(Option<Duration>),
}

async fn attempt(a: &TestNode, b: &TestNode) -> Result<Attempt> {
    let (ca, cb) = (a.admin().await?, b.admin().await?);
    if reaches(&ca, "private").await.is_err() || reaches(&cb, "private").await.is_err() {
        return Ok(Attempt::NotPrivate);
    }
    let Ok(addrs) = find_relayed(&ca, &b.peer_id).await else {
        return Ok(Attempt::NotFound);
    };
    Ok(Attempt::Dialled(
        punch(&ca, &b.peer_id, &addrs, PUNCH_WITHIN).await?,
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn scenario(scenario: Scenario, attempts: usize, batch: usize) -> Result<()> {
    let mut lab = Lab::new()?;
    let p = public(&mut lab).await?;
    let (mut times, mut failed, mut not_private, mut not_found) = (Vec::new(), 0, 0, 0);
    let mut left = attempts;
    while left > 0 {
        let n = left.min(batch);
        left -= n;
        let mut pairs = Vec::new();
        for _ in 0..n {
            pairs.push(pair(&mut lab, &p, scenario).await?);
        }
        let results = futures::future::join_all(pairs.iter().map(|(a, b)| attempt(a, b))).await;
        for r in results {
            match r? {
                Attempt::NotPrivate => not_private += 1,
                Attempt::NotFound => not_found += 1,
                Attempt::Dialled(None) => failed += 1,
                Attempt::Dialled(Some(t)) => times.push(t),
            }
        }
    }
    times.sort();
    let tried = times.len() + failed;
    println!(
        "{scenario:?}: {} of {tried} dialled pairs punched ({:.0} %); not dialled: {not_private} \
         pairs without a reservation, {not_found} not found in the DHT; \
         dial to direct p50 {:.3} s, p95 {:.3} s, max {:.3} s",
        times.len(),
        100.0 * times.len() as f64 / tried.max(1) as f64,
        percentile(&times, 0.5).as_secs_f64(),
        percentile(&times, 0.95).as_secs_f64(),
        times.last().copied().unwrap_or_default().as_secs_f64(),
    );
    Ok(())
}

/// Moves `data` from `from` to `to`: MiB/s and the receiver's CPU seconds
/// per GiB.
async fn moved(from: &TestNode, to: &TestNode, data: &[u8]) -> Result<(f64, f64)> {
    let id = publish_named(&from.app("pub").await?, "bench.bin", data).await?;
    let cpu = cpu_secs(to.pid()?)?;
    let start = Instant::now();
    let got = fetch_whole(&to.app("get").await?, &id).await?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(got == data, "different bytes arrived");
    let gib = data.len() as f64 / (1u64 << 30) as f64;
    Ok((
        data.len() as f64 / (1 << 20) as f64 / secs,
        (cpu_secs(to.pid()?)? - cpu) / gib,
    ))
}

async fn transfer(mib: usize) -> Result<()> {
    let data = p2pvm_e2e::pseudo_random(mib << 20, 91);
    let mut lab = Lab::new()?;
    let p = public(&mut lab).await?;
    let (a, b) = pair(&mut lab, &p, Scenario::Home).await?;
    let Attempt::Dialled(Some(punched)) = attempt(&a, &b).await? else {
        anyhow::bail!("the transfer's pair did not punch a hole");
    };
    let (fa, fb): (Host, Host) = (lab.add_host(line())?, lab.add_host(line())?);
    let flat_a = lab_node(&fa, &[&p.seed], "").await?;
    let flat_b = lab_node(&fb, &[&p.seed], "").await?;
    let (punched_rate, punched_cpu) = moved(&b, &a, &data).await?;
    let (flat_rate, flat_cpu) = moved(&flat_b, &flat_a, &data).await?;
    println!(
        "{mib} MiB over a punched connection (direct after {:.3} s): {punched_rate:.1} MiB/s, \
         {punched_cpu:.1} CPU s/GiB at the receiver; on one flat segment: {flat_rate:.1} MiB/s, \
         {flat_cpu:.1} CPU s/GiB; punched / flat = {:.2}",
        punched.as_secs_f64(),
        punched_rate / flat_rate
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !lab_bench_can_run("nat_punch", false) {
        return Ok(());
    }
    if p2pvm_netlab::Lab::new()
        .and_then(|mut l| l.add_router(Line::UNSHAPED, Nat::Cone))
        .is_err()
    {
        println!("SKIPPED: the nat_punch bench needs the lab's routers (nftables)");
        return Ok(());
    }
    let (full, mib) = bench_size(64, 4);
    let attempts = setting("P2PVM_NAT_ATTEMPTS", if full { 50 } else { 2 }) as usize;
    let batch = setting("P2PVM_NAT_BATCH", 10).max(1) as usize;
    println!(
        "nat_punch: {attempts} attempts per scenario, {batch} pairs at once, 50 ms between routers"
    );
    scenario(Scenario::Home, attempts, batch).await?;
    scenario(Scenario::DoubleNat, attempts, batch).await?;
    transfer(mib).await
}
