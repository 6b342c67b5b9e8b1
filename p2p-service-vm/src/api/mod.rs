//! The API services: per-app sessions speaking the p2pvm wire protocol.
//!
//! ```text
//!  byte stream (Unix socket / channel) ─► session ─► requests ─► ops::<domain> ─► node, services
//!                                           │
//!                                           └─► streams (app protocol bridges)
//!  second connection presenting a ticket ─► bulk (content bytes into a ring)
//! ```
//!
//! [`ApiService`] holds what sessions share (the node context, the services,
//! the credential store, who owns which protocol, topic and service reference
//! counts). A session owns everything it creates; when it ends, its handlers,
//! subscriptions, advertisements and streams go with it. The operations live
//! in `ops`, one module per domain; `errors` is the one place where the
//! domains' typed errors become wire codes.

pub mod apps;
mod bulk;
mod errors;
mod operator;
mod ops;
pub mod server;
mod service;
mod session;
mod streams;
mod tickets;

pub use service::ApiService;

use p2pvm_proto::pb;

/// An API-level failure: a code for the wire and a message for humans.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    /// Wire error code.
    pub code: pb::ErrorCode,
    /// Explanation.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: pb::ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(pb::ErrorCode::BadRequest, message)
    }

    pub(crate) fn to_pb(&self) -> pb::Error {
        pb::Error::new(self.code, self.message.clone())
    }
}
