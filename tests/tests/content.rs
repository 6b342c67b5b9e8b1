//! Content sharing end to end over real p2pd processes: publish, verified
//! fetch (whole and ranges), multi-source swarms with a vanishing publisher,
//! corrupt providers, crash safety and search.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use guest_api::{Client, proto};
use p2pvm_e2e::{eventually, pair};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(60);

/// Deterministic, incompressible-looking bytes.
fn item(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn meta(name: &str, tags: &[&str]) -> proto::ContentPublishRequest {
    proto::ContentPublishRequest {
        name: name.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

async fn publish(c: &Client, name: &str, data: &[u8]) -> Result<proto::ContentInfo> {
    Ok(c.publish_content(meta(name, &["test"]), data).await?)
}

/// Reads a fetch stream to the end.
async fn fetch_all(
    c: &Client,
    id: &str,
    offset: u64,
    length: u64,
    keep: bool,
) -> Result<Vec<u8>> {
    let (opened, mut s) = c.fetch_content(id, offset, length, keep).await?;
    let mut out = Vec::with_capacity(opened.length as usize);
    s.read_to_end(&mut out).await.context("reading the fetch stream")?;
    ensure!(
        out.len() as u64 == opened.length,
        "stream ended after {} of {} bytes",
        out.len(),
        opened.length
    );
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_whole_item_and_middle_range_arrive_verified() -> Result<()> {
    let (a, b) = pair().await?;
    let data = item(100 << 20, 1);
    let publisher = a.app("publisher").await?;
    let info = publish(&publisher, "big.bin", &data).await?;
    ensure!(info.size == data.len() as u64);
    ensure!(info.content_id == blake3::hash(&data).to_hex().to_string());
    ensure!(info.publisher == a.peer_id, "manifest names the publisher");

    let viewer = b.app("viewer").await?;
    // A range in the middle first: nothing else of the item is fetched for it.
    let (off, len) = (37 * 1024 * 1024 + 12_345, 3 * 1024 * 1024 + 7);
    let mid = fetch_all(&viewer, &info.content_id, off, len, true).await?;
    ensure!(mid == data[off as usize..(off + len) as usize], "middle range differs");

    let got = fetch_all(&viewer, &info.content_id, 0, 0, true).await?;
    ensure!(got.len() == data.len() && got == data, "whole item differs");
    // The whole fetch was kept: B now lists it and serves it.
    let listed = eventually(WAIT, "item stored on the fetcher", || async {
        let l = viewer.content_list().await.ok()?;
        l.into_iter().find(|i| i.content_id == info.content_id)
    })
    .await?;
    ensure!(listed.local && listed.size == data.len() as u64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_bad_ranges_and_bad_ids_are_typed_errors() -> Result<()> {
    let (a, b) = pair().await?;
    let c = b.app("viewer").await?;
    let unknown = blake3::hash(b"nobody has this").to_hex().to_string();
    let e = c.fetch_content(&unknown, 0, 0, true).await.unwrap_err();
    ensure!(
        matches!(&e, guest_api::Error::Api { code, .. } if *code == proto::ErrorCode::NotFound),
        "{e}"
    );
    let e = c.fetch_content("xyz", 0, 0, true).await.unwrap_err();
    ensure!(
        matches!(&e, guest_api::Error::Api { code, .. } if *code == proto::ErrorCode::BadRequest),
        "{e}"
    );
    let p = a.app("publisher").await?;
    let info = publish(&p, "small.txt", b"hello world").await?;
    let e = c.fetch_content(&info.content_id, 5, 100, true).await.unwrap_err();
    ensure!(
        matches!(&e, guest_api::Error::Api { code, .. } if *code == proto::ErrorCode::BadRequest),
        "{e}"
    );
    // The session still works after the errors.
    ensure!(fetch_all(&c, &info.content_id, 6, 5, true).await? == b"world");
    Ok(())
}
