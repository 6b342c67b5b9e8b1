//! Flash crowds. On loopback: a publisher that published while alone, then
//! dozens of real `p2pd`s that joined through it and download the item at
//! the same moment. Every one must finish with verified bytes.
//!
//! The size matters: with more nodes than Kademlia's replication factor (20),
//! a lookup no longer reaches every node, so a provider record left only at
//! the lonely publisher is not found; and a newcomer that finds a peer still
//! downloading must get the item's size proven by it. At 60 nodes, 25 to 32
//! of 59 downloads failed this way ("not found", "last block refused: not
//! downloaded yet").
//!
//! On home lines: each node in a network namespace of its own (the lab,
//! `crates/netlab`), its line shaped, so the crowd must trade blocks among
//! itself because the publisher cannot feed everyone.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use p2pvm_e2e::playback::{Streaming, Summary};
use p2pvm_e2e::swarm::{Churn, Swarm, SwarmSpec, home_lines, lower_bound};
use p2pvm_netlab::Lab;

/// Two crowds at once on two cores would measure each other, not the engine.
static ONE_CROWD_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// Sixty unoptimised p2pds starve two cores: in a debug build their
// downloads stall for want of CPU, not for what this test is about.
#[cfg_attr(
    debug_assertions,
    ignore = "needs release p2pds (60 debug ones starve two cores); scripts/test.sh runs it against release ones (P2PVM_BIN_DIR, --ignored)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_crowd_of_dozens_all_finish_an_item_published_before_they_joined() -> Result<()> {
    let _alone = ONE_CROWD_AT_A_TIME.lock().await;
    let swarm = Swarm::start(
        &SwarmSpec {
            nodes: 60,
            bytes: 2 << 20,
            // Capped uploads keep peers partial for a while, as on real links.
            config: "[content]\nupload_rate_bytes_per_sec = 4194304\n[virus]\nenabled = false\n"
                .into(),
            log: None,
        },
        None,
    )
    .await?;
    let outcome = swarm.flash_crowd().await?;
    outcome.all_done()?;
    // The bytes are the publisher's, read back from two downloaders' stores.
    for d in [
        &swarm.downloaders[0],
        swarm.downloaders.last().expect("downloaders"),
    ] {
        let got = p2pvm_e2e::fetch_whole(&d.admin().await?, &swarm.id).await?;
        ensure!(got == swarm.data, "a downloader holds other bytes");
    }
    Ok(())
}

/// The lab, or `None` after a loud SKIPPED where it cannot be built.
fn lab_or_skip() -> Result<Option<Lab>> {
    match Lab::check() {
        Ok(()) => Ok(Some(Lab::new()?)),
        Err(e) => {
            eprintln!("SKIPPED: the swarm on shaped lines needs the network lab: {e}");
            Ok(None)
        }
    }
}

// Twenty p2pds, each in a network namespace of its own behind a line shaped
// like home broadband (2-20 Mbit/s up, five times that down, 20-150 ms of
// round trip and 0.25 % loss each way on every line, through the lab's delay
// lines): the publisher cannot serve everyone, so the downloaders must trade
// among themselves.
#[cfg_attr(
    debug_assertions,
    ignore = "needs release p2pds (20 debug ones on shaped lines starve two cores); scripts/test.sh runs it against release ones (P2PVM_BIN_DIR, --ignored)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_crowd_on_home_lines_finishes_with_little_from_the_publisher() -> Result<()> {
    let _alone = ONE_CROWD_AT_A_TIME.lock().await;
    let Some(mut lab) = lab_or_skip()? else {
        return Ok(());
    };
    let nodes = 20;
    let lines = home_lines(nodes);
    for l in &lines {
        lab.add_host(*l)?;
    }
    let bytes = 16 << 20;
    let swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes,
            config: "[virus]\nenabled = false\n".into(),
            log: None,
        },
        Some(&lab),
    )
    .await?;
    let publisher = &lab.hosts()[0];
    let sent_before = lab.traffic(publisher)?.sent;
    let outcome = swarm.flash_crowd().await?;
    outcome.all_done()?;
    let ratio = (lab.traffic(publisher)?.sent - sent_before) as f64 / bytes as f64;
    let bound = lower_bound(&lines, bytes as u64);
    eprintln!(
        "{nodes} nodes on home lines, 16 MiB: last done {:.1} s (lower bound {:.1} s); \
         the publisher's line carried {ratio:.2}x the item",
        outcome.done.last().expect("done").as_secs_f64(),
        bound.as_secs_f64()
    );
    for d in [
        &swarm.downloaders[0],
        swarm.downloaders.last().expect("downloaders"),
    ] {
        let got = p2pvm_e2e::fetch_whole(&d.admin().await?, &swarm.id).await?;
        ensure!(got == swarm.data, "a downloader holds other bytes");
    }
    // Everything from the publisher would be 19x. Ours sends 3.4-3.9x here
    // (libtorrent's seed about 2.2x on the same lab: docs/content.md); 6x
    // leaves room for a loaded machine and still fails when peers stop
    // trading.
    ensure!(
        ratio <= 6.0,
        "the publisher sent {ratio:.2}x the item: the downloaders did not trade"
    );
    Ok(())
}

// Churn during the crowd (scenario 3 of issue 33): 6 of the 19 downloaders
// are killed at random moments, 3 of them come back 5 s later on the same
// store. Everyone alive at the end finishes with the publisher's bytes, and
// a node that comes back resumes what it held instead of starting over.
#[cfg_attr(
    debug_assertions,
    ignore = "needs release p2pds (20 debug ones on shaped lines starve two cores); scripts/test.sh runs it against release ones (P2PVM_BIN_DIR, --ignored)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_under_churn_finishes_and_returning_nodes_resume() -> Result<()> {
    let _alone = ONE_CROWD_AT_A_TIME.lock().await;
    let Some(mut lab) = lab_or_skip()? else {
        return Ok(());
    };
    let nodes = 20;
    for l in home_lines(nodes) {
        lab.add_host(l)?;
    }
    let bytes = 16 << 20;
    let mut swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes,
            config: "[virus]\nenabled = false\n".into(),
            log: Some("warn,p2p_service_vm::content::fetch::driver=info".into()),
        },
        Some(&lab),
    )
    .await?;
    let churn = Churn {
        killed: 6,
        returning: 3,
        kill_within: Duration::from_secs(25),
        away: Duration::from_secs(5),
        seed: 33,
    };
    let out = swarm.flash_crowd_with_churn(&churn).await?;
    eprintln!(
        "churn: killed {:?}, back {:?} (finished before their kill: {:?}); {} alive finished, last at {:.1} s",
        out.killed,
        out.returned,
        out.finished_before_kill,
        out.crowd.done.len(),
        out.crowd
            .done
            .last()
            .map_or(f64::NAN, Duration::as_secs_f64)
    );
    out.crowd.all_done()?;
    ensure!(
        out.crowd.done.len() == nodes - 1 - churn.killed + churn.returning,
        "every node alive at the end finished"
    );
    let must_resume: Vec<usize> = out
        .returned
        .iter()
        .copied()
        .filter(|i| out.checkpointed.contains(i))
        .collect();
    ensure!(
        !must_resume.is_empty(),
        "no returning node had a checkpoint to resume: the scenario tested no resume"
    );
    for i in &must_resume {
        let log = swarm.downloaders[*i].log();
        ensure!(
            log.contains("resuming an unfinished download"),
            "downloader {i} came back and started over instead of resuming"
        );
        let got = p2pvm_e2e::fetch_whole(&swarm.downloaders[*i].admin().await?, &swarm.id).await?;
        ensure!(
            got == swarm.data,
            "a returning downloader holds other bytes"
        );
    }
    Ok(())
}

// Bad peers in the swarm (scenario 5 of issue 33): 5 peers hold a rotted copy
// and serve it unchecked, 5 accept requests and never answer; all 10 announce
// the item like any provider. The honest downloaders finish with the
// publisher's bytes, and every downloader that met a bad peer refuses it.
#[cfg_attr(
    debug_assertions,
    ignore = "needs release p2pds (25 debug ones on shaped lines starve two cores); scripts/test.sh runs it against release ones (P2PVM_BIN_DIR, --ignored)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_nodes_finish_past_corrupt_and_silent_peers_and_refuse_them() -> Result<()> {
    let _alone = ONE_CROWD_AT_A_TIME.lock().await;
    let Some(mut lab) = lab_or_skip()? else {
        return Ok(());
    };
    let (nodes, rotten, silent) = (15, 5, 5);
    for l in home_lines(nodes + rotten + silent) {
        lab.add_host(l)?;
    }
    let bytes = 16 << 20;
    let config = "[virus]\nenabled = false\n";
    let swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes,
            config: config.into(),
            log: None,
        },
        Some(&lab),
    )
    .await?;
    let bad = swarm
        .add_bad_peers(Some(&lab), nodes, rotten, silent, config)
        .await?;
    let outcome = swarm.flash_crowd().await?;
    outcome.all_done()?;
    for d in [&swarm.downloaders[0], &swarm.downloaders[nodes - 2]] {
        let got = p2pvm_e2e::fetch_whole(&d.admin().await?, &swarm.id).await?;
        ensure!(got == swarm.data, "a downloader holds other bytes");
    }
    // A silent peer goes on a downloader's record 45 s after the request it
    // left unanswered (the 15 s answer timeout, then 30 s more in which a
    // late answer would have shown it slow: content/fetch/silence.rs); the
    // last such request went out before the last download finished.
    tokio::time::sleep(Duration::from_secs(47)).await;
    let tally = bad.tally(&swarm).await?;
    eprintln!(
        "{nodes} nodes and {rotten}+{silent} bad peers, 16 MiB: last done {:.1} s; {tally}",
        outcome.done.last().expect("done").as_secs_f64(),
    );
    ensure!(
        tally.met_rotten > 0 && tally.met_silent > 0,
        "downloaders met {} rotten and {} silent peers: the scenario tested too little",
        tally.met_rotten,
        tally.met_silent
    );
    ensure!(
        tally.wronged.is_empty(),
        "honest nodes refused: {:?}",
        tally.wronged
    );
    ensure!(
        tally.lenient.is_empty(),
        "bad peers not refused by downloaders that met them: {:?}",
        tally.lenient
    );
    Ok(())
}

// Streaming in the swarm (scenario 2 of issue 33): 6 of the 11 downloaders
// fetch the item first (a swarm that holds it), then the other 5 start two
// seconds apart and play it at 60 % of their line's download rate, seeking
// once from 40 % to 70 % of it. Every viewer plays to the end (every byte
// verified); start-up times and stalls are printed for the record. (Viewers
// alone cannot stream at that bitrate: home lines download five times what
// they upload, so a crowd of viewers asks three times what it can send.)
#[cfg_attr(
    debug_assertions,
    ignore = "needs release p2pds (12 debug ones on shaped lines starve two cores); scripts/test.sh runs it against release ones (P2PVM_BIN_DIR, --ignored)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_stream_the_item_from_the_swarm_and_seek() -> Result<()> {
    let _alone = ONE_CROWD_AT_A_TIME.lock().await;
    let Some(mut lab) = lab_or_skip()? else {
        return Ok(());
    };
    let nodes = 12;
    let lines = home_lines(nodes);
    for l in &lines {
        lab.add_host(*l)?;
    }
    let bytes: u64 = 16 << 20;
    let swarm = Swarm::start(
        &SwarmSpec {
            nodes,
            bytes: bytes as usize,
            config: "[virus]\nenabled = false\n".into(),
            log: None,
        },
        Some(&lab),
    )
    .await?;
    let plan = Streaming {
        holders: 6,
        gap: Duration::from_secs(2),
        share: 0.6,
    };
    let plays = swarm.stream(&lines, &plan).await?;
    let summary = Summary::of(&plays).context("no viewers")?;
    eprintln!(
        "{summary}; stalls {:?}, first bytes after {:?}, stalled {:?}",
        plays.iter().map(|p| p.stalls).collect::<Vec<_>>(),
        plays.iter().map(|p| p.first_byte).collect::<Vec<_>>(),
        plays.iter().map(|p| p.stalled).collect::<Vec<_>>(),
    );
    // Every viewer started: no start-up waited on the stall timeout.
    ensure!(
        summary.startup_max < Duration::from_secs(20),
        "a viewer waited {:?} to start",
        summary.startup_max
    );
    Ok(())
}
