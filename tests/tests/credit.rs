//! Peer credit end to end: what a node observes of real peers over real
//! transfers, the policy it applies, and what operators see.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use guest_api::{Client, proto};
use p2pvm_e2e::{TestNode, eventually, fetch_whole as fetch};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(60);

fn item(len: usize, seed: u64) -> Vec<u8> {
    p2pvm_e2e::pseudo_random(len, seed)
}

async fn node(bootstrap: &[&TestNode], config: Option<&str>) -> Result<TestNode> {
    p2pvm_e2e::node_with(bootstrap, config.map(str::to_owned)).await
}

async fn publish(c: &Client, data: &[u8]) -> Result<String> {
    p2pvm_e2e::publish_named(c, "x.bin", data).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_transfers_raise_credit_corrupt_ones_sink_it_and_it_persists() -> Result<()> {
    let honest = node(&[], None).await?;
    let data = item(8 << 20, 1);
    let id = publish(&honest.admin().await?, &data).await?;
    // Gives up quickly once its only provider turns out to lie.
    let mut fetcher = node(&[&honest], Some("[content]\nstall_timeout_secs = 3\n")).await?;
    let f = fetcher.admin().await?;
    ensure!(
        f.credit_show(&honest.peer_id).await?.score == 50,
        "strangers start at 50"
    );
    ensure!(fetch(&f, &id).await? == data);
    let good = f.credit_show(&honest.peer_id).await?;
    ensure!(good.score > 80 && good.standing == "good", "{good:?}");
    ensure!(good.bytes_received == data.len() as u64, "{good:?}");
    ensure!(good.expected_bytes_per_sec > 0.0 && good.reliability > 0.8);
    // The provider sees what it served (wire bytes: the data and its
    // proofs). It records that on its own side, which may come after the
    // fetcher already has the last block.
    let ha = honest.admin().await?;
    eventually(WAIT, "the provider's record of what it served", || async {
        let served = ha.credit_show(&fetcher.peer_id).await.ok()?;
        (served.bytes_served >= data.len() as u64).then_some(())
    })
    .await?;

    // A peer whose copy rotted, serving without re-checking, and the only provider.
    let mut liar = node(&[&honest], Some("[content]\nverify_on_serve = false\n")).await?;
    let other = item(4 << 20, 2);
    let id2 = publish(&honest.admin().await?, &other).await?;
    liar.admin().await?.download_content(&id2).await?;
    liar.stop().await?;
    p2pvm_e2e::rot_store(&liar)?;
    liar.restart().await?;
    honest.admin().await?.delete_content(&id2).await?;
    // Retried until the liar's provider record has spread through the DHT.
    let completed = std::sync::atomic::AtomicBool::new(false);
    let bad = eventually(WAIT, "corruption recorded", || async {
        if let Ok((_, mut s)) = f.fetch_content(&id2, 0, 0, true).await {
            let mut sink = Vec::new();
            if s.read_to_end(&mut sink).await.is_ok() {
                completed.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let c = f.credit_show(&liar.peer_id).await.ok()?;
        (c.corrupt_blocks > 0).then_some(c)
    })
    .await?;
    ensure!(
        !completed.load(std::sync::atomic::Ordering::SeqCst),
        "corrupt data must not complete"
    );
    ensure!(bad.score < 15 && bad.standing == "refused", "{bad:?}");
    let history = f.credit_history(&liar.peer_id, 10).await?;
    ensure!(
        history.iter().any(|e| e.kind == "corrupt-block"),
        "{history:?}"
    );
    // Refused: the liar is no longer asked.
    let e = f.fetch_content(&id2, 0, 0, true).await.unwrap_err();
    ensure!(e.code() == Some(proto::ErrorCode::NotFound), "{e}");

    // Operators see both, best first, and it all survives a restart.
    let list = f.credit_list().await?;
    let pos = |p: &str| list.iter().position(|c| c.peer_id == p);
    ensure!(pos(&honest.peer_id) < pos(&liar.peer_id), "{list:?}");
    fetcher.restart().await?;
    let f = fetcher.admin().await?;
    let after = f.credit_show(&liar.peer_id).await?;
    ensure!(after.corrupt_blocks == bad.corrupt_blocks && after.standing == "refused");
    ensure!(f.credit_show(&honest.peer_id).await?.bytes_received == data.len() as u64);

    // p2pctl shows the same, as JSON.
    let out = p2pvm_e2e::std_command(p2pvm_e2e::bin("p2pctl"))
        .args(["--socket"])
        .arg(&fetcher.socket)
        .args(["--json", "credit", "list"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("p2pctl json")?;
    let peers = json.as_array().context("array")?;
    ensure!(
        peers
            .iter()
            .any(|p| p["peer_id"] == liar.peer_id.as_str() && p["standing"] == "refused")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_prefers_a_high_credit_peer() -> Result<()> {
    // Strangers (50) fall in this fetcher's throttled band; a peer that has
    // delivered clean data rises above it.
    let policy = "[credit]\nthrottle_below = 55\nrefuse_below = 5\n";
    let trusted = node(
        &[],
        Some("[content]\nupload_rate_bytes_per_sec = 16777216\n"),
    )
    .await?;
    let stranger = node(
        &[&trusted],
        Some("[content]\nupload_rate_bytes_per_sec = 16777216\n"),
    )
    .await?;
    let fetcher = node(&[&trusted, &stranger], Some(policy)).await?;
    let f = fetcher.admin().await?;
    let warmup = item(4 << 20, 3);
    let id = publish(&trusted.admin().await?, &warmup).await?;
    ensure!(fetch(&f, &id).await? == warmup);
    ensure!(f.credit_show(&trusted.peer_id).await?.standing == "good");
    ensure!(f.credit_show(&stranger.peer_id).await?.standing == "throttled");

    // The same item on both, equally fast.
    let data = item(24 << 20, 4);
    let id = publish(&trusted.admin().await?, &data).await?;
    ensure!(publish(&stranger.admin().await?, &data).await? == id);
    // Both must be known providers, or the check below would prove nothing.
    eventually(WAIT, "both providers visible", || async {
        let hits = f.search_content(&id, 1).await.ok()?;
        let p = &hits.first()?.providers;
        (p.contains(&trusted.peer_id) && p.contains(&stranger.peer_id)).then_some(())
    })
    .await?;
    let before_t = f.credit_show(&trusted.peer_id).await?.bytes_received;
    ensure!(fetch(&f, &id).await? == data);
    let from_trusted = f.credit_show(&trusted.peer_id).await?.bytes_received - before_t;
    let from_stranger = f.credit_show(&stranger.peer_id).await?.bytes_received;
    ensure!(
        from_trusted == data.len() as u64 && from_stranger == 0,
        "trusted {from_trusted}, stranger {from_stranger}"
    );
    Ok(())
}
