//! The cloneable handle API sessions use to drive the node.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId, kad};
use tokio::sync::{broadcast, mpsc, oneshot};

/// A libp2p error kept as the source of ours; shared, as one failure may
/// answer several waiters.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync>;

/// Why a node operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    /// The node is shutting down.
    #[error("Node is shutting down")]
    Stopped,
    /// Dialling failed.
    #[error("Cannot connect")]
    Dial(#[source] Cause),
    /// The operation did not finish in time.
    #[error("Timed out")]
    Timeout,
    /// Nothing was found.
    #[error("Not found")]
    NotFound,
    /// The DHT could not store the record or provider entry on any peer.
    #[error("DHT")]
    Dht(#[source] Cause),
    /// Pubsub refused the message or the subscription.
    #[error("Pubsub")]
    Pubsub(#[source] Cause),
    /// Nobody subscribes to the topic yet (gossipsub has no peer to send to).
    #[error("Pubsub: no peer is subscribed to this topic yet")]
    NoSubscribers,
    /// The node is saturated (e.g. every peer's pubsub send queue is full); retry shortly.
    #[error("Busy: {0}")]
    Busy(String),
    /// A caller-supplied value is invalid.
    #[error("Invalid argument: {0}")]
    Invalid(String),
}

/// A connected peer as the node sees it.
#[derive(Debug, Clone)]
pub struct PeerSummary {
    /// Its id.
    pub peer_id: PeerId,
    /// Addresses of open connections.
    pub addrs: Vec<Multiaddr>,
    /// Agent from identify.
    pub agent_version: Option<String>,
    /// Last ping round trip.
    pub rtt: Option<Duration>,
    /// Its open connections, oldest first.
    pub connections: Vec<ConnectionSummary>,
}

/// One open connection to a peer.
#[derive(Debug, Clone)]
pub struct ConnectionSummary {
    /// The peer's address on it (through the relay, for a relayed one).
    pub remote: Multiaddr,
    /// Through a relay's circuit rather than direct.
    pub relayed: bool,
    /// The peer came in through a port our router maps for us (UPnP).
    pub mapped: bool,
    /// We dialled it.
    pub outbound: bool,
}

/// How the node is connected to one peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Paths {
    /// Direct connections.
    pub direct: usize,
    /// Connections through relays' circuits.
    pub relayed: usize,
    /// The fewest bytes one of those circuits carries, where the relay said.
    pub circuit_bytes: Option<u64>,
}

/// Whether peers can reach this node, and at which addresses.
#[derive(Debug, Clone, Default)]
pub struct ReachStatus {
    /// Public, private or not known yet.
    pub reachability: super::Reachability,
    /// Confirmed addresses peers dial directly.
    pub external: Vec<Multiaddr>,
    /// Addresses through relays that hold a reservation of ours.
    pub relayed: Vec<Multiaddr>,
    /// Relays holding an accepted reservation.
    pub relays: usize,
}

/// A pubsub message received by the node.
#[derive(Debug, Clone)]
pub struct PubsubMessage {
    /// Topic string.
    pub topic: String,
    /// Payload.
    pub data: bytes::Bytes,
    /// Original publisher.
    pub source: Option<PeerId>,
    /// Neighbour that forwarded it.
    pub via: PeerId,
    /// Gossipsub message id.
    pub message_id: Vec<u8>,
}

/// What the node tells every session about.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// First connection to a peer established.
    PeerConnected {
        /// Who.
        peer_id: PeerId,
        /// Address of that connection.
        addr: Multiaddr,
    },
    /// Last connection to a peer closed.
    PeerDisconnected {
        /// Who.
        peer_id: PeerId,
    },
    /// A peer asked this node for more than its limits allow: relay
    /// reservations or circuits over the operator's limits, or hole punch
    /// after hole punch.
    OverLimits {
        /// Who asked.
        peer_id: PeerId,
    },
    /// A pubsub message on a topic this node is subscribed to.
    Pubsub(PubsubMessage),
    /// The node listens on a new address.
    NewListenAddr(Multiaddr),
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// A request to the event loop.
#[derive(Debug)]
pub enum Command {
    /// Connected peers.
    Peers(Reply<Vec<PeerSummary>>),
    /// Dial a peer by id and/or addresses.
    Connect {
        /// Target id, if known.
        peer: Option<PeerId>,
        /// Addresses to try.
        addrs: Vec<Multiaddr>,
        /// Answer once connected.
        reply: Reply<PeerId>,
    },
    /// Close all connections to a peer.
    Disconnect(PeerId, Reply<()>),
    /// The remote address of the newest open connection to a peer (where it
    /// really is, unlike the addresses it announces).
    RemoteAddr(PeerId, Reply<Option<Multiaddr>>),
    /// How the node is connected to a peer.
    Paths(PeerId, Reply<Paths>),
    /// Find a peer's addresses through the DHT.
    FindPeer(PeerId, Reply<PeerSummary>),
    /// Store a record in the DHT.
    PutRecord(kad::Record, Reply<()>),
    /// Fetch a record from the DHT.
    GetRecord(kad::RecordKey, Reply<kad::Record>),
    /// Announce this node as a provider of a key.
    Provide(kad::RecordKey, Reply<()>),
    /// Announce as a provider without waiting for the DHT to acknowledge.
    Announce(kad::RecordKey),
    /// Stop announcing.
    StopProviding(kad::RecordKey),
    /// Find providers of a key.
    FindProviders {
        /// Key.
        key: kad::RecordKey,
        /// Stop once at least this many are known; the answer may hold more
        /// (all that one DHT reply named), for the caller to rank.
        limit: usize,
        /// Answer.
        reply: Reply<Vec<PeerId>>,
    },
    /// Join a pubsub topic.
    Subscribe(String, Reply<()>),
    /// Leave a pubsub topic.
    Unsubscribe(String),
    /// Publish on a topic.
    Publish(String, bytes::Bytes, Reply<()>),
    /// Peers in the mesh or subscribed to a topic.
    TopicPeers(String, Reply<Vec<PeerId>>),
}

/// Capacity of the command queue: enough for every session's in-flight requests
/// to queue briefly, small enough that a flood shows up as back-pressure.
pub(crate) const COMMAND_QUEUE: usize = 1024;

/// Capacity of the event broadcast; a session that falls this far behind is told
/// how many events it lost.
pub(crate) const EVENT_QUEUE: usize = 4096;

/// Facts the event loop publishes for lock-cheap reads, so the most frequent
/// request (node info) never queues behind swarm work.
#[derive(Debug, Default)]
pub(crate) struct NodeStatus {
    pub listen_addrs: std::sync::RwLock<Vec<Multiaddr>>,
    pub connected_peers: std::sync::atomic::AtomicUsize,
    pub reach: std::sync::RwLock<ReachStatus>,
}

/// A cloneable handle to the node's event loop.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) events: broadcast::Sender<NodeEvent>,
    pub(crate) peer_id: PeerId,
    pub(crate) stream_control: libp2p_stream::Control,
    pub(crate) status: std::sync::Arc<NodeStatus>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Listen addresses and the number of connected peers, as of now.
    pub fn status(&self) -> (Vec<Multiaddr>, usize) {
        let addrs = self.status.listen_addrs.read().expect("lock").clone();
        let n = self
            .status
            .connected_peers
            .load(std::sync::atomic::Ordering::Relaxed);
        (addrs, n)
    }

    /// Reachability and external addresses, as of now.
    pub fn reach(&self) -> ReachStatus {
        self.status.reach.read().expect("lock").clone()
    }

    /// A new receiver of node events.
    pub fn subscribe_events(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// A control for app-defined protocol streams.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.stream_control.clone()
    }

    /// Sends a command built around a fresh reply channel and awaits the answer.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Like [`call`](Self::call) with an upper bound on the wait.
    pub async fn call_timeout<T>(
        &self,
        timeout: Duration,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, NodeError> {
        tokio::time::timeout(timeout, self.call(make))
            .await
            .map_err(|_| NodeError::Timeout)?
    }

    /// Fire-and-forget commands (no reply).
    pub async fn send(&self, cmd: Command) -> Result<(), NodeError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| NodeError::Stopped)
    }
}
