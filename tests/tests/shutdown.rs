//! Shutdown under load: a node stopped (SIGTERM) while it serves a transfer,
//! and a node stopped while it fetches, streams to an app and holds sessions
//! and subscriptions, both exit cleanly with every task of theirs ended —
//! none abandoned — and lose nothing they had stored.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use guest_api::proto;
use p2pvm_e2e::{NodeOpts, TestNode, eventually};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(60);

/// The number in p2pd's "p2pd stopped" line (`tasks_left=N`), if it logged one.
fn tasks_left(log: &str) -> Option<usize> {
    let line = log.lines().rev().find(|l| l.contains("p2pd stopped"))?;
    let at = line.find("tasks_left=")? + "tasks_left=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

async fn stop_cleanly(node: &mut TestNode, what: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let status = node
        .stop()
        .await
        .with_context(|| format!("stopping {what}"))?;
    let log = node.log();
    ensure!(status.success(), "{what} exited with {status}; log:\n{log}");
    let left = tasks_left(&log).with_context(|| format!("{what} never logged its stop:\n{log}"))?;
    ensure!(
        left == 0,
        "{what} left {left} tasks running at shutdown:\n{log}"
    );
    ensure!(
        !log.contains("tasks still running"),
        "{what} waited out the grace period:\n{log}"
    );
    println!("{what}: stopped cleanly in {:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_stopped_mid_transfer_end_every_task_and_keep_their_store() -> Result<()> {
    // The publisher's upload is capped so the transfers are still running
    // when the nodes are stopped.
    let a = TestNode::start(NodeOpts {
        config_toml: Some("[content]\nupload_rate_bytes_per_sec = 4000000\n".into()),
        capture_log: true,
        ..Default::default()
    })
    .await?;
    let mut b = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        capture_log: true,
        ..Default::default()
    })
    .await?;
    let mut a = a;
    let data = p2pvm_e2e::pseudo_random(48 << 20, 9);
    let small = p2pvm_e2e::pseudo_random(300_000, 10);
    let publisher = a.app("publisher").await?;
    let meta = |name: &str| proto::ContentPublishRequest {
        name: name.into(),
        ..Default::default()
    };
    let big = publisher
        .publish_content(meta("big.bin"), &data[..])
        .await?;
    let kept = publisher
        .publish_content(meta("small.bin"), &small[..])
        .await?;

    let viewer = b.app("viewer").await?;
    // Something B holds before the load starts, to prove it survives.
    let (_, mut s) = viewer.fetch_content(&kept.content_id, 0, 0, true).await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    ensure!(got == small);
    eventually(WAIT, "the small item stored on B", || async {
        let l = viewer.content_list().await.ok()?;
        l.iter()
            .any(|i| i.content_id == kept.content_id)
            .then_some(())
    })
    .await?;

    // Load on B: a download into the store, a stream to an app that reads
    // slowly, a subscription and idle sessions.
    let downloader = b.app("downloader").await?;
    let id = big.content_id.clone();
    let download = tokio::spawn(async move { downloader.download_content(&id).await });
    let (_, mut stream) = viewer.fetch_content(&big.content_id, 0, 0, false).await?;
    let mut first = vec![0u8; 1 << 20];
    stream.read_exact(&mut first).await?;
    ensure!(
        first[..] == data[..1 << 20],
        "the stream's first MiB differs"
    );
    let listener = b.app("listener").await?;
    let _msgs = listener.subscribe("shutdown-test").await?;
    let _idle = b.app("idle").await?;
    let progress = viewer.clone();
    let id = big.content_id.clone();
    eventually(WAIT, "the download under way", || async {
        let s = progress.content_stat(&id).await.ok()?;
        (!s.local).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The publisher goes first, while it serves both transfers.
    stop_cleanly(&mut a, "the publisher (serving)").await?;
    // Then the fetcher, with its transfers stalled mid-item.
    stop_cleanly(&mut b, "the fetcher (downloading and streaming)").await?;
    let ended = tokio::time::timeout(WAIT, download).await??;
    ensure!(
        ended.is_err(),
        "the download cannot have finished: {ended:?}"
    );

    // Nothing B had stored was lost, and nothing half-fetched is visible.
    b.restart().await?;
    let after = b.app("viewer").await?;
    let list = after.content_list().await?;
    ensure!(
        list.iter()
            .any(|i| i.content_id == kept.content_id && i.local),
        "the stored item is gone after the shutdown"
    );
    ensure!(
        !list.iter().any(|i| i.content_id == big.content_id),
        "a half-fetched item is listed"
    );
    let (_, mut s) = after.fetch_content(&kept.content_id, 0, 0, false).await?;
    let mut again = Vec::new();
    s.read_to_end(&mut again).await?;
    ensure!(again == small, "the stored item changed");
    Ok(())
}
