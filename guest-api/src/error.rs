//! Client errors.

use p2pvm_proto::pb;

/// What can go wrong talking to the node.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No credential was given (builder, `P2PVM_TOKEN` or `P2PVM_TOKEN_FILE`).
    #[error("No app token: set P2PVM_TOKEN or P2PVM_TOKEN_FILE, or call ClientBuilder::token")]
    NoToken,
    /// The socket could not be reached.
    #[error("Cannot connect to {path}: {reason}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The session is down (the client is reconnecting, or gave up).
    #[error("Not connected to the node")]
    Disconnected,
    /// The node answered with an error.
    #[error("{code:?}: {message}")]
    Api {
        /// Wire error code.
        code: pb::ErrorCode,
        /// The node's explanation.
        message: String,
    },
    /// The node ended the session.
    #[error("Session closed by the node: {code:?}: {message}")]
    Closed {
        /// Why.
        code: pb::ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The node sent something this client does not understand.
    #[error("Unexpected reply from the node: {0}")]
    Protocol(String),
}

impl Error {
    pub(crate) fn from_pb(e: pb::Error) -> Self {
        Error::Api {
            code: e.code(),
            message: e.message,
        }
    }

    /// The wire code, for API errors.
    pub fn code(&self) -> Option<pb::ErrorCode> {
        match self {
            Error::Api { code, .. } | Error::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
