//! What serving as a relay costs (the reachable issue's benchmark): the
//! relay node's memory with `P2PVM_RELAY_RESERVATIONS` (1,000) reservations,
//! and its CPU seconds per GiB it relays, beside what the two ends of the
//! same transfer spend with and without the relay between them.
//!
//! The relay is a real `p2pd` on loopback (`[relay]` limits raised for the
//! run; its address declared, since libp2p serves the relay protocol only
//! on a confirmed address). The peers are minimal libp2p swarms in this
//! process (TCP, Noise, Yamux, the relay client, one stream protocol), so
//! that a thousand of them fit on one machine.
//!
//! Memory: the relay's resident set idle, with every client connected, and
//! with every client holding a reservation; per connection and per
//! reservation. Cost: `P2PVM_BENCH_MIB` (1024) MiB from one client to
//! another through a circuit, then between two fresh clients connected
//! directly; the relay's CPU seconds per GiB relayed, the ends' CPU seconds
//! per GiB both ways, and the ratio. Three rounds; nothing else should run.
//!
//! Run: `cargo build --release --bins && P2PVM_BIN_DIR=$CARGO_TARGET_DIR/release
//! cargo bench -p p2pvm-e2e --bench relay_cost`. Under `cargo test`, a smoke
//! run of 50 reservations and 16 MiB.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, relay, tcp, yamux};
use p2pvm_e2e::swarm::setting;
use p2pvm_e2e::{NodeOpts, TestNode, bench_size, cpu_secs, proc_status_kib};
use tokio::sync::{oneshot, watch};

const PROTOCOL: StreamProtocol = StreamProtocol::new("/p2pvm/bench/relay-cost/1");

/// Clients connecting to the relay at once (its pending-connection bounds
/// are raised above this for the run).
const CONNECTING_AT_ONCE: usize = 32;

#[derive(NetworkBehaviour)]
struct Peer {
    relay: relay::client::Behaviour,
    stream: libp2p_stream::Behaviour,
}

fn peer_swarm() -> Result<Swarm<Peer>> {
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|_, relay| Peer {
            relay,
            stream: libp2p_stream::Behaviour::new(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build())
}

/// The phases every idle client goes through together.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Connect,
    Reserve,
    Stop,
}

/// One client: connects to the relay, says so, reserves when told, says so,
/// and holds both until told to stop.
async fn client(
    relay: Multiaddr,
    relay_id: PeerId,
    mut phase: watch::Receiver<Phase>,
    connected: oneshot::Sender<Result<()>>,
    reserved: oneshot::Sender<Result<()>>,
) {
    let mut swarm = match peer_swarm() {
        Ok(s) => s,
        Err(e) => {
            let _ = connected.send(Err(e));
            return;
        }
    };
    if let Err(e) = swarm.dial(relay.clone()) {
        let _ = connected.send(Err(e.into()));
        return;
    }
    let mut connected = Some(connected);
    let mut reserved = Some(reserved);
    loop {
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Stop {
                    return;
                }
                if *phase.borrow() == Phase::Reserve {
                    let circuit = relay.clone().with(Protocol::P2pCircuit);
                    if let Err(e) = swarm.listen_on(circuit)
                        && let Some(r) = reserved.take()
                    {
                        let _ = r.send(Err(e.into()));
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == relay_id => {
                    if let Some(c) = connected.take() {
                        let _ = c.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    if let Some(c) = connected.take() {
                        let _ = c.send(Err(anyhow::anyhow!("dial: {error}")));
                    }
                }
                SwarmEvent::Behaviour(PeerEvent::Relay(
                    relay::client::Event::ReservationReqAccepted { .. },
                )) => {
                    if let Some(r) = reserved.take() {
                        let _ = r.send(Ok(()));
                    }
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    if let Some(r) = reserved.take() {
                        let _ = r.send(Err(anyhow::anyhow!("reservation refused: {reason:?}")));
                    }
                }
                _ => {}
            },
        }
    }
}

/// The relay's resident set, in KiB.
fn rss(relay: &TestNode) -> Result<u64> {
    proc_status_kib(relay.pid()?, "VmRSS")
}

/// Resident-set figures of the reservations part.
struct Memory {
    idle: u64,
    connected: u64,
    reserved: u64,
    reserve_cpu: f64,
}

async fn memory(relay: &TestNode, relay_addr: &Multiaddr, n: usize) -> Result<Memory> {
    let relay_id = relay.peer_id.parse::<PeerId>()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss(relay)?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let mut reserved_rx = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in 0..n {
        let (c_tx, c_rx) = oneshot::channel();
        let (r_tx, r_rx) = oneshot::channel();
        let addr = relay_addr.clone();
        tasks.push(tokio::spawn(client(
            addr,
            relay_id,
            phase_rx.clone(),
            c_tx,
            r_tx,
        )));
        reserved_rx.push(r_rx);
        pending.push(c_rx);
        if pending.len() == CONNECTING_AT_ONCE || i + 1 == n {
            for c in pending.drain(..) {
                tokio::time::timeout(Duration::from_secs(60), c)
                    .await
                    .context("a client's connection took over a minute")??
                    .context("a client could not connect")?;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = rss(relay)?;
    let cpu0 = cpu_secs(relay.pid()?)?;
    phase_tx.send(Phase::Reserve)?;
    let mut refused = 0;
    for r in reserved_rx {
        match tokio::time::timeout(Duration::from_secs(120), r).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                refused += 1;
                if refused == 1 {
                    eprintln!("first refusal: {e:#}");
                }
            }
            _ => bail!("a reservation got no answer within 2 minutes"),
        }
    }
    ensure!(refused == 0, "{refused} of {n} reservations refused");
    let reserve_cpu = cpu_secs(relay.pid()?)? - cpu0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reserved = rss(relay)?;
    phase_tx.send(Phase::Stop)?;
    for t in tasks {
        let _ = t.await;
    }
    Ok(Memory {
        idle,
        connected,
        reserved,
        reserve_cpu,
    })
}

/// A client swarm driven in its own task, with its stream control.
struct Driven {
    id: PeerId,
    control: libp2p_stream::Control,
    listening: Vec<Multiaddr>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Driven {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client that listens on `listen` (a circuit through the relay, or a TCP
/// address) and dials `dial`; returns once it listens.
async fn driven(listen: Multiaddr, dial: Option<Multiaddr>) -> Result<Driven> {
    let mut swarm = peer_swarm()?;
    let id = *swarm.local_peer_id();
    let control = swarm.behaviour().stream.new_control();
    swarm.listen_on(listen)?;
    if let Some(d) = dial {
        swarm.dial(d)?;
    }
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await
                && let Some(t) = tx.take()
            {
                let _ = t.send(address);
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .context("no listen address within 30 s")??;
    Ok(Driven {
        id,
        control,
        listening: vec![first],
        task,
    })
}

/// Moves `bytes` from `from` to `to` on one stream; the wall time.
async fn send(from: &Driven, to: &mut Driven, bytes: u64) -> Result<Duration> {
    let mut incoming = to
        .control
        .accept(PROTOCOL)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let reader = tokio::spawn(async move {
        let (_, mut s) = incoming.next().await.context("no stream")?;
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        anyhow::Ok(got)
    });
    let start = Instant::now();
    let mut control = from.control.clone();
    let mut s = control
        .open_stream(to.id, PROTOCOL)
        .await
        .map_err(|e| anyhow::anyhow!("open stream: {e}"))?;
    let chunk = vec![0x5au8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    s.close().await?;
    let got = reader.await??;
    ensure!(got == bytes, "{got} of {bytes} bytes arrived");
    Ok(start.elapsed())
}

/// One transfer's figures.
struct Moved {
    wall: Duration,
    /// This process's CPU seconds (both ends).
    ends_cpu: f64,
    /// The relay's (none for a direct transfer).
    relay_cpu: f64,
}

fn own_cpu() -> Result<f64> {
    cpu_secs(std::process::id())
}

async fn relayed(relay: &TestNode, relay_addr: &Multiaddr, bytes: u64) -> Result<Moved> {
    let circuit = relay_addr.clone().with(Protocol::P2pCircuit);
    let mut to = driven(circuit.clone(), None).await?;
    let via = circuit.with(Protocol::P2p(to.id));
    let from = driven("/ip4/127.0.0.1/tcp/0".parse()?, Some(via)).await?;
    // The dial through the circuit is under way; the stream waits for it.
    let (r0, e0) = (cpu_secs(relay.pid()?)?, own_cpu()?);
    let wall = send(&from, &mut to, bytes).await?;
    Ok(Moved {
        wall,
        ends_cpu: own_cpu()? - e0,
        relay_cpu: cpu_secs(relay.pid()?)? - r0,
    })
}

async fn direct(bytes: u64) -> Result<Moved> {
    let mut to = driven("/ip4/127.0.0.1/tcp/0".parse()?, None).await?;
    let at = to.listening[0].clone().with(Protocol::P2p(to.id));
    let from = driven("/ip4/127.0.0.1/tcp/0".parse()?, Some(at)).await?;
    let e0 = own_cpu()?;
    let wall = send(&from, &mut to, bytes).await?;
    Ok(Moved {
        wall,
        ends_cpu: own_cpu()? - e0,
        relay_cpu: 0.0,
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (full, mib) = bench_size(1024, 16);
    let n = if full {
        setting("P2PVM_RELAY_RESERVATIONS", 1000) as usize
    } else {
        50
    };
    let bytes = (mib as u64) << 20;
    let port = free_port()?;
    let declared = format!("/ip4/127.0.0.1/tcp/{port}");
    let config = format!(
        "[nat]\nexternal_addrs = [\"{declared}\"]\nupnp = false\n\
         [relay]\nmax_reservations = {}\nreservations_per_ip = {}\n\
         max_circuit_bytes = {}\nmax_bytes_per_hour = {}\nmax_circuit_secs = 3600\n\
         [limits]\nmax_established = {}\nmax_pending = 256\nmax_pending_per_ip = 256\n\
         [virus]\nenabled = false\n",
        n + 16,
        n + 16,
        bytes * 2,
        // Room for the measured circuit (and a spare) whatever its size.
        bytes * 8,
        n + 64,
    );
    let relay = TestNode::start(NodeOpts {
        config_toml: Some(config),
        tcp_port: Some(port),
        ..Default::default()
    })
    .await?;
    let relay_addr: Multiaddr = format!("{declared}/p2p/{}", relay.peer_id).parse()?;
    println!("relay_cost: a p2pd relay on loopback; {n} reservations; {mib} MiB per transfer");

    let m = memory(&relay, &relay_addr, n).await?;
    let kib = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
    println!(
        "memory: idle {} MiB, {n} connected {} MiB ({:.1} KiB each), {n} reserved {} MiB \
         ({:.1} KiB more each); reserving cost the relay {:.2} CPU s ({:.2} ms each)",
        m.idle >> 10,
        m.connected >> 10,
        kib(m.idle, m.connected),
        m.reserved >> 10,
        kib(m.connected, m.reserved),
        m.reserve_cpu,
        m.reserve_cpu * 1000.0 / n as f64,
    );

    let gib = bytes as f64 / f64::from(1u32 << 30);
    let rounds = if full { 3 } else { 1 };
    let (mut relay_per_gib, mut ratio) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let r = relayed(&relay, &relay_addr, bytes).await?;
        let d = direct(bytes).await?;
        let rate = |m: &Moved| mib as f64 / m.wall.as_secs_f64();
        println!(
            "round {round}: relayed {:.0} MiB/s, relay {:.2} CPU s/GiB, ends {:.2} CPU s/GiB; \
             direct {:.0} MiB/s, ends {:.2} CPU s/GiB; relay / direct ends {:.2}",
            rate(&r),
            r.relay_cpu / gib,
            r.ends_cpu / gib,
            rate(&d),
            d.ends_cpu / gib,
            r.relay_cpu / d.ends_cpu.max(1e-9),
        );
        relay_per_gib.push(r.relay_cpu / gib);
        ratio.push(r.relay_cpu / d.ends_cpu.max(1e-9));
    }
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.2}-{hi:.2}")
    };
    println!(
        "relay CPU per GiB relayed: {} s; relay / both ends of a direct transfer: {}",
        range(&relay_per_gib),
        range(&ratio)
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end: {}", load.trim());
    Ok(())
}
