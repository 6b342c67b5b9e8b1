//! The task that owns the swarm: it turns commands into swarm calls and swarm
//! events into replies and [`NodeEvent`]s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::kad::{self, QueryId, QueryResult};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, gossipsub, identify, mdns, noise, ping, relay, tcp,
    upnp, yamux,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::behaviour::{
    Behaviour, BehaviourEvent, KAD_PROTOCOL, MAX_PUBSUB_BYTES, peer_record_key, relay_key,
};
use super::handle::{
    COMMAND_QUEUE, Cause, Command, ConnectionSummary, EVENT_QUEUE, NodeError, NodeEvent,
    NodeHandle, NodeStatus, Paths, PeerSummary, PubsubMessage, ReachStatus,
};
use super::punch_guard::Event as PunchEvent;
use super::reach::{
    Reach, Reachability, addrs_from_record, ip_of, is_local, is_loopback, is_relayed, relay_of,
    signed_peer_record,
};
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

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Peers(reply) => {
                let peers = self
                    .swarm
                    .connected_peers()
                    .copied()
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|p| self.summary(p, Vec::new()))
                    .collect();
                let _ = reply.send(Ok(peers));
            }
            Command::Connect { peer, addrs, reply } => self.connect(peer, addrs, reply),
            Command::Paths(peer, reply) => {
                let _ = reply.send(Ok(self.paths(&peer)));
            }
            Command::RemoteAddr(peer, reply) => {
                let _ = reply.send(Ok(self.direct_remote(&peer)));
            }
            Command::Disconnect(peer, reply) => {
                self.redial.hold(&peer, Instant::now());
                let r = self
                    .swarm
                    .disconnect_peer_id(peer)
                    .map_err(|_| NodeError::NotFound);
                let _ = reply.send(r);
            }
            Command::FindPeer(target, reply) => {
                if self.swarm.is_connected(&target) {
                    let _ = reply.send(Ok(self.summary(target, Vec::new())));
                } else {
                    let finding = Finding::new(std::sync::Mutex::new(FindState {
                        reply: Some(reply),
                        ..FindState::default()
                    }));
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    let closest = kad.get_closest_peers(target);
                    let record = kad.get_record(peer_record_key(&target));
                    self.queries.insert(
                        closest,
                        PendingQuery::FindPeer {
                            target,
                            finding: finding.clone(),
                        },
                    );
                    self.queries
                        .insert(record, PendingQuery::PeerRecord { target, finding });
                }
            }
            Command::PutRecord(record, reply) => {
                match self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .put_record(record, kad::Quorum::One)
                {
                    Ok(id) => {
                        self.queries.insert(id, PendingQuery::PutRecord(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Dht(Arc::new(e))));
                    }
                }
            }
            Command::GetRecord(key, reply) => {
                let id = self.swarm.behaviour_mut().kad.get_record(key);
                self.queries.insert(id, PendingQuery::GetRecord(reply));
            }
            Command::Provide(key, reply) => {
                match self.swarm.behaviour_mut().kad.start_providing(key) {
                    Ok(id) => {
                        self.queries.insert(id, PendingQuery::Provide(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Dht(Arc::new(e))));
                    }
                }
            }
            Command::Announce(key) => {
                if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                    warn!(error = ?e, "cannot store provider record");
                }
            }
            Command::StopProviding(key) => self.swarm.behaviour_mut().kad.stop_providing(&key),
            Command::FindProviders { key, limit, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.queries.insert(
                    id,
                    PendingQuery::Providers {
                        found: Vec::new(),
                        limit: limit.max(1),
                        reply,
                    },
                );
            }
            Command::Subscribe(topic, reply) => {
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&gossipsub::IdentTopic::new(topic))
                    .map(|_| ())
                    .map_err(|e| NodeError::Pubsub(Arc::new(e)));
                let _ = reply.send(r);
            }
            Command::Unsubscribe(topic) => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .unsubscribe(&gossipsub::IdentTopic::new(topic));
            }
            Command::Publish(topic, data, reply) => {
                let r = if data.len() > MAX_PUBSUB_BYTES {
                    Err(NodeError::Invalid(format!(
                        "pubsub message of {} bytes exceeds {MAX_PUBSUB_BYTES}",
                        data.len()
                    )))
                } else {
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(gossipsub::IdentTopic::new(topic), data.to_vec())
                        .map(|_| ())
                        .map_err(|e| match e {
                            gossipsub::PublishError::AllQueuesFull(n) => NodeError::Busy(format!(
                                "the send queues of all {n} peers are full; retry shortly"
                            )),
                            gossipsub::PublishError::NoPeersSubscribedToTopic => {
                                NodeError::NoSubscribers
                            }
                            e => NodeError::Pubsub(Arc::new(e)),
                        })
                };
                let _ = reply.send(r);
            }
            Command::TopicPeers(topic, reply) => {
                let hash = gossipsub::IdentTopic::new(topic).hash();
                let peers = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&hash))
                    .map(|(p, _)| *p)
                    .collect();
                let _ = reply.send(Ok(peers));
            }
        }
    }

    fn connect(&mut self, peer: Option<PeerId>, addrs: Vec<Multiaddr>, reply: Reply<PeerId>) {
        let peer = peer.or_else(|| {
            addrs.iter().find_map(|a| match a.iter().last() {
                Some(Protocol::P2p(p)) => Some(p),
                _ => None,
            })
        });
        let Some(peer) = peer else {
            let _ = reply.send(Err(NodeError::Invalid(
                "a peer id is needed (as peer_id or a /p2p/ suffix)".into(),
            )));
            return;
        };
        if peer == *self.swarm.local_peer_id() {
            let _ = reply.send(Err(NodeError::Invalid("cannot connect to self".into())));
            return;
        }
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(peer));
            return;
        }
        // Always dial ourselves, even when another dial to the peer is under way:
        // that one may be trying stale addresses while the caller knows fresh ones.
        // Our attempts are tracked by connection id, so a failure of someone
        // else's dial does not fail this request.
        let opts = DialOpts::peer_id(peer)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .addresses(addrs)
            .build();
        let connection = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dial_attempts.insert(connection, peer);
                self.dials.entry(peer).or_default().push(reply);
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::Dial(Arc::new(e))));
            }
        }
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

    /// Answers a find-peer request once (the other lookup may still end).
    fn answer(&self, f: &mut FindState, target: PeerId, addrs: Vec<Multiaddr>) {
        let Some(reply) = f.reply.take() else {
            return;
        };
        let r = if addrs.is_empty() && !self.swarm.is_connected(&target) {
            Err(NodeError::NotFound)
        } else {
            Ok(self.summary(target, addrs))
        };
        let _ = reply.send(r);
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

    /// Publishes reachability for node info, and acts on a change: a public
    /// node serving as a relay says so in the DHT; one no longer private
    /// drops its reservations.
    fn publish_reach(&mut self) {
        *self.status.reach.write().expect("lock") = ReachStatus {
            reachability: self.reach.reachability(),
            external: self.reach.external(),
            relayed: self.reach.relayed(),
            relays: self.reach.relays(),
        };
        let public = self.reach.reachability() == Reachability::Public;
        if public && self.serve_relay && !self.relay_announced {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(relay_key()) {
                warn!(error = ?e, "cannot announce this node as a relay");
            } else {
                info!("publicly reachable: serving as a relay");
                self.relay_announced = true;
            }
        }
        for listener in self.reach.surplus() {
            self.swarm.remove_listener(listener);
        }
        // A private node is no DHT server: peers would have to reach it
        // through relays for every query (a storm of circuits once many
        // private nodes share a relay). It is found by its signed peer
        // record instead, which names its relayed addresses.
        let private = self.reach.reachability() == Reachability::Private;
        if private != self.kad_client {
            self.kad_client = private;
            let mode = if private {
                kad::Mode::Client
            } else {
                kad::Mode::Server
            };
            info!(?mode, "DHT mode");
            self.swarm.behaviour_mut().kad.set_mode(Some(mode));
        }
        let relayed = self.reach.relayed();
        if private && !relayed.is_empty() && relayed != self.published_record {
            self.put_peer_record(relayed);
        }
    }

    /// Puts our signed peer record (relayed addresses) in the DHT.
    fn put_peer_record(&mut self, addrs: Vec<Multiaddr>) {
        let Some(value) = signed_peer_record(&self.keypair, addrs.clone()) else {
            return;
        };
        let key = peer_record_key(self.swarm.local_peer_id());
        let record = kad::Record::new(key, value);
        match self
            .swarm
            .behaviour_mut()
            .kad
            .put_record(record, kad::Quorum::One)
        {
            Ok(id) => {
                self.published_record = addrs;
                self.queries.insert(id, PendingQuery::PutPeerRecord);
            }
            Err(e) => warn!(error = ?e, "cannot store our peer record"),
        }
    }

    /// Keeps a private node's reservations: asks new relays for them, and the
    /// DHT for relays when it knows too few.
    fn look_after_relays(&mut self) {
        let now = Instant::now();
        // Our peer record, again if the last put failed.
        let relayed = self.reach.relayed();
        if self.kad_client && !relayed.is_empty() && relayed != self.published_record {
            self.put_peer_record(relayed);
        }
        for (relay, circuit) in self.reach.relays_to_ask(now) {
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    debug!(%relay, %circuit, "asking for a relay reservation");
                    self.reach.reserving(relay, listener);
                }
                Err(e) => warn!(%relay, %circuit, error = ?e, "cannot listen through relay"),
            }
        }
        let short =
            self.reach.reachability() == Reachability::Private && !self.reach.has_candidates();
        let searched_lately = self
            .last_relay_search
            .is_some_and(|t| now.duration_since(t) < RELAY_SEARCH_EVERY);
        if short && !searched_lately {
            self.last_relay_search = Some(now);
            let id = self.swarm.behaviour_mut().kad.get_providers(relay_key());
            self.queries.insert(id, PendingQuery::Relays);
        }
    }

    /// Dials the bootstrap peers again when the node has too few peers: how
    /// it gets back on the network after its line went down.
    fn redial_bootstrap(&mut self) {
        let swarm = &self.swarm;
        let connected = swarm.connected_peers().count();
        let due = self
            .redial
            .due(connected, |p| swarm.is_connected(p), Instant::now());
        for addr in due {
            info!(%addr, connected, "few peers: dialling a bootstrap peer again");
            if let Err(e) = self.swarm.dial(addr.clone()) {
                debug!(%addr, error = %chain(&e), "bootstrap redial failed");
            }
        }
    }

    /// Keeps [`Repunch`] told which peers we reach only through a relay we
    /// dialled.
    fn on_path(&mut self, peer: PeerId, endpoint: &libp2p::core::ConnectedPoint) {
        if !endpoint.is_relayed() {
            self.repunch.forget(&peer);
            return;
        }
        let direct = self.has_direct(&peer);
        if endpoint.is_dialer() && !direct && self.swarm.behaviour().dcutr.is_enabled() {
            let addr = endpoint.get_remote_address().clone();
            self.repunch.on_relayed_dialled(peer, addr, Instant::now());
        }
    }

    /// Dials again, through the relay, peers that a hole punch has not yet
    /// reached directly: a new relayed connection starts a new punch.
    fn punch_again(&mut self) {
        let (conns, limit) = (&self.conns, self.per_peer_limit);
        // Room for one more relayed connection and the direct one.
        let room = |peer: &PeerId| conns.values().filter(|c| c.peer == *peer).count() + 2 <= limit;
        for (peer, addr) in self.repunch.due(Instant::now(), room) {
            if self.has_direct(&peer) || !self.swarm.is_connected(&peer) {
                self.repunch.forget(&peer);
                continue;
            }
            info!(%peer, %addr, "no direct connection yet: punching again through the relay");
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(vec![addr])
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %chain(&e), "relayed redial for a punch failed");
            }
        }
    }

    /// Stops advertising addresses that no longer reach us (our address
    /// moved).
    fn expire_external(&mut self, stale: Vec<Multiaddr>) {
        if stale.is_empty() {
            return;
        }
        for addr in stale {
            info!(%addr, "our address moved: no longer advertising it");
            self.swarm.remove_external_address(&addr);
            self.reach.on_expired(&addr);
        }
        self.publish_reach();
    }

    /// Whether a confirmed address, if relayed, starts with an address its
    /// relay is known at (its announced listen addresses, or where we
    /// dialled it).
    fn names_its_relay(&self, addr: &Multiaddr) -> bool {
        if !is_relayed(addr) {
            return true;
        }
        let (Some(relay), Some(ip)) = (relay_of(addr), ip_of(addr)) else {
            return false;
        };
        let announced = self.addrs.get(&relay).into_iter().flatten();
        let dialled = self
            .conns
            .values()
            .filter(|c| c.peer == relay && !c.relayed);
        announced
            .chain(dialled.map(|c| &c.remote))
            .any(|a| ip_of(a) == Some(ip))
    }

    /// Where a relay candidate is dialled: the address of our own direct
    /// outbound connection to it if there is one (it worked), else the first
    /// routable address it announced.
    fn relay_addr(&self, peer: &PeerId, announced: &[Multiaddr]) -> Option<Multiaddr> {
        let dialled = self
            .conns
            .values()
            .find(|c| c.peer == *peer && c.outbound && !c.relayed)
            .map(|c| c.remote.clone());
        dialled.or_else(|| {
            announced
                .iter()
                .find(|a| !is_relayed(a) && !is_loopback(a))
                .cloned()
        })
    }

    fn publish_status(&self) {
        *self.status.listen_addrs.write().expect("lock") =
            self.swarm.listeners().cloned().collect();
        self.status.connected_peers.store(
            self.swarm.connected_peers().count(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        // Not address candidates: libp2p-metrics labels them by protocol
        // stack, and a peer chooses what it says it observed (one new label
        // per connection, for ever).
        if !matches!(
            event,
            SwarmEvent::NewExternalAddrCandidate { .. }
                | SwarmEvent::ExternalAddrConfirmed { .. }
                | SwarmEvent::ExternalAddrExpired { .. }
        ) {
            self.metrics.record(&event);
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.publish_status();
                self.emit(NodeEvent::NewListenAddr(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                info!(%address, "no longer listening");
                self.publish_status();
                let stale = self.reach.on_listen_expired(&address);
                self.expire_external(stale);
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                if let Some(relay) = self.reach.on_listener_closed(listener_id, Instant::now()) {
                    info!(%relay, "relay reservation ended");
                    self.publish_status();
                    self.publish_reach();
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } if !self.names_its_relay(&address) => {
                // Identify turns a peer's view of our relayed address into a
                // candidate on our own IP ("our IP/p2p/relay/p2p-circuit"),
                // which AutoNAT may then confirm: no relay is there.
                debug!(%address, "not a relay's address: not advertised");
                self.swarm.remove_external_address(&address);
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed");
                self.reach.on_confirmed(address);
                self.publish_reach();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                info!(%address, "external address expired");
                self.reach.on_expired(&address);
                self.publish_reach();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.dial_attempts.retain(|_, p| *p != peer_id);
                let remote = endpoint.get_remote_address().clone();
                let mapped = match &endpoint {
                    libp2p::core::ConnectedPoint::Listener { local_addr, .. } => {
                        !endpoint.is_relayed()
                            && self.mapped.contains(local_addr)
                            && ip_of(&remote).is_some_and(|ip| !is_local(ip))
                    }
                    libp2p::core::ConnectedPoint::Dialer { .. } => false,
                };
                self.conns.insert(
                    connection_id,
                    Conn {
                        peer: peer_id,
                        relayed: endpoint.is_relayed(),
                        mapped,
                        outbound: endpoint.is_dialer(),
                        remote,
                    },
                );
                for reply in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(peer_id));
                }
                self.redial.on_connected(&peer_id);
                self.on_path(peer_id, &endpoint);
                if num_established.get() == 1 {
                    debug!(%peer_id, "peer connected");
                    self.publish_status();
                    self.emit(NodeEvent::PeerConnected {
                        peer_id,
                        addr: endpoint.get_remote_address().clone(),
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.conns.remove(&connection_id);
                if num_established > 0 {
                    return;
                }
                debug!(%peer_id, "peer disconnected");
                self.publish_status();
                self.rtts.remove(&peer_id);
                self.addrs.remove(&peer_id);
                self.agents.remove(&peer_id);
                self.reach.remove_candidate(&peer_id);
                self.redial.on_disconnected(&peer_id, Instant::now());
                self.repunch.forget(&peer_id);
                self.emit(NodeEvent::PeerDisconnected { peer_id });
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                let Some(peer_id) = self.dial_attempts.remove(&connection_id) else {
                    return;
                };
                let ours_pending = self.dial_attempts.values().any(|p| *p == peer_id);
                if !ours_pending && !self.swarm.is_connected(&peer_id) {
                    let error: Cause = Arc::new(error);
                    for reply in self.dials.remove(&peer_id).unwrap_or_default() {
                        let _ = reply.send(Err(NodeError::Dial(error.clone())));
                    }
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        self.record(&event);
        match event {
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                self.agents.insert(peer_id, info.agent_version.clone());
                let direct = self.conns.get(&connection_id).is_some_and(|c| !c.relayed);
                if direct && !is_relayed(&info.observed_addr) {
                    let others = self
                        .conns
                        .iter()
                        .any(|(id, c)| c.peer == peer_id && !c.relayed && *id != connection_id);
                    let stale = self
                        .reach
                        .on_observed(peer_id, &info.observed_addr, !others);
                    self.expire_external(stale);
                }
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for addr in &info.listen_addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                } else {
                    // A peer that left the DHT's server role (it learnt it is
                    // private) leaves our routing table: kept, it would be
                    // handed to every lookup, each then dialling its LAN
                    // addresses until QUIC's handshake times out. Twenty
                    // such entries made every lookup outlive its timeout.
                    self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
                }
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    if let Some(addr) = self.relay_addr(&peer_id, &info.listen_addrs) {
                        self.reach.add_candidate(peer_id, addr);
                    }
                } else {
                    self.reach.remove_candidate(&peer_id);
                }
                self.addrs.insert(peer_id, info.listen_addrs);
            }
            BehaviourEvent::Autonat(autonat::v2::client::Event {
                tested_addr,
                server,
                result,
                ..
            }) => {
                match &result {
                    Ok(()) => info!(%tested_addr, %server, "AutoNAT: reachable"),
                    Err(e) => info!(%tested_addr, %server, error = %e, "AutoNAT: not reachable"),
                }
                // A dial-back through a relay says nothing of our own
                // reachability.
                if !is_relayed(&tested_addr) {
                    self.reach.on_probe(result.is_ok());
                }
                self.publish_reach();
                // A node that just learnt it is private asks for relays now,
                // not at the next tick.
                self.look_after_relays();
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                if !renewal {
                    info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                if let Some(listener) = self.reach.on_accepted(relay_peer_id) {
                    debug!(relay = %relay_peer_id, "public now: dropping the reservation");
                    self.swarm.remove_listener(listener);
                }
                self.publish_reach();
            }
            // The bandwidth cap admitted it, the relay did not: its share
            // is free again.
            BehaviourEvent::Relay(relay::Event::CircuitReqDenied {
                src_peer_id,
                status: relay::StatusCode::NoReservation,
                ..
            }) => self.relay_budget.refund(src_peer_id),
            BehaviourEvent::Relay(relay::Event::CircuitReqAccepted { src_peer_id, .. }) => {
                self.relay_budget.accepted(src_peer_id)
            }
            // Admitted, then the destination could not be reached: nothing
            // was relayed. (libp2p marks these events for removal; their
            // replacement is a log line.)
            #[allow(deprecated)]
            BehaviourEvent::Relay(
                relay::Event::CircuitReqOutboundConnectFailed { src_peer_id, .. }
                | relay::Event::CircuitReqAcceptFailed { src_peer_id, .. },
            ) => self.relay_budget.refund(src_peer_id),
            // The relay's own budget is spent: nothing the asker did.
            BehaviourEvent::Relay(relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status: relay::StatusCode::ResourceLimitExceeded,
            }) if self.relay_budget.took_refusal(src_peer_id) => {
                warn!(
                    src = %src_peer_id,
                    dst = %dst_peer_id,
                    "circuit refused: the relay's bandwidth cap for the hour is spent (relay.max_bytes_per_hour)"
                );
            }
            // Over the operator's limits (not, say, a circuit to a peer that
            // holds no reservation, which an honest dialler may ask for).
            BehaviourEvent::Relay(
                relay::Event::ReservationReqDenied {
                    src_peer_id,
                    status: relay::StatusCode::ResourceLimitExceeded,
                }
                | relay::Event::CircuitReqDenied {
                    src_peer_id,
                    status: relay::StatusCode::ResourceLimitExceeded,
                    ..
                },
            ) => {
                debug!(peer = %src_peer_id, "relay request over the limits refused");
                self.emit(NodeEvent::OverLimits {
                    peer_id: src_peer_id,
                });
            }
            BehaviourEvent::RelayClient(relay::client::Event::OutboundCircuitEstablished {
                relay_peer_id,
                limit,
            }) => {
                // Kept by relay: a relayed connection's address names it.
                self.circuit_limit(relay_peer_id, limit.and_then(|l| l.data_in_bytes()));
            }
            BehaviourEvent::RelayClient(relay::client::Event::InboundCircuitEstablished {
                src_peer_id,
                limit,
            }) => {
                // Kept by the peer at the other end: which relay carries an
                // inbound circuit is not said.
                self.circuit_limit(src_peer_id, limit.and_then(|l| l.data_in_bytes()));
            }
            BehaviourEvent::Dcutr(PunchEvent::Flood { peer, why }) => {
                warn!(%peer, why, "hole-punch flood: no hole punching with this peer for 10 minutes");
                self.emit(NodeEvent::OverLimits { peer_id: peer });
            }
            BehaviourEvent::Dcutr(PunchEvent::Punch(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(direct) => {
                    info!(peer = %remote_peer_id, "hole punched: direct connection");
                    // Everything moves to the direct connection: streams pick
                    // any open connection, and a relayed one is slow and
                    // limited by the relay's operator.
                    let relayed: Vec<_> = self
                        .conns
                        .iter()
                        .filter(|(id, c)| c.peer == remote_peer_id && c.relayed && **id != direct)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in relayed {
                        self.swarm.close_connection(id);
                    }
                }
                Err(e) => {
                    info!(peer = %remote_peer_id, error = %chain(&e), "hole punch failed; staying relayed")
                }
            },
            BehaviourEvent::Upnp(event) => match event {
                upnp::Event::NewExternalAddr {
                    external_addr,
                    local_addr,
                } => {
                    info!(%external_addr, %local_addr, "router mapped a port (UPnP)");
                    self.mapped.insert(local_addr);
                }
                upnp::Event::ExpiredExternalAddr {
                    external_addr,
                    local_addr,
                } => {
                    info!(%external_addr, "router port mapping expired (UPnP)");
                    self.mapped.remove(&local_addr);
                }
                upnp::Event::GatewayNotFound => debug!("no UPnP gateway"),
                upnp::Event::NonRoutableGateway => {
                    info!("the UPnP gateway is itself behind a NAT; its mappings are of no use")
                }
            },
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.rtts.insert(peer, rtt);
            }
            BehaviourEvent::Ping(ping::Event {
                result: Err(ping::Failure::Unsupported),
                ..
            }) => {}
            // Two pings in a row went unanswered (libp2p reports from the
            // second): the connection is dead, as a TCP connection through a
            // router that lost its address stays for many minutes otherwise
            // (rust-yamux, unlike Go's, has no keep-alive of its own).
            // Closing it lets streams, the DHT and relays use a live one.
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            }) => {
                info!(%peer, error = %chain(&e), "peer stopped answering pings: closing the connection");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.emit(NodeEvent::Pubsub(PubsubMessage {
                    topic: message.topic.into_string(),
                    data: message.data.into(),
                    source: message.source,
                    via: propagation_source,
                    message_id: message_id.0,
                }));
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => self.on_query(id, result, step.last),
            _ => {}
        }
    }

    fn on_query(&mut self, id: QueryId, result: QueryResult, last: bool) {
        let Some(pending) = self.queries.remove(&id) else {
            return;
        };
        match (pending, result) {
            (PendingQuery::GetRecord(reply), QueryResult::GetRecord(r)) => match r {
                Ok(kad::GetRecordOk::FoundRecord(found)) => {
                    let _ = reply.send(Ok(found.record));
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                }
                Ok(kad::GetRecordOk::FinishedWithNoAdditionalRecord { .. }) => {
                    let _ = reply.send(Err(NodeError::NotFound));
                }
                Err(kad::GetRecordError::Timeout { .. }) => {
                    let _ = reply.send(Err(NodeError::Timeout));
                }
                Err(_) => {
                    let _ = reply.send(Err(NodeError::NotFound));
                }
            },
            (PendingQuery::PutPeerRecord, QueryResult::PutRecord(r)) => {
                if let Err(e) = r {
                    // Put again at the next relay tick.
                    debug!(error = %chain(&e), "our peer record did not reach the DHT");
                    self.published_record.clear();
                }
            }
            (PendingQuery::PutRecord(reply), QueryResult::PutRecord(r)) => {
                let _ = reply.send(r.map(|_| ()).map_err(|e| NodeError::Dht(Arc::new(e))));
            }
            (PendingQuery::Provide(reply), QueryResult::StartProviding(r)) => {
                let _ = reply.send(r.map(|_| ()).map_err(|e| NodeError::Dht(Arc::new(e))));
            }
            (
                PendingQuery::Providers {
                    mut found,
                    limit,
                    reply,
                },
                QueryResult::GetProviders(r),
            ) => {
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r {
                    let known: HashSet<_> = found.iter().copied().collect();
                    found.extend(providers.into_iter().filter(|p| !known.contains(p)));
                }
                if found.len() >= limit || last {
                    // Everything found so far goes back, not just `limit`: one
                    // DHT answer often names several providers at once, and the
                    // caller ranks them (by credit) before it picks.
                    found.truncate(limit.max(PROVIDERS_KEPT));
                    let _ = reply.send(Ok(found));
                    if !last && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                } else {
                    self.queries.insert(
                        id,
                        PendingQuery::Providers {
                            found,
                            limit,
                            reply,
                        },
                    );
                }
            }
            (PendingQuery::Relays, QueryResult::GetProviders(r)) => {
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r {
                    let me = *self.swarm.local_peer_id();
                    for relay in providers.into_iter().filter(|p| *p != me) {
                        // Identify on the new connection tells whether it
                        // serves the hop protocol; dialling by id lets the
                        // DHT supply its addresses.
                        if !self.swarm.is_connected(&relay) {
                            let _ = self.swarm.dial(relay);
                        }
                    }
                }
                if !last {
                    self.queries.insert(id, PendingQuery::Relays);
                }
            }
            (PendingQuery::FindPeer { target, finding }, QueryResult::GetClosestPeers(r)) => {
                let peers = match r {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let addrs = peers
                    .into_iter()
                    .find(|p| p.peer_id == target)
                    .map(|h| h.addrs)
                    .unwrap_or_default();
                let mut f = finding.lock().expect("lock");
                let settled =
                    self.swarm.is_connected(&target) || addrs.iter().any(is_relayed) || f.no_record;
                if settled {
                    self.answer(&mut f, target, addrs);
                } else {
                    f.closest = Some(addrs);
                }
            }
            (PendingQuery::PeerRecord { target, finding }, QueryResult::GetRecord(r)) => {
                let record = match &r {
                    Ok(kad::GetRecordOk::FoundRecord(found)) => {
                        addrs_from_record(&found.record.value, &target)
                    }
                    _ => None,
                };
                let mut f = finding.lock().expect("lock");
                match record {
                    Some(addrs) => {
                        for a in &addrs {
                            self.swarm.add_peer_address(target, a.clone());
                        }
                        let mut all = addrs.clone();
                        let known = f.closest.take().unwrap_or_default();
                        all.extend(known.into_iter().filter(|a| !addrs.contains(a)));
                        self.answer(&mut f, target, all);
                        if !last && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
                        {
                            q.finish();
                        }
                    }
                    // Not the peer's own record (anyone may store one under
                    // its key): keep looking while the query runs.
                    None if !last && f.reply.is_some() => {
                        drop(f);
                        self.queries
                            .insert(id, PendingQuery::PeerRecord { target, finding });
                    }
                    None => {
                        f.no_record = true;
                        if let Some(known) = f.closest.take() {
                            self.answer(&mut f, target, known);
                        }
                    }
                }
            }
            (pending, other) => {
                // A query id is only ever paired with its own result type.
                warn!(?other, "unexpected DHT query result");
                drop(pending);
            }
        }
    }
}
