//! The composed libp2p behaviour of a p2pd node.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, behaviour::toggle::Toggle};
use libp2p::{
    StreamProtocol, autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, ping, relay,
    upnp,
};

use crate::config::Config;

/// The DHT protocol name. A private name keeps p2pvm's DHT apart from the IPFS one,
/// whose records and provider semantics differ.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/p2pvm/kad/1.0.0");

/// Identify's protocol family string.
pub const IDENTIFY_PROTOCOL: &str = "/p2pvm/id/1.0.0";

/// Providers of one key a DHT record holder keeps and names.
pub const PROVIDERS_PER_KEY: usize = 256;

/// Largest pubsub message, matching what fits in one API frame with headroom.
pub const MAX_PUBSUB_BYTES: usize = 512 << 10;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub limits: connection_limits::Behaviour,
    pub pending_per_ip: super::pending_per_ip::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub stream: libp2p_stream::Behaviour,
    /// Asks peers to dial our candidate addresses back (AutoNAT v2).
    pub autonat: autonat::v2::client::Behaviour,
    /// Dials back the addresses peers ask about.
    pub autonat_server: autonat::v2::server::Behaviour,
    /// Relays for others once this node is confirmed public.
    pub relay: Toggle<relay::Behaviour>,
    /// Reservations on relays, and circuits through them.
    pub relay_client: super::relay_guard::RelayClient,
    /// Turns relayed connections into direct ones.
    pub dcutr: Toggle<super::punch_guard::PunchGuard>,
    /// Port mappings on the home router.
    pub upnp: Toggle<upnp::tokio::Behaviour>,
}

impl Behaviour {
    pub(crate) fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        config: &Config,
        relay_budget: &super::relay_budget::RelayBudget,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let peer_id = key.public().to_peer_id();
        let l = &config.limits;
        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(l.max_established))
                .with_max_established_per_peer(Some(l.max_established_per_peer))
                .with_max_pending_incoming(Some(l.max_pending))
                .with_max_pending_outgoing(Some(l.max_pending)),
        );
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(format!("p2pd/{}", env!("CARGO_PKG_VERSION")))
                // Peers learn a relayed address as soon as a reservation
                // gives it, not at the next periodic identify (minutes).
                .with_push_listen_addr_updates(true),
        );
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_query_timeout(config.kad_query_timeout())
            .set_periodic_bootstrap_interval(Some(config.kad_refresh()));
        // A record holder keeps (and names) up to this many providers of a
        // key. libp2p's default, 20, made every downloader of a 60-node
        // crowd find the same first 20 announcers and never learn of the
        // rest, whose blocks then did not spread.
        let store_config = kad::store::MemoryStoreConfig {
            max_providers_per_key: PROVIDERS_PER_KEY,
            ..Default::default()
        };
        let store = kad::store::MemoryStore::with_config(peer_id, store_config);
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        // Server mode from the start: nodes on loopback or a LAN never get the
        // confirmed external address that automatic mode waits for.
        kad.set_mode(Some(kad::Mode::Server));
        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_millis(500))
            .validation_mode(gossipsub::ValidationMode::Strict)
            .max_transmit_size(MAX_PUBSUB_BYTES + 4096)
            .build()?;
        let gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )?;
        let mdns = if config.mdns {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };
        Ok(Self {
            limits,
            pending_per_ip: super::pending_per_ip::Behaviour::new(l.max_pending_per_ip),
            identify,
            ping: ping::Behaviour::new(ping::Config::new()),
            kad,
            gossipsub,
            mdns: mdns.into(),
            stream: libp2p_stream::Behaviour::new(),
            autonat: autonat::v2::client::Behaviour::default(),
            autonat_server: autonat::v2::server::Behaviour::default(),
            relay: config
                .relay
                .serve
                .then(|| relay::Behaviour::new(peer_id, relay_config(&config.relay, relay_budget)))
                .into(),
            relay_client: super::relay_guard::RelayClient::new(relay_client),
            dcutr: config
                .nat
                .hole_punching
                .then(|| super::punch_guard::PunchGuard::new(dcutr::Behaviour::new(peer_id)))
                .into(),
            upnp: config.nat.upnp.then(upnp::tokio::Behaviour::default).into(),
        })
    }
}

/// The relay server's limits from the operator's. libp2p's rate limits on
/// reservations stay: per peer as they are (30, then one each 2 minutes),
/// per IP address with the operator's burst (one more each minute). The
/// total bandwidth cap is the last circuit limiter asked, so it counts only
/// circuits the others let through.
fn relay_config(
    c: &crate::config::RelayConfig,
    budget: &super::relay_budget::RelayBudget,
) -> relay::Config {
    let per_ip =
        std::num::NonZeroU32::new(c.reservations_per_ip).unwrap_or(std::num::NonZeroU32::MIN);
    let mut config = relay::Config {
        max_reservations: c.max_reservations as usize,
        max_reservations_per_peer: c.max_reservations_per_peer as usize,
        max_circuits: c.max_circuits as usize,
        max_circuits_per_peer: c.max_circuits_per_peer as usize,
        max_circuit_duration: Duration::from_secs(c.max_circuit_secs),
        max_circuit_bytes: c.max_circuit_bytes,
        reservation_rate_limiters: Vec::new(),
        ..relay::Config::default()
    }
    .reservation_rate_per_peer(
        std::num::NonZeroU32::new(30).expect("30 > 0"),
        Duration::from_secs(120),
    )
    .reservation_rate_per_ip(per_ip, Duration::from_secs(60));
    config.circuit_src_rate_limiters.push(budget.limiter());
    config
}

/// The DHT key under which public relays are providers: how a private node
/// finds relays beyond its bootstrap peers.
pub fn relay_key() -> kad::RecordKey {
    service_key("p2pvm/relay")
}

/// The DHT key of a private node's signed peer record (its relayed
/// addresses): how others find a node that is not a DHT server.
pub fn peer_record_key(peer: &libp2p::PeerId) -> kad::RecordKey {
    let mut text = b"p2pvm/peer/v1/".to_vec();
    text.extend_from_slice(&peer.to_bytes());
    kad::RecordKey::new(&blake3::hash(&text).as_bytes())
}

/// The DHT key under which peers offering the named service are providers.
pub fn service_key(name: &str) -> kad::RecordKey {
    let digest = blake3::hash(format!("p2pvm/service/v1/{name}").as_bytes());
    kad::RecordKey::new(&digest.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::kad::store::RecordStore;

    #[test]
    fn the_dht_names_every_provider_of_a_crowd() {
        // UPnP's gateway search needs a runtime; this test has none.
        let mut config = Config {
            mdns: false,
            ..Config::default()
        };
        config.nat.upnp = false;
        let key = Keypair::generate_ed25519();
        let (_, relay_client) = relay::client::new(key.public().to_peer_id());
        let budget = crate::node::relay_budget::RelayBudget::new(1 << 30, 1 << 20);
        let mut b = Behaviour::new(&key, relay_client, &config, &budget).expect("behaviour");
        let key = service_key("crowd");
        let crowd = 60;
        for _ in 0..crowd {
            let peer = libp2p::PeerId::random();
            let record = kad::ProviderRecord::new(key.clone(), peer, Vec::new());
            b.kad.store_mut().add_provider(record).expect("stored");
        }
        assert_eq!(b.kad.store_mut().providers(&key).len(), crowd);
    }
}
