//! An echo service built on an app-defined protocol.
//!
//! ```text
//! # serve:
//! P2PVM_TOKEN=... cargo run -p guest-api --example echo -- serve
//! # call, on another node:
//! P2PVM_TOKEN=... cargo run -p guest-api --example echo -- call <PEER_ID> "hello"
//! ```

use clap::{Parser, Subcommand};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROTOCOL: &str = "/example/echo/1.0.0";

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Echo every inbound stream back and advertise the "echo" service.
    Serve,
    /// Send a message to a peer's echo service and print the reply.
    Call {
        /// Peer id; omit to pick the first peer offering "echo".
        #[arg(long)]
        peer: Option<String>,
        /// Text to send.
        message: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = guest_api::Client::builder().name("echo").connect().await?;
    match args.cmd {
        Cmd::Serve => {
            let mut incoming = client.register_protocol(PROTOCOL).await?;
            client.advertise_service("echo").await?;
            eprintln!("echo service on {}", client.node_info().await?.peer_id);
            while let Some(stream) = incoming.next().await {
                eprintln!("stream from {}", stream.peer());
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(stream);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        }
        Cmd::Call { peer, message } => {
            let peer = match peer {
                Some(p) => p,
                None => client
                    .find_service("echo")
                    .await?
                    .into_iter()
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("nobody offers echo"))?,
            };
            let mut s = client.open_stream(&peer, PROTOCOL).await?;
            s.write_all(message.as_bytes()).await?;
            s.shutdown().await?;
            let mut reply = String::new();
            s.read_to_string(&mut reply).await?;
            println!("{reply}");
        }
    }
    Ok(())
}
