//! Bulk streams against a real p2pd: content fetches arrive through a
//! shared-memory ring handed over on a second connection, tickets are one-time
//! capabilities, and apps that misbehave on the attach protocol or the ring
//! cost the node nothing. (Through the front-end: `sandbox.rs`.)

use std::time::Duration;

use anyhow::{Result, ensure};
use guest_api::proto;
use p2pvm_bulk::attach::{self, Preamble, TICKET_BYTES};
use p2pvm_bulk::{BulkError, Reply};
use p2pvm_e2e::{NodeOpts, TestNode, pseudo_random};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const WAIT: Duration = Duration::from_secs(10);

fn meta(name: &str) -> proto::ContentPublishRequest {
    proto::ContentPublishRequest {
        name: name.into(),
        ..Default::default()
    }
}

async fn node_with(len: usize, seed: u64) -> Result<(TestNode, String, Vec<u8>)> {
    let node = TestNode::start(NodeOpts {
        config_toml: Some("[virus]\nenabled = false\n".into()),
        ..Default::default()
    })
    .await?;
    let data = pseudo_random(len, seed);
    let info = node
        .admin()
        .await?
        .publish_content(meta("item.bin"), &data[..])
        .await?;
    Ok((node, info.content_id, data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_come_through_a_ring_and_a_ticket_works_once() -> Result<()> {
    let (node, id, data) = node_with(9 << 20, 3).await?;
    let app = node.app("viewer").await?;
    ensure!(app.welcome().bulk_streams, "the node offers bulk streams");

    // Whole item, and a range that starts and ends mid-chunk.
    let (opened, mut s) = app.fetch_content(&id, 0, 0, true).await?;
    ensure!(s.is_bulk(), "the bytes come through a ring");
    ensure!(opened.stream_id == 0 && opened.bulk_ticket.len() == TICKET_BYTES);
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    ensure!(got == data, "whole item differs");
    let (_, mut s) = app.fetch_content(&id, 1_234_567, 3_000_001, true).await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    ensure!(
        got[..] == data[1_234_567..1_234_567 + 3_000_001],
        "range differs"
    );

    // The ticket was spent by the attachment; a replay and a guess are refused.
    let ticket: [u8; TICKET_BYTES] = opened.bulk_ticket[..].try_into()?;
    for ticket in [ticket, [0x5a; TICKET_BYTES]] {
        let e = attach::attach(
            &node.socket,
            &Preamble {
                capacity: 0,
                ticket,
            },
        )
        .await
        .unwrap_err();
        ensure!(
            matches!(e, BulkError::Failed { code, .. } if code == proto::ErrorCode::NotFound as u32),
            "{e:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stall_or_leave_cost_the_node_nothing() -> Result<()> {
    let (node, id, data) = node_with(32 << 20, 4).await?;
    let app = node.app("viewer").await?;
    let other = node.app("other").await?;

    // A reader that takes one chunk and then stops reading fills its ring;
    // the node waits for it without holding anything else up.
    let (_, mut stalled) = app.fetch_content(&id, 0, 0, true).await?;
    let mut first = vec![0u8; 1 << 20];
    stalled.read_exact(&mut first).await?;
    ensure!(first[..] == data[..1 << 20]);
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(2), other.node_info()).await??;
    }
    // Several readers leave in the middle of their streams.
    for _ in 0..5 {
        let (_, mut s) = app.fetch_content(&id, 0, 0, true).await?;
        let mut some = vec![0u8; 3 << 20];
        s.read_exact(&mut some).await?;
        drop(s);
    }
    drop(stalled);
    // And the node serves the whole item again, byte for byte.
    let (_, mut s) = other.fetch_content(&id, 0, 0, true).await?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await??;
    ensure!(got == data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_attachments_are_refused_and_the_node_keeps_serving() -> Result<()> {
    let (node, id, data) = node_with(2 << 20, 5).await?;
    let app = node.app("viewer").await?;

    // An unknown protocol version: closed without an answer.
    let mut s = UnixStream::connect(&node.socket).await?;
    let mut bad = Preamble {
        capacity: 0,
        ticket: [1; TICKET_BYTES],
    }
    .encode();
    bad[4] = 99;
    s.write_all(&bad).await?;
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await??;
    ensure!(rest.is_empty(), "no reply to a bad preamble");

    // A truncated preamble, then silence, then hang-up.
    let mut s = UnixStream::connect(&node.socket).await?;
    s.write_all(&attach::MAGIC).await?;
    s.write_all(&[1, 0]).await?;
    drop(s);

    // An unknown ticket gets a typed refusal on the socket, whatever ring
    // size it asks for.
    let mut s = UnixStream::connect(&node.socket).await?;
    let p = Preamble {
        capacity: u32::MAX,
        ticket: [2; TICKET_BYTES],
    };
    s.write_all(&p.encode()).await?;
    let reply = tokio::time::timeout(WAIT, Reply::read(&mut s)).await??;
    ensure!(reply.code == proto::ErrorCode::NotFound as u32, "{reply:?}");

    let (_, mut s) = app.fetch_content(&id, 0, 0, true).await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    ensure!(got == data);
    Ok(())
}
