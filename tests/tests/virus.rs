//! The virus filter end to end, with a real clamd (scripts/clamd.sh; CI starts
//! it): malware from a peer is never delivered and the peer is isolated; local
//! publishes of malware are refused; an unreachable clamd fails closed.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use guest_api::{Client, proto};
use p2pvm_e2e::{TestNode, eventually};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(60);
const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
const MARKER: &[u8] = b"P2PVM-SYNTHETIC-MALWARE-MARKER-7f3a";

fn item(len: usize, seed: u64) -> Vec<u8> {
    p2pvm_e2e::pseudo_random(len, seed)
}

async fn node(bootstrap: &[&TestNode], config: Option<String>) -> Result<TestNode> {
    p2pvm_e2e::node_with(bootstrap, config).await
}

async fn publish(c: &Client, name: &str, data: &[u8]) -> guest_api::Result<proto::ContentInfo> {
    let meta = proto::ContentPublishRequest {
        name: name.into(),
        ..Default::default()
    };
    c.publish_content(meta, data).await
}

fn is_malware(e: &guest_api::Error, sig: &str) -> bool {
    matches!(e, guest_api::Error::Api { code, message }
        if *code == proto::ErrorCode::MalwareDetected && message.contains(sig))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_malware_is_never_delivered_and_stays_banned() -> Result<()> {
    // A hostile peer: its own filter is off, so it happily publishes malware.
    let mallory = node(&[], Some("[virus]\nenabled = false\n".into())).await?;
    // The EICAR test file inside a larger item.
    let mut bad = item(3 << 20, 1);
    bad[1_500_000..1_500_000 + EICAR.len()].copy_from_slice(EICAR);
    let info = publish(&mallory.admin().await?, "free-movie.mp4", &bad).await?;

    let mut victim = node(&[&mallory], None).await?;
    let v = victim.admin().await?;
    let mut events = v.events().await?;
    let (_, mut stream) = v.fetch_content(&info.content_id, 0, 0, true).await?;
    let mut got = Vec::new();
    let e = stream
        .read_to_end(&mut got)
        .await
        .expect_err("the fetch must fail");
    let api = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<guest_api::Error>());
    ensure!(
        api.is_some_and(|a| is_malware(a, "Eicar")),
        "the stream fails with the signature: {e}"
    );
    ensure!(
        !got.windows(EICAR.len()).any(|w| w == EICAR),
        "malware bytes reached the app"
    );
    let e = v.download_content(&info.content_id).await.unwrap_err();
    ensure!(
        is_malware(&e, "Eicar") || e.code() == Some(proto::ErrorCode::NotFound),
        "{e}"
    );
    let detected = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if let proto::event::Kind::MalwareDetected(m) = ev {
                return Some(m);
            }
        }
        None
    })
    .await?
    .context("no malware event")?;
    ensure!(detected.content_id == info.content_id && detected.signature.contains("Eicar"));
    ensure!(
        detected.peer_ids == vec![mallory.peer_id.clone()],
        "{detected:?}"
    );
    ensure!(v.content_list().await?.is_empty(), "malware was stored");
    let credit = v.credit_show(&mallory.peer_id).await?;
    ensure!(
        credit.standing == "banned" && credit.malware == 1,
        "{credit:?}"
    );
    ensure!(credit.score < 15, "credit not slashed: {credit:?}");
    eventually(WAIT, "mallory disconnected", || async {
        let peers = v.peers().await.ok()?;
        (!peers.iter().any(|p| p.peer_id == mallory.peer_id)).then_some(())
    })
    .await?;

    // The ban survives a restart, and mallory cannot get back in.
    victim.restart().await?;
    let v = victim.admin().await?;
    let after = v.credit_show(&mallory.peer_id).await?;
    ensure!(
        after.standing == "banned" && after.ban_reason.contains("malware"),
        "{after:?}"
    );
    let _ = mallory
        .admin()
        .await?
        .connect("", [victim.addr.as_str()])
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    eventually(WAIT, "mallory kept out", || async {
        let peers = v.peers().await.ok()?;
        (!peers.iter().any(|p| p.peer_id == mallory.peer_id)).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_publish_of_malware_is_refused_with_the_signature() -> Result<()> {
    let n = node(&[], None).await?;
    let c = n.admin().await?;
    let e = publish(&c, "eicar.com", EICAR).await.unwrap_err();
    ensure!(is_malware(&e, "Eicar"), "{e}");
    let e = publish(&c, "h.txt", b"p2pvm synthetic hash-signature test file\n")
        .await
        .unwrap_err();
    ensure!(is_malware(&e, "HashSig"), "{e}");
    let mut big = item(5 << 20, 2);
    big[4_000_000..4_000_000 + MARKER.len()].copy_from_slice(MARKER);
    let e = publish(&c, "big.bin", &big).await.unwrap_err();
    ensure!(is_malware(&e, "Synthetic"), "{e}");
    ensure!(
        c.content_list().await?.is_empty(),
        "an infected item was stored"
    );
    let clean = publish(&c, "clean.bin", &item(1 << 20, 3)).await?;
    ensure!(c.content_list().await?.len() == 1 && clean.size == 1 << 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clamd_down_fails_closed_and_recovers() -> Result<()> {
    let clamd = PrivateClamd::new()?;
    clamd.start()?;
    let source = node(&[], None).await?;
    let remote = publish(&source.admin().await?, "r.bin", &item(1 << 20, 4)).await?;
    let n = node(&[&source], Some(clamd.config())).await?;
    let c = n.admin().await?;
    publish(&c, "a.bin", &item(100_000, 5)).await?;

    clamd.stop().await?;
    let e = publish(&c, "b.bin", &item(100_000, 6)).await.unwrap_err();
    ensure!(
        e.code() == Some(proto::ErrorCode::Unavailable) && e.to_string().contains("clamd"),
        "{e}"
    );
    let e = c.download_content(&remote.content_id).await.unwrap_err();
    ensure!(e.code() == Some(proto::ErrorCode::Unavailable), "{e}");
    ensure!(
        c.content_list().await?.len() == 1,
        "nothing unscanned may be stored"
    );

    clamd.start()?;
    publish(&c, "b.bin", &item(100_000, 6)).await?;
    c.download_content(&remote.content_id).await?;
    ensure!(c.content_list().await?.len() == 3);
    clamd.stop().await?;
    Ok(())
}

/// A clamd of the test's own (scripts/clamd.sh in a private directory), so
/// stopping it or changing its signatures does not disturb other tests.
struct PrivateClamd {
    dir: tempfile::TempDir,
    script: std::path::PathBuf,
}

impl PrivateClamd {
    fn new() -> Result<Self> {
        // Read at run time: a binary reused from a build in another checkout
        // (a shared target directory) would carry that checkout's path.
        let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
        Ok(Self {
            dir: tempfile::tempdir()?,
            script: std::path::Path::new(&manifest).join("../scripts/clamd.sh"),
        })
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("clamd.sock")
    }

    fn database_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("db")
    }

    /// A node's `[virus]` section for this clamd.
    fn config(&self) -> String {
        format!(
            "[virus]\nclamd_socket = \"{}\"\ndatabase_dir = \"{}\"\n",
            self.socket().display(),
            self.database_dir().display()
        )
    }

    fn start(&self) -> Result<()> {
        let out = std::process::Command::new(&self.script)
            .env("P2PVM_CLAMD_DIR", self.dir.path())
            .output()?;
        ensure!(
            out.status.success(),
            "clamd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Stops it and waits until its socket no longer answers.
    async fn stop(&self) -> Result<()> {
        std::process::Command::new(&self.script)
            .arg("stop")
            .env("P2PVM_CLAMD_DIR", self.dir.path())
            .status()?;
        let sock = self.socket();
        eventually(WAIT, "clamd gone", || async {
            std::os::unix::net::UnixStream::connect(&sock)
                .is_err()
                .then_some(())
        })
        .await
    }
}

impl Drop for PrivateClamd {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script)
            .arg("stop")
            .env("P2PVM_CLAMD_DIR", self.dir.path())
            .status();
    }
}

/// Streams a whole item (kept or not) and returns its bytes.
async fn stream(c: &Client, id: &str, keep: bool) -> Result<Vec<u8>> {
    let (_, mut s) = c.fetch_content(id, 0, 0, keep).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_item_is_not_scanned_again_until_the_signatures_change() -> Result<()> {
    // The proof that an item was not scanned: clamd is down, and the fetch
    // still succeeds (one that had to scan fails closed, as above).
    let clamd = PrivateClamd::new()?;
    clamd.start()?;
    let source = node(&[], None).await?;
    let publisher = source.admin().await?;
    let data = item(3 << 20, 21);
    let other = item(1 << 20, 22);
    let info = publish(&publisher, "clean.bin", &data).await?;
    let never = publish(&publisher, "never.bin", &other).await?;
    let mut n = node(&[&source], Some(clamd.config())).await?;
    let c = n.admin().await?;
    // Streamed once without keeping it: scanned whole, clean, remembered.
    ensure!(stream(&c, &info.content_id, false).await? == data);

    clamd.stop().await?;
    ensure!(
        stream(&c, &info.content_id, false).await? == data,
        "a re-fetch of a clean item was scanned again"
    );
    // Kept this time: the download's scan is skipped too, and it is stored.
    c.download_content(&info.content_id).await?;
    // An item never scanned still fails closed.
    let e = stream(&c, &never.content_id, false).await.unwrap_err();
    ensure!(e.to_string().contains("clamd"), "{e}");

    // A signature update: the old verdicts no longer count.
    std::fs::write(
        clamd.database_dir().join("update.ndb"),
        // "P2PVM-UPDATE-01", in hex.
        "P2pvm.Test.Update:0:*:503250564d2d5550444154452d3031\n",
    )?;
    c.delete_content(&info.content_id).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let e = stream(&c, &info.content_id, false).await.unwrap_err();
    ensure!(
        e.to_string().contains("clamd"),
        "scanned by stale signatures: {e}"
    );

    // With clamd back (and the new signatures loaded) it is scanned once
    // more, and the verdict is cached again — across a restart of the node.
    clamd.start()?;
    // (The node reads the database directory at most every 2 s.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(stream(&c, &info.content_id, false).await? == data);
    drop(c);
    n.restart().await?;
    let c = n.admin().await?;
    // The node learns clamd's version at start; then clamd goes away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    clamd.stop().await?;
    ensure!(
        stream(&c, &info.content_id, false).await? == data,
        "the verdict cache did not survive a restart"
    );
    Ok(())
}
