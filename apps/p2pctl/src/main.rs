//! `p2pctl`: every p2pvm API operation from the command line.
//!
//! Talks to the node's API socket like any app. Without `--token` it uses
//! `$P2PVM_TOKEN`, then the node's `admin.token` beside the socket when the
//! caller can read it (the operator's case).

#![forbid(unsafe_code)]

// glibc malloc returns freed buffers to the kernel and faults them back in:
// on the streaming paths that cost more than the copies themselves.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod compute;
mod content;
mod credit;
mod group;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use guest_api::{Client, proto};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Parser)]
#[command(version, about = "Command line over the p2pvm API")]
struct Cli {
    /// API socket (default: $P2PVM_API_SOCKET or ~/.local/share/p2pvm/api.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// App token (default: $P2PVM_TOKEN, then admin.token beside the socket).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Peer id, listen addresses, version.
    Info,
    /// Connected peers.
    Peers,
    /// Connect to a peer: multiaddrs ending in /p2p/<id>, or a bare peer id.
    Connect {
        /// Multiaddrs or a peer id.
        targets: Vec<String>,
    },
    /// Close all connections to a peer (admin).
    Disconnect {
        /// Peer id.
        peer: String,
    },
    /// Find a peer's addresses through the DHT.
    FindPeer {
        /// Peer id.
        peer: String,
    },
    /// DHT records and provider records.
    #[command(subcommand)]
    Dht(DhtCmd),
    /// Publish/subscribe messaging.
    #[command(subcommand)]
    Pubsub(PubsubCmd),
    /// App-defined protocol streams.
    #[command(subcommand)]
    Stream(StreamCmd),
    /// The service registry.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Print node events until interrupted.
    Events,
    /// App credentials (admin).
    #[command(subcommand)]
    App(AppCmd),
    /// Live sessions and what each owns (admin).
    Sessions,
    /// Publish a file or standard input as a content item.
    Publish(content::PublishArgs),
    /// Fetch an item: into FILE with -o, else into the node's store.
    Get {
        /// Content id.
        id: String,
        /// Write the verified bytes here.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write an item's verified bytes to standard output (pipe into a player).
    Cat {
        /// Content id.
        id: String,
        /// First byte.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to write (0 = to the end).
        #[arg(long, default_value_t = 0)]
        length: u64,
        /// Do not keep and seed the item afterwards.
        #[arg(long)]
        no_keep: bool,
    },
    /// Search items by keywords, or by content id.
    Search {
        /// Words (all must match) or a content id.
        query: Vec<String>,
        /// Most results.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Items in the node's store.
    Ls,
    /// What is known about one item.
    Stat {
        /// Content id.
        id: String,
    },
    /// Keep an item regardless of the store quota.
    Pin {
        /// Content id.
        id: String,
    },
    /// Let an item be garbage-collected again.
    Unpin {
        /// Content id.
        id: String,
    },
    /// Delete an item from the node's store (admin).
    Rm {
        /// Content id.
        id: String,
    },
    /// The peer credit ledger (admin).
    #[command(subcommand)]
    Credit(credit::CreditCmd),
    /// Trusted peer groups: create, invite, join, revoke, members, list.
    #[command(subcommand)]
    Group(group::GroupCmd),
    /// Compute leasing: offer this machine, run jobs on others, receipts
    /// and balance.
    #[command(subcommand)]
    Compute(compute::ComputeCmd),
    /// This command's own session as the node sees it (app name, admin or not).
    Session,
}

#[derive(Debug, Subcommand)]
enum DhtCmd {
    /// Store a value under a key.
    Put {
        /// Key (UTF-8).
        key: String,
        /// Value (UTF-8).
        value: String,
    },
    /// Fetch the value under a key.
    Get {
        /// Key (UTF-8).
        key: String,
    },
    /// Announce this node as a provider of a key.
    Provide {
        /// Key (UTF-8).
        key: String,
    },
    /// Find providers of a key.
    FindProviders {
        /// Key (UTF-8).
        key: String,
        /// Most results.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
enum PubsubCmd {
    /// Subscribe and print messages until interrupted (or --count).
    Sub {
        /// Topic.
        topic: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// The topic of this trusted group (name or id): members only.
        #[arg(long)]
        group: Option<String>,
    },
    /// Publish one message.
    Pub {
        /// Topic.
        topic: String,
        /// Message (UTF-8).
        message: String,
        /// The topic of this trusted group (name or id): members only.
        #[arg(long)]
        group: Option<String>,
    },
    /// Peers subscribed to a topic.
    Peers {
        /// Topic.
        topic: String,
    },
}

#[derive(Debug, Subcommand)]
enum StreamCmd {
    /// Open a stream: stdin goes to the peer, the peer's bytes to stdout.
    Open {
        /// Peer id.
        peer: String,
        /// Protocol, e.g. /echo/1.0.0.
        protocol: String,
    },
    /// Serve a protocol by echoing every inbound stream back.
    Echo {
        /// Protocol, e.g. /echo/1.0.0.
        protocol: String,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Advertise a service while this command runs.
    Advertise {
        /// Service name, e.g. chat.
        name: String,
    },
    /// Peers offering a service.
    Find {
        /// Service name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum AppCmd {
    /// Issue (or rotate) an app's token; prints it once.
    Issue {
        /// App name.
        app: String,
    },
    /// Revoke an app's token and end its sessions.
    Revoke {
        /// App name.
        app: String,
    },
    /// Apps holding tokens.
    List,
}

fn socket_path(cli: &Cli) -> PathBuf {
    cli.socket
        .clone()
        .or_else(|| std::env::var_os(guest_api::ENV_SOCKET).map(PathBuf::from))
        .unwrap_or_else(guest_api::default_socket_path)
}

fn token(cli: &Cli, socket: &std::path::Path) -> Result<String> {
    if let Some(t) = &cli.token {
        return Ok(t.clone());
    }
    if let Ok(t) = std::env::var(guest_api::ENV_TOKEN) {
        return Ok(t);
    }
    if let Some(f) = std::env::var_os(guest_api::ENV_TOKEN_FILE) {
        return std::fs::read_to_string(&f).with_context(|| format!("reading {f:?}"));
    }
    let admin = socket.with_file_name("admin.token");
    std::fs::read_to_string(&admin).with_context(|| {
        format!(
            "no token: pass --token, set {} or {}, or run as the node's operator ({} unreadable)",
            guest_api::ENV_TOKEN,
            guest_api::ENV_TOKEN_FILE,
            admin.display()
        )
    })
}

fn print(json_out: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
    use std::io::Write;
    let text = if json_out { value.to_string() } else { human() };
    if let Err(e) = writeln!(std::io::stdout().lock(), "{text}") {
        // A reader that stopped reading (`p2pctl publish F | head -1`) is
        // not an error of ours; anything else is said, not panicked.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("p2pctl: writing to stdout: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
}

fn peer_json(p: &proto::PeerInfo) -> serde_json::Value {
    let conns: Vec<_> = p
        .connections
        .iter()
        .map(|c| {
            json!({"remote_addr": c.remote_addr, "kind": c.kind, "transport": c.transport,
                        "outbound": c.outbound})
        })
        .collect();
    json!({"peer_id": p.peer_id, "addrs": p.addrs, "agent": p.agent_version, "rtt_us": p.rtt_micros,
           "content_streams": p.content_streams, "connections": conns})
}

/// A peer's connections in a table cell: kind/transport each, e.g.
/// `direct/quic relayed/relay`.
fn connections_column(conns: &[proto::ConnectionInfo]) -> String {
    let each: Vec<_> = conns
        .iter()
        .map(|c| format!("{}/{}", c.kind, c.transport))
        .collect();
    each.join(" ")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let socket = socket_path(&cli);
    let client = Client::builder()
        .socket(&socket)
        .token(token(&cli, &socket)?)
        .name("p2pctl")
        .no_reconnect()
        .connect()
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    run(&cli, &client).await
}

async fn run(cli: &Cli, c: &Client) -> Result<()> {
    let j = cli.json;
    match &cli.cmd {
        Cmd::Info => {
            let i = c.node_info().await?;
            print(
                j,
                json!({"peer_id": i.peer_id, "listen_addrs": i.listen_addrs, "version": i.version,
                       "protocol_version": i.protocol_version, "connected_peers": i.connected_peers,
                       "content_fast_path_port": i.content_fast_path_port,
                       "reachability": i.reachability, "external_addrs": i.external_addrs,
                       "relayed_addrs": i.relayed_addrs,
                       "content_memory": {"used_bytes": i.content_memory_used_bytes,
                                          "peak_bytes": i.content_memory_peak_bytes,
                                          "budget_bytes": i.content_memory_budget_bytes}}),
                || {
                    let mut s = format!(
                        "peer id:   {}\nversion:   {} (API v{})\npeers:     {}\nlistening:",
                        i.peer_id, i.version, i.protocol_version, i.connected_peers
                    );
                    for a in &i.listen_addrs {
                        s.push_str(&format!("\n  {a}/p2p/{}", i.peer_id));
                    }
                    s.push_str(&format!("\nreachability: {}", i.reachability));
                    for a in &i.external_addrs {
                        s.push_str(&format!("\n  external {a}/p2p/{}", i.peer_id));
                    }
                    for a in &i.relayed_addrs {
                        s.push_str(&format!("\n  relayed  {a}"));
                    }
                    match i.content_fast_path_port {
                        0 => s.push_str("\ncontent fast path: off"),
                        p => s.push_str(&format!("\ncontent fast path: TCP port {p}")),
                    }
                    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                    s.push_str(&format!(
                        "\nblock memory: {:.1} MiB in use, {:.1} MiB at most, budget {:.0} MiB",
                        mib(i.content_memory_used_bytes),
                        mib(i.content_memory_peak_bytes),
                        mib(i.content_memory_budget_bytes)
                    ));
                    s
                },
            );
        }
        Cmd::Peers => {
            let peers = c.peers().await?;
            print(
                j,
                json!(peers.iter().map(peer_json).collect::<Vec<_>>()),
                || {
                    let mut s = format!(
                        "{:<54} {:>9} {:>7}  {:<16} {}",
                        "PEER", "RTT(ms)", "SERVING", "CONNECTIONS", "AGENT"
                    );
                    for p in &peers {
                        s.push_str(&format!(
                            "\n{:<54} {:>9.2} {:>7}  {:<16} {}",
                            p.peer_id,
                            p.rtt_micros as f64 / 1000.0,
                            p.content_streams,
                            connections_column(&p.connections),
                            p.agent_version
                        ));
                    }
                    s
                },
            );
        }
        Cmd::Connect { targets } => {
            let (addrs, ids): (Vec<_>, Vec<_>) =
                targets.iter().cloned().partition(|t| t.starts_with('/'));
            let id = ids.first().cloned().unwrap_or_default();
            let peer = c.connect(&id, &addrs).await?;
            print(j, json!({"connected": peer}), || {
                format!("connected to {peer}")
            });
        }
        Cmd::Disconnect { peer } => {
            c.disconnect(peer).await?;
            print(j, json!({"disconnected": peer}), || {
                format!("disconnected {peer}")
            });
        }
        Cmd::FindPeer { peer } => {
            let p = c.find_peer(peer).await?;
            print(j, peer_json(&p), || {
                format!("{}\n  {}", p.peer_id, p.addrs.join("\n  "))
            });
        }
        Cmd::Dht(cmd) => dht(j, c, cmd).await?,
        Cmd::Pubsub(cmd) => pubsub(j, c, cmd).await?,
        Cmd::Stream(cmd) => stream(c, cmd).await?,
        Cmd::Service(ServiceCmd::Advertise { name }) => {
            c.advertise_service(name).await?;
            print(j, json!({"advertising": name}), || {
                format!("advertising {name:?}; Ctrl-C to withdraw")
            });
            tokio::signal::ctrl_c().await?;
        }
        Cmd::Service(ServiceCmd::Find { name }) => {
            let peers = c.find_service(name).await?;
            print(j, json!({"service": name, "peers": peers}), || {
                peers.join("\n")
            });
        }
        Cmd::Publish(a) => content::publish(j, c, a).await?,
        Cmd::Get { id, output } => content::get(j, c, id, output.as_ref()).await?,
        Cmd::Cat {
            id,
            offset,
            length,
            no_keep,
        } => content::cat(c, id, *offset, *length, *no_keep).await?,
        Cmd::Search { query, limit } => content::search(j, c, &query.join(" "), *limit).await?,
        Cmd::Ls => content::list(j, c).await?,
        Cmd::Stat { id } => content::stat(j, c, id).await?,
        Cmd::Pin { id } | Cmd::Unpin { id } => {
            let pinned = matches!(cli.cmd, Cmd::Pin { .. });
            c.pin_content(id, pinned).await?;
            print(j, json!({"content_id": id, "pinned": pinned}), || {
                format!("{} {id}", if pinned { "pinned" } else { "unpinned" })
            });
        }
        Cmd::Credit(cmd) => credit::run(j, c, cmd).await?,
        Cmd::Group(cmd) => group::run(j, c, cmd).await?,
        Cmd::Compute(cmd) => compute::run(j, c, cmd).await?,
        Cmd::Rm { id } => {
            c.delete_content(id).await?;
            print(j, json!({"deleted": id}), || format!("deleted {id}"));
        }
        Cmd::Events => {
            let mut events = c.events().await?;
            while let Some(e) = events.next().await {
                print(j, json!(format!("{e:?}")), || format!("{e:?}"));
            }
        }
        Cmd::App(AppCmd::Issue { app }) => {
            let t = c.issue_token(app).await?;
            print(j, json!({"app": app, "token": t}), || t.clone());
        }
        Cmd::App(AppCmd::Revoke { app }) => {
            c.revoke_app(app).await?;
            print(j, json!({"revoked": app}), || format!("revoked {app}"));
        }
        Cmd::App(AppCmd::List) => {
            let apps = c.list_apps().await?;
            print(j, json!(apps), || apps.join("\n"));
        }
        Cmd::Session => {
            let w = c.welcome();
            let s = c.session_state().await?;
            print(
                j,
                json!({"session": s.session_id, "app": s.app, "admin": w.admin,
                       "max_frame_bytes": w.max_frame_bytes, "stream_window_bytes": w.stream_window_bytes,
                       "max_streams": w.max_streams}),
                || {
                    format!(
                        "session {} of app {:?} (admin: {})",
                        s.session_id, s.app, w.admin
                    )
                },
            );
        }
        Cmd::Sessions => {
            let s = c.list_sessions().await?;
            let v: Vec<_> = s
                .iter()
                .map(|s| json!({"session": s.session_id, "app": s.app, "topics": s.topics,
                                "protocols": s.protocols, "services": s.services, "streams": s.streams}))
                .collect();
            print(j, json!(v), || {
                let mut out = format!(
                    "{:>7}  {:<16} {:<24} {:<24} {}",
                    "SESSION", "APP", "TOPICS", "PROTOCOLS", "STREAMS"
                );
                for s in &s {
                    out.push_str(&format!(
                        "\n{:>7}  {:<16} {:<24} {:<24} {}",
                        s.session_id,
                        s.app,
                        s.topics.join(","),
                        s.protocols.join(","),
                        s.streams.len()
                    ));
                }
                out
            });
        }
    }
    Ok(())
}

async fn dht(j: bool, c: &Client, cmd: &DhtCmd) -> Result<()> {
    match cmd {
        DhtCmd::Put { key, value } => {
            c.put_record(key.as_bytes(), value.as_bytes()).await?;
            print(j, json!({"stored": key}), || format!("stored {key}"));
        }
        DhtCmd::Get { key } => {
            let r = c.get_record(key.as_bytes()).await?;
            let v = String::from_utf8_lossy(&r.value).into_owned();
            print(
                j,
                json!({"key": key, "value": v, "publisher": r.publisher}),
                || v.clone(),
            );
        }
        DhtCmd::Provide { key } => {
            c.provide(key.as_bytes()).await?;
            print(j, json!({"providing": key}), || format!("providing {key}"));
        }
        DhtCmd::FindProviders { key, limit } => {
            let p = c.find_providers(key.as_bytes(), *limit).await?;
            print(j, json!(p), || p.join("\n"));
        }
    }
    Ok(())
}

async fn pubsub(j: bool, c: &Client, cmd: &PubsubCmd) -> Result<()> {
    match cmd {
        PubsubCmd::Sub {
            topic,
            count,
            group,
        } => {
            let topic = &topic_in(c, group.as_deref(), topic).await?;
            let mut msgs = c.subscribe(topic).await?;
            let mut n = 0;
            while let Some(m) = msgs.next().await {
                let text = String::from_utf8_lossy(&m.data).into_owned();
                print(
                    j,
                    json!({"topic": m.topic, "from": m.source, "data": text}),
                    || format!("[{}] {}: {}", m.topic, m.source, text),
                );
                n += 1;
                if Some(n) == *count {
                    break;
                }
            }
        }
        PubsubCmd::Pub {
            topic,
            message,
            group,
        } => {
            let topic = &topic_in(c, group.as_deref(), topic).await?;
            c.publish(topic, message.clone().into_bytes()).await?;
            print(j, json!({"published": topic}), || {
                format!("published to {topic}")
            });
        }
        PubsubCmd::Peers { topic } => {
            let p = c.topic_peers(topic).await?;
            print(j, json!(p), || p.join("\n"));
        }
    }
    Ok(())
}

/// `topic`, or the topic of that name of trusted group `group` (name or id).
async fn topic_in(c: &Client, group: Option<&str>, topic: &str) -> Result<String> {
    let Some(group) = group else {
        return Ok(topic.to_owned());
    };
    let groups = c.group_list().await?;
    if let Some(g) = groups.iter().find(|g| g.name == group || g.id == group) {
        return Ok(Client::group_topic(&g.id, topic));
    }
    // A group id this node is not a member of goes to the node, which
    // answers DRM_NOT_GROUP_MEMBER as for any non-member.
    if group.len() == 32 && group.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Client::group_topic(&group.to_ascii_lowercase(), topic));
    }
    anyhow::bail!(
        "DrmNotGroupMember: this node is not a member of a group named {group:?} \
         (p2pctl group list shows its groups; a group's id works too)"
    )
}

async fn stream(c: &Client, cmd: &StreamCmd) -> Result<()> {
    match cmd {
        StreamCmd::Open { peer, protocol } => {
            let s = c.open_stream(peer, protocol).await?;
            let (mut rd, mut wr) = tokio::io::split(s);
            let up = async {
                tokio::io::copy(&mut tokio::io::stdin(), &mut wr).await?;
                wr.shutdown().await
            };
            let down = async {
                let mut out = tokio::io::stdout();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = rd.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n]).await?;
                    out.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            };
            let (a, b) = tokio::join!(up, down);
            a?;
            b?;
        }
        StreamCmd::Echo { protocol } => {
            let mut incoming = c.register_protocol(protocol).await?;
            eprintln!("echoing {protocol}; Ctrl-C to stop");
            while let Some(s) = incoming.next().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(s);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        }
    }
    Ok(())
}
