//! p2pd configuration: a TOML file whose values command-line flags override.
//!
//! Every field has a default, so an empty file (or none) gives a working node
//! with its data under `~/.local/share/p2pvm`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_established: 512,
            max_established_per_peer: 4,
            max_pending: 128,
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
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if api.max_sessions == 0 || api.max_streams_per_session == 0 {
            return Err(ConfigError::Invalid(
                "api.max_sessions and api.max_streams_per_session must be positive".into(),
            ));
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
    fn tiny_frame_limit_is_invalid() {
        let c = Config::from_toml("[api]\nmax_frame_bytes = 10\n").unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
    }
}
