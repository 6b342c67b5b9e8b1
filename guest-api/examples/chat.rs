//! A pubsub chat on the shared node: lines from stdin go to a topic, messages
//! from the topic go to stdout.
//!
//! ```text
//! P2PVM_TOKEN=$(p2pctl app issue chat) cargo run -p guest-api --example chat -- --room lobby
//! ```
//! With `--say TEXT --count N` it publishes once and exits after N messages,
//! which is how the README's demo drives it.

use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, Parser)]
struct Args {
    /// Chat room (pubsub topic).
    #[arg(long, default_value = "lobby")]
    room: String,
    /// Publish this once (after peers joined) instead of reading stdin.
    #[arg(long)]
    say: Option<String>,
    /// Exit after receiving this many messages.
    #[arg(long)]
    count: Option<usize>,
    /// Seconds to wait for other chatters before saying something.
    #[arg(long, default_value_t = 20)]
    wait_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = guest_api::Client::builder().name("chat").connect().await?;
    let me = client.node_info().await?.peer_id;
    let mut messages = client.subscribe(&args.room).await?;
    client.advertise_service("chat").await?;
    eprintln!("[{me}] joined #{}", args.room);

    if let Some(text) = &args.say {
        // Find other chat nodes through the service registry and wait for the mesh.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_secs);
        while client.topic_peers(&args.room).await?.is_empty() {
            for peer in client.find_service("chat").await.unwrap_or_default() {
                if peer != me {
                    let _ = client.connect(&peer, [] as [&str; 0]).await;
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no other chatter found"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Give the gossip mesh one heartbeat to settle.
        tokio::time::sleep(Duration::from_millis(600)).await;
        client.publish(&args.room, text.clone()).await?;
    } else {
        let c = client.clone();
        let room = args.room.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Err(e) = c.publish(&room, line).await {
                    eprintln!("not sent: {e}");
                }
            }
        });
    }

    let mut seen = 0;
    while let Some(m) = messages.next().await {
        println!(
            "<{}> {}",
            short(&m.source),
            String::from_utf8_lossy(&m.data)
        );
        seen += 1;
        if args.count == Some(seen) {
            break;
        }
    }
    Ok(())
}

fn short(peer: &str) -> &str {
    &peer[peer.len().saturating_sub(8)..]
}
