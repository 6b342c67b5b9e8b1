//! p2pd configuration: a TOML file whose values command-line flags override.
//!
//! Every field has a default, so an empty file (or none) gives a working node
//! with its data under `~/.local/share/p2pvm`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most payload bytes a content fast-path connection may carry before it
/// is replaced (`content.fast_path_rotate_bytes` at most): half of what one
/// sealed-frame key may seal.
pub const MAX_ROTATE_BYTES: u64 = 1 << 35;
// A fast-path connection is replaced before either direction's key runs out.
const _: () = assert!(MAX_ROTATE_BYTES <= p2pvm_security::sealed::BYTES_PER_KEY / 2);

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("Invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("Invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration of one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the identity, app tokens and the lock file live.
    pub data_dir: PathBuf,
    /// The API's Unix socket; `None` means `<data_dir>/api.sock`.
    pub api_socket: Option<PathBuf>,
    /// The inter-VM channel's broker socket (set by `p2pvmm` in the sandbox
    /// backend): p2pd attaches as the channel's back-end and serves API
    /// sessions arriving over it, besides its Unix socket.
    pub channel_broker: Option<PathBuf>,
    /// The inter-VM channel's device, inside the service VM (VM backend):
    /// `auto` (the first channel function) or its sysfs directory. p2pd
    /// binds `uio_pci_generic` to it and serves the channel's back-end.
    pub channel_device: Option<String>,
    /// How the region BAR is mapped: `auto` (write-back `/dev/mem`, falling
    /// back to uncached sysfs), `devmem` or `sysfs`.
    pub channel_mapping: String,
    /// Multiaddrs to listen on (TCP and QUIC by default, all interfaces, random ports).
    pub listen: Vec<String>,
    /// Peers to bootstrap the DHT from, as multiaddrs ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// How often the DHT routing table is refreshed.
    pub kad_refresh_secs: u64,
    /// Upper bound on one DHT query.
    pub kad_query_timeout_secs: u64,
    /// Connection limits.
    pub limits: Limits,
    /// API limits.
    pub api: ApiLimits,
    /// Content sharing and streaming.
    pub content: ContentConfig,
    /// Peer credit: how fast evidence fades and where the policy bands lie.
    pub credit: CreditConfig,
    /// The virus filter.
    pub virus: VirusConfig,
    /// The DRM checker: trusted publisher CAs and certification policy.
    pub drm: DrmConfig,
    /// Compute leasing.
    pub compute: ComputeConfig,
    /// Getting through NATs: reachability, port mapping, relays, hole punching.
    pub nat: NatConfig,
    /// What this node, when publicly reachable, relays for others.
    pub relay: RelayConfig,
    /// Prometheus metrics (`GET /metrics`; see `docs/metrics.md`).
    pub metrics: MetricsConfig,
}

/// Where `/metrics` and the dashboard are served, if anywhere.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// The address to serve on: loopback, or a private address (the VM's
    /// side of its TAP); the figures carry no token. Off when unset.
    pub listen: Option<std::net::SocketAddr>,
    /// Whether the same address serves the operator's dashboard at `/`
    /// (behind the admin token; see `docs/dashboard.md`). Unset: only on a
    /// loopback address, since logging in sends the admin token over plain
    /// HTTP; set it `true` for a private address you trust the path to
    /// (the TAP between the host and the service VM).
    pub dashboard: Option<bool>,
    /// In VM mode, where `p2pvmm up --metrics` serves the VMs' states
    /// (`http://<the TAP's host side>:9101/vms.json`): the dashboard's VMs
    /// page. `http://` to a loopback or private address only.
    pub vms_url: Option<String>,
}

impl MetricsConfig {
    /// Whether the dashboard is served beside the figures.
    pub fn serves_dashboard(&self) -> bool {
        self.listen
            .is_some_and(|a| self.dashboard.unwrap_or(a.ip().is_loopback()))
    }
}

/// How the node gets through NATs (see `docs/network.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatConfig {
    /// Addresses the operator knows this node is reachable at (a server's
    /// public address, a port forwarded by hand): advertised from the start,
    /// as if confirmed. Everything else is advertised only once AutoNAT or
    /// the router confirms it.
    pub external_addrs: Vec<String>,
    /// Ask the home router to map our ports (UPnP IGD).
    pub upnp: bool,
    /// When not publicly reachable, hold reservations on relays and
    /// advertise the relayed addresses.
    pub use_relays: bool,
    /// Relays to hold reservations on at once.
    pub relay_reservations: u32,
    /// Upgrade relayed connections to direct ones (DCUtR hole punching).
    pub hole_punching: bool,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            external_addrs: Vec::new(),
            upnp: true,
            use_relays: true,
            relay_reservations: 2,
            hole_punching: true,
        }
    }
}

/// Limits on the circuit relay (v2) this node serves once it is publicly
/// reachable. Conservative by default: a relay is a rendezvous for hole
/// punching and a last resort, not a free transit network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Serve as a relay when publicly reachable.
    pub serve: bool,
    /// Reservations held for other peers at once.
    pub max_reservations: u32,
    /// Reservations one peer may hold.
    pub max_reservations_per_peer: u32,
    /// Circuits relayed at once.
    pub max_circuits: u32,
    /// Circuits one peer may have at once.
    pub max_circuits_per_peer: u32,
    /// Longest one circuit lives.
    pub max_circuit_secs: u64,
    /// Most bytes one circuit carries (both directions together).
    pub max_circuit_bytes: u64,
    /// The relay's total bandwidth cap: bytes relayed in any hour, over all
    /// circuits. Each circuit counts as `max_circuit_bytes` when it opens
    /// (libp2p's relay reports no byte counts), so a circuit that would take
    /// the hour over the cap is refused. 1 GiB by default: about 2.4 Mbit/s
    /// of an uplink on average, a thousand circuits an hour.
    pub max_bytes_per_hour: u64,
    /// Reservations one IP address may make in a burst; it may make one
    /// more each minute (libp2p's default, 60). Raise it for a relay that
    /// serves many peers behind one NAT (a campus, say).
    pub reservations_per_ip: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            serve: true,
            max_reservations: 128,
            max_reservations_per_peer: 4,
            max_circuits: 16,
            max_circuits_per_peer: 4,
            max_circuit_secs: 120,
            max_circuit_bytes: 1 << 20,
            max_bytes_per_hour: 1 << 30,
            reservations_per_ip: 60,
        }
    }
}

/// Compute leasing. What this node offers is set through the API
/// (`p2pctl compute offer`) and kept in the data directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeConfig {
    /// Credits this node's jobs may spend beyond what it has earned: a new
    /// job's budget must fit in allowance + balance - the budgets of its
    /// jobs still running. 1,000,000 by default: a million million fuel at
    /// a price of 1 per million, minutes of CPU on a few providers; 0 means
    /// this node spends only what it earned.
    pub allowance: u64,
    /// Fault injection for tests of result validation: as a provider, this
    /// node returns a wrong result for every job. Never set it elsewhere.
    pub test_wrong_results: bool,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            allowance: 1_000_000,
            test_wrong_results: false,
        }
    }
}

/// The DRM checker. Rights (expiry, redistribution, groups) are always
/// enforced; this says whom to trust as certifying publishers, and when to
/// require it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrmConfig {
    /// Publisher CA certificates (PEM or DER files) this node trusts.
    pub publisher_cas: Vec<PathBuf>,
    /// CRLs of those CAs (PEM or DER files): publisher certificates they
    /// list do not certify.
    pub publisher_crls: Vec<PathBuf>,
    /// Refuse items whose publisher is not certified by a trusted CA.
    pub require_certified: bool,
    /// ...or only items with any of these tags.
    pub require_certified_tags: Vec<String>,
    /// This node's own publisher chain (PEM: its certificate, then any
    /// intermediates), attached to every manifest it signs. The certificate
    /// must name this node's peer id (`urn:p2pvm:peer:<id>`).
    pub publisher_chain: Option<PathBuf>,
}

/// The virus filter: a ClamAV clamd that scans all content entering the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VirusConfig {
    /// Scan content. Off is for development only, and p2pd warns loudly.
    pub enabled: bool,
    /// clamd's Unix socket (Debian's default).
    pub clamd_socket: PathBuf,
    /// clamd's TCP address (host:port), used instead of the socket when set.
    pub clamd_tcp: Option<String>,
    /// How long a peer that sent malware stays banned.
    pub ban_hours: f64,
    /// clamd's signature database directory (its `DatabaseDirectory`). Read
    /// to tell when the signatures change: clean verdicts are cached per
    /// database, so an item scanned clean is not scanned again until it
    /// changes. Unreadable: nothing is cached.
    pub database_dir: PathBuf,
}

impl Default for VirusConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            clamd_socket: PathBuf::from("/run/clamav/clamd.ctl"),
            clamd_tcp: None,
            ban_hours: 24.0,
            database_dir: PathBuf::from("/var/lib/clamav"),
        }
    }
}

/// Peer credit policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreditConfig {
    /// Evidence halves every this many hours.
    pub half_life_hours: f64,
    /// Peers scoring below this (0-100) are throttled.
    pub throttle_below: u8,
    /// Peers scoring below this are refused.
    pub refuse_below: u8,
    /// What a throttled peer is served at, bytes per second.
    pub throttled_rate_bytes_per_sec: u64,
}

impl Default for CreditConfig {
    fn default() -> Self {
        Self {
            half_life_hours: 7.0 * 24.0,
            throttle_below: 30,
            refuse_below: 15,
            throttled_rate_bytes_per_sec: 1 << 20,
        }
    }
}

/// Content sharing: the store, serving and fetching.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContentConfig {
    /// Store size above which unpinned items are garbage-collected (0 = no quota).
    pub quota_bytes: u64,
    /// Upload rate cap for serving other peers, bytes per second (0 = none).
    pub upload_rate_bytes_per_sec: u64,
    /// Re-hash stored bytes when serving them, so local bit rot is caught before
    /// it is sent. Off by default: every receiver verifies every byte anyway, so
    /// a rotten disk costs this node its credit, never anyone wrong data; the
    /// re-hash costs as much CPU as the receiver's check. Turn it on for a disk
    /// you do not trust.
    pub verify_on_serve: bool,
    /// Peers this node sends blocks to at once (BitTorrent's unchoke
    /// slots). The others are told to ask again shortly: a flash crowd served
    /// all at once gets every block late, and a few served fast pass blocks
    /// on to the rest. Each holds its slot while it keeps asking, for 3 s
    /// turns while others wait. With `upload_rate_bytes_per_sec` set, fewer:
    /// as many as get a 256 KiB block a second each.
    pub upload_slots: u32,
    /// Block requests kept in flight per provider.
    pub pipeline_depth: u32,
    /// Providers fetched from at once.
    pub max_providers: u32,
    /// Blocks ahead of the playback position that are fetched in order.
    pub streaming_window_blocks: u32,
    /// Local HTTP gateway address (`GET /content/<id>`), e.g. "127.0.0.1:8080".
    /// Off when unset; only loopback addresses are accepted.
    pub gateway: Option<std::net::SocketAddr>,
    /// Announce what this node holds (published, downloaded and kept) in the
    /// DHT, by id and by keyword. Off: a private node whose items nobody
    /// finds or searches, served only to peers that ask it directly (such as
    /// the providers of its compute jobs, which fetch the module and input
    /// from the requester). It still finds others' items through the DHT.
    pub announce: bool,
    /// Let apps publish a file by path (host mode; the sandbox and VM cannot see
    /// the user's files anyway).
    pub allow_path_publish: bool,
    /// Give up on a transfer after this long without a verified block.
    pub stall_timeout_secs: u64,
    /// Largest item this node fetches (a peer's manifest could claim anything).
    pub max_item_bytes: u64,
    /// Carry blocks on a TLS 1.3 connection of their own beside libp2p where
    /// both ends can (several times faster); libp2p streams otherwise.
    pub fast_path: bool,
    /// Fast-path connections per provider, each with its own request
    /// pipeline: decryption and hashing of one connection run on one core at
    /// a time, so a second spreads a fast transfer over two (13 % more
    /// throughput on loopback here). At most 8.
    pub fast_path_connections: u32,
    /// Payload bytes a fast-path connection carries before the downloader
    /// replaces it with a fresh one (fresh keys): at most 32 GiB, half of
    /// what one key may seal, so a key never runs out mid-transfer.
    pub fast_path_rotate_bytes: u64,
    /// The fast path's TCP port, on the host of the first TCP listen address
    /// (0: any free port; set one to open it in a firewall).
    pub fast_path_port: u16,
    /// Memory for blocks in flight and blocks waiting in memory for readers,
    /// node-wide, shared fairly by the downloads running. The default leaves
    /// most of a 1-2 GiB service VM to clamd, the page cache and the rest.
    pub memory_budget_bytes: u64,
    /// Memory, node-wide, that readers of stored items (app fetches, the
    /// HTTP gateway) may read ahead of what their clients took. Beyond it a
    /// reader reads 64 KiB at a time as its client takes them, so readers
    /// that never read hold little (a few hundred KiB each) and one app
    /// cannot grow the node by opening many.
    pub read_ahead_bytes: u64,
    /// Fault injection for tests of timeouts: this node accepts content
    /// streams and never answers on them (a silent provider). Never set it
    /// elsewhere.
    pub test_silent_server: bool,
    /// Fault injection for tests of slow providers: this node waits this
    /// many seconds before it reads the first request of each content
    /// stream (a provider on a starved machine answers late, not never).
    /// Never set it elsewhere.
    pub test_answer_delay_secs: u64,
    /// Fault injection for tests of certificate expiry: the privacy
    /// controller (group memberships, CRLs, group sessions) reads the time
    /// as the system clock plus the seconds in this file, read at every
    /// check (missing or unreadable: 0), so a test moves the clock instead
    /// of waiting. Never set it elsewhere.
    pub test_clock_offset_file: Option<PathBuf>,
    /// Fault injection for tests of group topics: this node lies about
    /// topic keys (it hands out an altered epoch signature and seals its own
    /// group messages with a key of its own). Never set it elsewhere.
    pub test_wrong_group_keys: bool,
}

impl Default for ContentConfig {
    fn default() -> Self {
        Self {
            quota_bytes: 0,
            upload_rate_bytes_per_sec: 0,
            verify_on_serve: false,
            upload_slots: 8,
            pipeline_depth: 16,
            max_providers: 8,
            streaming_window_blocks: 16,
            gateway: None,
            announce: true,
            allow_path_publish: true,
            stall_timeout_secs: 30,
            max_item_bytes: 256 << 30,
            fast_path: true,
            fast_path_connections: 2,
            fast_path_rotate_bytes: MAX_ROTATE_BYTES,
            fast_path_port: 0,
            memory_budget_bytes: 256 << 20,
            read_ahead_bytes: 64 << 20,
            test_silent_server: false,
            test_answer_delay_secs: 0,
            test_clock_offset_file: None,
            test_wrong_group_keys: false,
        }
    }
}

/// Bounds on libp2p connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Established connections in total.
    pub max_established: u32,
    /// Established connections to one peer.
    pub max_established_per_peer: u32,
    /// Connections being negotiated at once.
    pub max_pending: u32,
    /// Inbound connections one address (an IPv6 /64) may have in their
    /// handshake at once, so that one host cannot hold every pending place.
    /// A handshake takes milliseconds, so even many peers behind one NAT
    /// rarely have more than one or two in flight.
    pub max_pending_per_ip: u32,
}

/// Bounds on the API, so one misbehaving app cannot exhaust the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiLimits {
    /// Sessions served at once, over all apps.
    pub max_sessions: u32,
    /// Open app streams per session.
    pub max_streams_per_session: u32,
    /// Largest frame accepted or sent.
    pub max_frame_bytes: u32,
    /// Initial per-stream window in each direction.
    pub stream_window_bytes: u32,
    /// Requests one session may have in flight.
    pub max_inflight_requests: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            api_socket: None,
            channel_broker: None,
            channel_device: None,
            channel_mapping: "auto".into(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".into(),
                "/ip4/0.0.0.0/udp/0/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            kad_refresh_secs: 300,
            kad_query_timeout_secs: 30,
            limits: Limits::default(),
            api: ApiLimits::default(),
            content: ContentConfig::default(),
            credit: CreditConfig::default(),
            virus: VirusConfig::default(),
            drm: DrmConfig::default(),
            compute: ComputeConfig::default(),
            nat: NatConfig::default(),
            relay: RelayConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_established: 512,
            max_established_per_peer: 4,
            max_pending: 128,
            max_pending_per_ip: 8,
        }
    }
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_sessions: 256,
            max_streams_per_session: 256,
            max_frame_bytes: p2pvm_proto::DEFAULT_MAX_FRAME_BYTES,
            stream_window_bytes: p2pvm_proto::DEFAULT_STREAM_WINDOW_BYTES,
            max_inflight_requests: 64,
        }
    }
}

/// `$XDG_DATA_HOME/p2pvm` or `~/.local/share/p2pvm`; `./p2pvm-data` when there is no home.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("p2pvm"))
        .unwrap_or_else(|| PathBuf::from("p2pvm-data"))
}

impl Config {
    /// Reads a TOML file; a missing file at the default location is not an error.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The API socket path in force.
    pub fn api_socket_path(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("api.sock"))
    }

    /// DHT refresh period.
    pub fn kad_refresh(&self) -> Duration {
        Duration::from_secs(self.kad_refresh_secs.max(1))
    }

    /// DHT query timeout.
    pub fn kad_query_timeout(&self) -> Duration {
        Duration::from_secs(self.kad_query_timeout_secs.max(1))
    }

    /// Checks values that serde cannot.
    /// Where the channel back-end gets its channel, if it serves one.
    pub fn channel_source(&self) -> Result<Option<p2pvm_channel::Source>, ConfigError> {
        let mapping = self
            .channel_mapping
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("channel_mapping: {e}")))?;
        match (&self.channel_broker, &self.channel_device) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "channel_broker and channel_device exclude each other".into(),
            )),
            (Some(b), None) => Ok(Some(p2pvm_channel::Source::Broker(b.clone()))),
            (None, Some(d)) => Ok(Some(p2pvm_channel::Source::device(d, mapping))),
            (None, None) => Ok(None),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.channel_source()?;
        let api = &self.api;
        if api.max_frame_bytes < p2pvm_proto::MIN_MAX_FRAME_BYTES {
            return Err(ConfigError::Invalid(format!(
                "api.max_frame_bytes must be at least {}",
                p2pvm_proto::MIN_MAX_FRAME_BYTES
            )));
        }
        if api.stream_window_bytes < p2pvm_proto::MAX_STREAM_CHUNK_BYTES as u32 {
            return Err(ConfigError::Invalid(format!(
                "api.stream_window_bytes must be at least {}",
                p2pvm_proto::MAX_STREAM_CHUNK_BYTES
            )));
        }
        if self.limits.max_pending_per_ip == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_pending_per_ip must be positive (0 would refuse every inbound connection)"
                    .into(),
            ));
        }
        if api.max_sessions == 0 || api.max_streams_per_session == 0 {
            return Err(ConfigError::Invalid(
                "api.max_sessions and api.max_streams_per_session must be positive".into(),
            ));
        }
        if self.credit.refuse_below > self.credit.throttle_below || self.credit.throttle_below > 100
        {
            return Err(ConfigError::Invalid(
                "credit: refuse_below <= throttle_below <= 100".into(),
            ));
        }
        let c = &self.content;
        if c.pipeline_depth == 0
            || c.max_providers == 0
            || c.streaming_window_blocks == 0
            || c.upload_slots == 0
        {
            return Err(ConfigError::Invalid(
                "content.pipeline_depth, max_providers, streaming_window_blocks and upload_slots must be positive"
                    .into(),
            ));
        }
        if c.memory_budget_bytes < 8 * p2pvm_content::BLOCK_BYTES {
            return Err(ConfigError::Invalid(format!(
                "content.memory_budget_bytes must be at least {} (8 blocks)",
                8 * p2pvm_content::BLOCK_BYTES
            )));
        }
        if !(1..=8).contains(&c.fast_path_connections) {
            return Err(ConfigError::Invalid(
                "content.fast_path_connections must be between 1 and 8".into(),
            ));
        }
        if c.fast_path_rotate_bytes == 0 || c.fast_path_rotate_bytes > MAX_ROTATE_BYTES {
            return Err(ConfigError::Invalid(format!(
                "content.fast_path_rotate_bytes must be between 1 and {}",
                MAX_ROTATE_BYTES
            )));
        }
        for a in &self.nat.external_addrs {
            if a.parse::<libp2p::Multiaddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "nat.external_addrs: {a:?} is not a multiaddr"
                )));
            }
        }
        let r = &self.relay;
        if r.max_circuit_secs == 0 || r.max_circuit_bytes == 0 {
            return Err(ConfigError::Invalid(
                "relay.max_circuit_secs and max_circuit_bytes must be positive (set relay.serve = false to relay nothing)"
                    .into(),
            ));
        }
        if let Some(u) = &self.metrics.vms_url
            && crate::dashboard::vms::parse_url(u).is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "metrics.vms_url must be http://<loopback or private address>:<port>/<path>, not {u:?}"
            )));
        }
        if let Some(m) = self.metrics.listen
            && !p2pvm_httpd::is_private(m.ip())
        {
            return Err(ConfigError::Invalid(format!(
                "metrics.listen must be a loopback or private address (the figures carry no token), not {m}"
            )));
        }
        if r.max_bytes_per_hour < r.max_circuit_bytes {
            return Err(ConfigError::Invalid(format!(
                "relay.max_bytes_per_hour ({}) is less than one circuit's max_circuit_bytes ({}): no circuit could open (set relay.serve = false to relay nothing)",
                r.max_bytes_per_hour, r.max_circuit_bytes
            )));
        }
        if let Some(g) = c.gateway
            && !g.ip().is_loopback()
        {
            return Err(ConfigError::Invalid(format!(
                "content.gateway must be a loopback address, not {g}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_gives_defaults() {
        let c = Config::from_toml("").unwrap();
        assert!(c.mdns);
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.api_socket_path(), c.data_dir.join("api.sock"));
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::from_toml("mdsn = false").is_err());
    }

    #[test]
    fn nested_values_override() {
        let c = Config::from_toml("mdns = false\n[api]\nmax_sessions = 3\n").unwrap();
        assert!(!c.mdns);
        assert_eq!(c.api.max_sessions, 3);
        assert_eq!(c.api.max_frame_bytes, p2pvm_proto::DEFAULT_MAX_FRAME_BYTES);
    }

    #[test]
    fn metrics_are_off_by_default_and_never_on_a_public_address() {
        assert!(Config::default().metrics.listen.is_none());
        assert!(!Config::default().metrics.serves_dashboard());
        let lan = Config::from_toml("[metrics]\nlisten = \"10.0.0.5:9100\"\n").unwrap();
        assert!(
            !lan.metrics.serves_dashboard(),
            "the token would cross a LAN in clear"
        );
        let tap =
            Config::from_toml("[metrics]\nlisten = \"10.0.0.5:9100\"\ndashboard = true\n").unwrap();
        assert!(tap.metrics.serves_dashboard());
        let local = Config::from_toml("[metrics]\nlisten = \"127.0.0.1:9100\"\n").unwrap();
        assert!(local.metrics.serves_dashboard());
        for bad in ["0.0.0.0:9464", "[::]:9464", "8.8.8.8:9464"] {
            let c = Config::from_toml(&format!("[metrics]\nlisten = \"{bad}\"\n")).unwrap();
            assert!(c.validate().is_err(), "{bad} accepted");
        }
        for good in ["127.0.0.1:9464", "10.99.0.2:9464", "[::1]:9464"] {
            let c = Config::from_toml(&format!("[metrics]\nlisten = \"{good}\"\n")).unwrap();
            assert!(c.validate().is_ok(), "{good} refused");
        }
    }

    #[test]
    fn gateway_must_be_loopback() {
        let c = Config::from_toml("[content]\ngateway = \"0.0.0.0:8080\"\n").unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
        let c = Config::from_toml("[content]\ngateway = \"127.0.0.1:8080\"\n").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn fast_path_connections_are_bounded() {
        for (n, ok) in [(0, false), (1, true), (8, true), (9, false)] {
            let c =
                Config::from_toml(&format!("[content]\nfast_path_connections = {n}\n")).unwrap();
            assert_eq!(c.validate().is_ok(), ok, "{n}");
        }
    }

    #[test]
    fn tiny_frame_limit_is_invalid() {
        let c = Config::from_toml("[api]\nmax_frame_bytes = 10\n").unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
    }
}
