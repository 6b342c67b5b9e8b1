//! The task that owns the swarm: it turns commands into swarm calls and swarm
//! events into replies and [`NodeEvent`]s.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::kad::{self, QueryId};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod addresses;
mod behaviours;
mod commands;
mod queries;
mod swarm;

use super::behaviour::{Behaviour, BehaviourEvent};
use super::handle::{
    COMMAND_QUEUE, Command, ConnectionSummary, EVENT_QUEUE, NodeError, NodeEvent, NodeHandle,
    NodeStatus, Paths, PeerSummary,
};
use super::punch_guard::Event as PunchEvent;
use super::reach::{Reach, relay_of};
use super::redial::Redial;
use super::relay_budget::RelayBudget;
use super::repunch::Repunch;
use crate::config::Config;
use crate::report::chain;
use libp2p::metrics::Recorder;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeStartError {
    /// Building a transport or behaviour failed.
    #[error("Cannot build the libp2p swarm")]
    Build(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A listen or bootstrap address is not a valid multiaddr.
    #[error("Invalid multiaddr {addr:?}")]
    BadAddr {
        /// The text.
        addr: String,
    },
    /// Listening failed.
    #[error("Cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: libp2p::TransportError<std::io::Error>,
    },
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// Most providers a lookup hands back, however many one DHT answer named.
const PROVIDERS_KEPT: usize = 64;

enum PendingQuery {
    GetRecord(Reply<kad::Record>),
    PutRecord(Reply<()>),
    Provide(Reply<()>),
    Providers {
        found: Vec<PeerId>,
        limit: usize,
        reply: Reply<Vec<PeerId>>,
    },
    FindPeer {
        target: PeerId,
        finding: Finding,
    },
    /// Public relays the DHT names, for a private node to reserve on.
    Relays,
    /// A private peer's signed peer record, when a lookup found no address.
    PeerRecord {
        target: PeerId,
        finding: Finding,
    },
    /// Our own peer record going into the DHT.
    PutPeerRecord,
}

/// One find-peer request, answered by whichever of its two lookups settles
/// it: the peer itself in the DHT (a public node), or its signed peer
/// record (a private node, which is no DHT server; servers may still hold
/// its LAN addresses from before it learnt that).
type Finding = std::sync::Arc<std::sync::Mutex<FindState>>;

#[derive(Default)]
struct FindState {
    reply: Option<Reply<PeerSummary>>,
    /// What the lookup of the peer found, once it ended.
    closest: Option<Vec<Multiaddr>>,
    /// The record lookup ended without the peer's own record.
    no_record: bool,
}

/// How often a private node looks after its relay reservations.
const RELAY_TICK: Duration = Duration::from_secs(5);

/// How often a private node short of relays asks the DHT for more.
const RELAY_SEARCH_EVERY: Duration = Duration::from_secs(60);

/// One open connection as the node keeps it.
#[derive(Debug, Clone)]
struct Conn {
    peer: PeerId,
    remote: Multiaddr,
    relayed: bool,
    /// Inbound from outside our network, on a listen address our router
    /// maps (UPnP).
    mapped: bool,
    outbound: bool,
}

/// A started node: its handle and the loop future to drive.
pub struct Node {
    handle: NodeHandle,
    event_loop: EventLoop,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.handle.peer_id)
            .finish()
    }
}

/// The system's resolver configuration; without one (no `/etc/resolv.conf`,
/// as in a minimal VM image) a resolver with no servers, so `/dns` addresses
/// fail to resolve instead of the node failing to start — and no query
/// leaks to a public resolver nobody chose.
fn resolver_config() -> (libp2p::dns::ResolverConfig, libp2p::dns::ResolverOpts) {
    match hickory_resolver::system_conf::read_system_conf() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %chain(&e), "no system DNS configuration: /dns addresses will not resolve");
            (
                libp2p::dns::ResolverConfig::from_name_servers(Vec::new()),
                libp2p::dns::ResolverOpts::default(),
            )
        }
    }
}

impl Node {
    /// Builds the swarm, starts listening and dials the bootstrap peers.
    /// libp2p's metrics (connections, bytes by transport, the protocols')
    /// are registered in `registry`.
    pub fn start(
        key: libp2p::identity::Keypair,
        config: &Config,
        registry: &mut libp2p::metrics::Registry,
    ) -> Result<Self, NodeStartError> {
        let keypair = key.clone();
        let build = NodeStartError::Build;
        let behaviour_config = config.clone();
        let relay_budget = RelayBudget::new(
            config.relay.max_bytes_per_hour,
            config.relay.max_circuit_bytes,
        );
        let behaviour_budget = relay_budget.clone();
        let (dns_config, dns_opts) = resolver_config();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_quic()
            // TCP with Noise and Yamux as libp2p's builder makes it, bounded
            // in time.
            .with_other_transport(
                |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                    use libp2p::Transport;
                    Ok(
                        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                            .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                            .authenticate(noise::Config::new(key)?)
                            .multiplex(yamux::Config::default())
                            .timeout(TCP_DIAL_TIMEOUT),
                    )
                },
            )
            .map_err(|e| build(e.into()))?
            .with_dns_config(dns_config, dns_opts)
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| build(e.into()))?
            .with_bandwidth_metrics(registry)
            .with_behaviour(|key, relay_client| {
                Behaviour::new(key, relay_client, &behaviour_config, &behaviour_budget)
            })
            .map_err(|e| build(e.into()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();

        for addr in &config.listen {
            let ma: Multiaddr = parse_addr(addr)?;
            swarm.listen_on(ma).map_err(|e| NodeStartError::Listen {
                addr: addr.clone(),
                source: e,
            })?;
        }
        let mut reach = Reach::new(if config.nat.use_relays {
            config.nat.relay_reservations as usize
        } else {
            0
        });
        for addr in &config.nat.external_addrs {
            // The operator vouches for it: advertised at once, as confirmed.
            let addr = parse_addr(addr)?;
            reach.declare(addr.clone());
            swarm.add_external_address(addr);
        }
        let mut bootstrap_peers = Vec::new();
        for addr in &config.bootstrap {
            let ma = parse_addr(addr)?;
            let Some(Protocol::P2p(peer)) = ma.iter().last() else {
                return Err(NodeStartError::BadAddr { addr: addr.clone() });
            };
            swarm.behaviour_mut().kad.add_address(&peer, ma.clone());
            if let Err(e) = swarm.dial(ma.clone()) {
                warn!(%peer, error = %chain(&e), "bootstrap dial failed");
            }
            bootstrap_peers.push((peer, ma));
        }
        if !bootstrap_peers.is_empty() {
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }

        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (event_tx, _) = broadcast::channel(EVENT_QUEUE);
        let status = std::sync::Arc::new(NodeStatus::default());
        let handle = NodeHandle {
            status: status.clone(),
            commands: cmd_tx,
            events: event_tx.clone(),
            peer_id: *swarm.local_peer_id(),
            stream_control: swarm.behaviour().stream.new_control(),
        };
        info!(peer_id = %handle.peer_id, "node started");
        Ok(Self {
            handle,
            event_loop: EventLoop {
                swarm,
                commands: cmd_rx,
                events: event_tx,
                queries: HashMap::new(),
                dials: HashMap::new(),
                dial_attempts: HashMap::new(),
                rtts: HashMap::new(),
                agents: HashMap::new(),
                addrs: HashMap::new(),
                conns: HashMap::new(),
                mapped: HashSet::new(),
                reach,
                redial: Redial::new(bootstrap_peers, Instant::now()),
                repunch: Repunch::default(),
                per_peer_limit: config.limits.max_established_per_peer as usize,
                serve_relay: config.relay.serve,
                relay_budget,
                metrics: libp2p::metrics::Metrics::new(registry),
                relay_announced: false,
                last_relay_search: None,
                circuit_limits: HashMap::new(),
                keypair,
                kad_client: false,
                published_record: Vec::new(),
                status,
            },
        })
    }

    /// The handle for API sessions.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Runs the event loop until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        self.event_loop.run(shutdown).await
    }
}

/// Longest a TCP dial may take, handshakes included. Without a bound, a dial
/// to an address behind a NAT that drops it unanswered takes the kernel's
/// two minutes of SYN retries; an AutoNAT server must answer within 10 s
/// that it could not dial back, or the asking node never learns it is
/// private.
const TCP_DIAL_TIMEOUT: Duration = Duration::from_secs(8);

fn parse_addr(addr: &str) -> Result<Multiaddr, NodeStartError> {
    addr.parse()
        .map_err(|_| NodeStartError::BadAddr { addr: addr.into() })
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<NodeEvent>,
    queries: HashMap<QueryId, PendingQuery>,
    dials: HashMap<PeerId, Vec<Reply<PeerId>>>,
    /// Dials started for API requests, by connection id.
    dial_attempts: HashMap<libp2p::swarm::ConnectionId, PeerId>,
    rtts: HashMap<PeerId, Duration>,
    agents: HashMap<PeerId, String>,
    /// Listen addresses peers announced through identify.
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Open connections.
    conns: HashMap<ConnectionId, Conn>,
    /// Listen addresses our router maps a port to (UPnP).
    mapped: HashSet<Multiaddr>,
    reach: Reach,
    /// Bootstrap peers to dial again when the node runs short of peers.
    redial: Redial,
    /// Peers reached only through a relay, to punch to again.
    repunch: Repunch,
    /// Connections we accept with one peer (`[limits]`): a new round of
    /// punching needs room for another relayed one and the direct one.
    per_peer_limit: usize,
    serve_relay: bool,
    /// The relay's total bandwidth cap.
    relay_budget: RelayBudget,
    /// libp2p's figures for `/metrics`.
    metrics: libp2p::metrics::Metrics,
    /// Whether this node announced itself in the DHT as a relay.
    relay_announced: bool,
    last_relay_search: Option<Instant>,
    /// Bytes one circuit carries, by relay (our circuits) or by the peer
    /// that opened a circuit to us.
    circuit_limits: HashMap<PeerId, u64>,
    /// Signs the peer record of a private node.
    keypair: libp2p::identity::Keypair,
    /// The DHT runs in client mode (this node is private).
    kad_client: bool,
    /// The relayed addresses last put in the DHT as our peer record.
    published_record: Vec<Multiaddr>,
    status: std::sync::Arc<NodeStatus>,
}

impl EventLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut relay_tick = tokio::time::interval(RELAY_TICK);
        relay_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = relay_tick.tick() => {
                    self.redial_bootstrap();
                    self.punch_again();
                    self.look_after_relays();
                }
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
            }
        }
        info!("node event loop stopped");
    }

    /// Counts a protocol's event in libp2p's metrics.
    fn record(&self, event: &BehaviourEvent) {
        match event {
            BehaviourEvent::Kad(e) => self.metrics.record(e),
            BehaviourEvent::Identify(e) => self.metrics.record(e),
            BehaviourEvent::Gossipsub(e) => self.metrics.record(e),
            BehaviourEvent::Ping(e) => self.metrics.record(e),
            BehaviourEvent::Relay(e) => self.metrics.record(e),
            BehaviourEvent::Dcutr(PunchEvent::Punch(e)) => self.metrics.record(e),
            _ => {}
        }
    }

    fn emit(&self, event: NodeEvent) {
        // No receivers is normal (no sessions); lagging receivers are told by broadcast.
        let _ = self.events.send(event);
    }

    fn summary(&self, peer_id: PeerId, mut addrs: Vec<Multiaddr>) -> PeerSummary {
        if addrs.is_empty() {
            addrs = self.addrs.get(&peer_id).cloned().unwrap_or_default();
        }
        let mut connections: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer == peer_id)
            .map(|(id, c)| (*id, c))
            .collect();
        connections.sort_by_key(|(id, _)| *id);
        PeerSummary {
            peer_id,
            addrs,
            agent_version: self.agents.get(&peer_id).cloned(),
            rtt: self.rtts.get(&peer_id).copied(),
            connections: connections
                .into_iter()
                .map(|(_, c)| ConnectionSummary {
                    remote: c.remote.clone(),
                    relayed: c.relayed,
                    mapped: c.mapped,
                    outbound: c.outbound,
                })
                .collect(),
        }
    }

    /// Remembers the bytes a circuit announced by `key` carries (none: no
    /// limit said, so none is assumed).
    fn circuit_limit(&mut self, key: PeerId, bytes: Option<u64>) {
        match bytes {
            Some(b) => self.circuit_limits.insert(key, b),
            None => self.circuit_limits.remove(&key),
        };
    }

    /// How we are connected to `peer`, with the limit the relays of its
    /// relayed connections put on a circuit.
    fn paths(&self, peer: &PeerId) -> Paths {
        let mut p = Paths::default();
        for c in self.conns.values().filter(|c| c.peer == *peer) {
            if !c.relayed {
                p.direct += 1;
                continue;
            }
            p.relayed += 1;
            let limit = relay_of(&c.remote)
                .and_then(|r| self.circuit_limits.get(&r))
                .or_else(|| self.circuit_limits.get(peer));
            if let Some(&l) = limit {
                p.circuit_bytes = Some(p.circuit_bytes.map_or(l, |m| m.min(l)));
            }
        }
        p
    }

    /// Whether we hold a direct (not relayed) connection to `peer`.
    fn has_direct(&self, peer: &PeerId) -> bool {
        self.conns.values().any(|c| c.peer == *peer && !c.relayed)
    }

    /// The remote address of the newest direct (not relayed) connection to
    /// `peer`: where it really is, and where its fast path listens.
    fn direct_remote(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer == *peer && !c.relayed)
            .max_by_key(|(id, _)| **id)
            .map(|(_, c)| c.remote.clone())
    }

    fn publish_status(&self) {
        *self.status.listen_addrs.write().expect("lock") =
            self.swarm.listeners().cloned().collect();
        self.status.connected_peers.store(
            self.swarm.connected_peers().count(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}
