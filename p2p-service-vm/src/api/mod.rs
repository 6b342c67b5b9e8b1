//! The API services: per-app sessions speaking the p2pvm wire protocol.
//!
//! ```text
//!  byte stream (Unix socket / channel) ─► session ─► ops ─► NodeHandle
//!                                           │
//!                                           └─► streams (app protocol bridges)
//!  second connection presenting a ticket ─► bulk (content bytes into a ring)
//! ```
//!
//! [`ApiService`] holds what sessions share (the node handle, the credential store,
//! who owns which protocol, topic and service reference counts). A session owns
//! everything it creates; when it ends, its handlers, subscriptions, advertisements
//! and streams go with it.

pub mod apps;
mod bulk;
mod compute;
mod ops;
pub mod server;
mod service;
mod session;
mod streams;

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

impl From<crate::node::NodeError> for ApiError {
    fn from(e: crate::node::NodeError) -> Self {
        use crate::node::NodeError as N;
        let code = match &e {
            N::Stopped => pb::ErrorCode::Unavailable,
            N::Dial(_) => pb::ErrorCode::Unavailable,
            N::Timeout => pb::ErrorCode::Timeout,
            N::NotFound => pb::ErrorCode::NotFound,
            N::Dht(_) | N::Pubsub(_) => pb::ErrorCode::Unavailable,
            N::Invalid(_) => pb::ErrorCode::BadRequest,
            N::Busy(_) => pb::ErrorCode::LimitExceeded,
        };
        Self::new(code, e.to_string())
    }
}

impl From<crate::content::ContentServiceError> for ApiError {
    /// The one place a content error becomes an API error code; the message
    /// carries every cause.
    fn from(e: crate::content::ContentServiceError) -> Self {
        use crate::content::ContentServiceError as C;
        if let Some(drm) = e.drm_code() {
            return Self::new(drm_error_code(drm), crate::content::chain(&e));
        }
        let code = match &e {
            C::NotFound(_) => pb::ErrorCode::NotFound,
            C::Verification(_) => pb::ErrorCode::VerificationFailed,
            C::BadRequest(_) => pb::ErrorCode::BadRequest,
            C::Unavailable(_) | C::Scan(_) | C::Cancelled => pb::ErrorCode::Unavailable,
            C::Local(_) if e.is_full() => pb::ErrorCode::ResourceExhausted,
            C::Local(_) => pb::ErrorCode::Internal,
            C::Denied(_) => pb::ErrorCode::PermissionDenied,
            C::Malware { .. } => pb::ErrorCode::MalwareDetected,
            C::Drm(_) | C::DrmRefused { .. } => pb::ErrorCode::Internal,
        };
        Self::new(code, crate::content::chain(&e))
    }
}

/// The API code of a failed DRM check (the checker's own word for it).
fn drm_error_code(code: &str) -> pb::ErrorCode {
    match code {
        "DRM_EXPIRED" => pb::ErrorCode::DrmExpired,
        "DRM_NOT_REDISTRIBUTABLE" => pb::ErrorCode::DrmNotRedistributable,
        "DRM_UNTRUSTED_PUBLISHER" => pb::ErrorCode::DrmUntrustedPublisher,
        "DRM_FORGED_MANIFEST" => pb::ErrorCode::DrmForgedManifest,
        "DRM_NOT_GROUP_MEMBER" => pb::ErrorCode::DrmNotGroupMember,
        _ => pb::ErrorCode::PermissionDenied,
    }
}

impl From<p2pvm_security::GroupError> for ApiError {
    fn from(e: p2pvm_security::GroupError) -> Self {
        use p2pvm_security::GroupError as G;
        let code = match &e {
            G::Unknown(_) | G::NotInvited(_) => pb::ErrorCode::NotFound,
            G::Exists(_) => pb::ErrorCode::AlreadyExists,
            G::BadName(_) => pb::ErrorCode::BadRequest,
            G::NotOwner(_) => pb::ErrorCode::PermissionDenied,
            G::Certificate(_) | G::Invitation(_) | G::Crl(_) | G::EpochKey(_) => {
                pb::ErrorCode::VerificationFailed
            }
            G::Make(_) | G::Io { .. } => pb::ErrorCode::Internal,
        };
        Self::new(code, crate::content::chain(&e))
    }
}

impl From<apps::AppsError> for ApiError {
    fn from(e: apps::AppsError) -> Self {
        let code = match &e {
            apps::AppsError::BadName(_) => pb::ErrorCode::BadRequest,
            apps::AppsError::Unknown(_) => pb::ErrorCode::NotFound,
            _ => pb::ErrorCode::Internal,
        };
        Self::new(code, e.to_string())
    }
}
