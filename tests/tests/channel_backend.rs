//! A hostile front-end against a real p2pd back-end: whatever it writes into
//! the shared rings, p2pd resets the channel (with a reason), keeps serving its
//! other API transport and its peers, and serves a well-behaved front-end that
//! attaches afterwards.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use p2pvm_channel::fuzzing::RawDriver;
use p2pvm_channel::{Broker, Layout, Side};
use p2pvm_e2e::{NodeOpts, TestNode};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_front_end_resets_only_the_channel() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker_path = dir.path().join("broker.sock");
    let broker = Arc::new(Broker::new(Layout::new(16, 4096)?)?);
    let listener = std::os::unix::net::UnixListener::bind(&broker_path)?;
    let b = broker.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = b.answer(conn);
        }
    });
    let node = TestNode::start(NodeOpts {
        config_toml: Some(format!("channel_broker = \"{}\"\n", broker_path.display())),
        ..Default::default()
    })
    .await?;
    let ep = tokio::task::spawn_blocking({
        let p = broker_path.clone();
        move || p2pvm_channel::attach(&p, Side::Driver)
    })
    .await??;

    let mut raw = RawDriver::new(&ep)?;
    let mut resets = 0;
    for round in 0..30u64 {
        ensure!(
            raw.attach(WAIT).await,
            "round {round}: the back-end did not attach"
        );
        // Structured garbage: records aimed at every ring part and the buffers.
        let junk = p2pvm_e2e::pseudo_random(4096, 1000 + round);
        raw.scribble(&junk);
        // A sure violation too: the to-device avail index far ahead.
        raw.scribble(&[1, 2, 0, 2, 0x00, 0x80]);
        let deadline = tokio::time::Instant::now() + WAIT;
        while raw.attached() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ensure!(!raw.attached(), "round {round}: no reset");
        ensure!(
            (2..=4).contains(&raw.reset_reason()),
            "reason {}",
            raw.reset_reason()
        );
        resets += 1;
    }
    // Still alive, still serving its Unix socket.
    let admin = node.admin().await?;
    let info = admin.node_info().await?;
    ensure!(info.peer_id == node.peer_id);

    // A well-behaved front-end on the same channel gets the full API.
    raw.leave();
    let stop = CancellationToken::new();
    let (pump, connector) = p2pvm_channel::driver(ep.region.clone(), ep.events()?);
    tokio::spawn(pump.run(stop.clone()));
    let app_socket = dir.path().join("front.sock");
    let listener = tokio::net::UnixListener::from_std(p2pvm_proto::socket::bind(&app_socket)?)?;
    tokio::spawn(guest_frontend::serve(listener, connector, stop.clone()));
    let client = guest_api::Client::builder()
        .socket(&app_socket)
        .token(node.admin_token())
        .name("after-the-storm")
        .no_reconnect()
        .connect()
        .await
        .context("API session through the channel after the resets")?;
    let through = client.node_info().await?;
    ensure!(
        through.peer_id == node.peer_id,
        "{resets} resets, then served"
    );
    stop.cancel();
    Ok(())
}
