//! The one place where the domains' typed errors become API errors: a wire
//! code for the app, and a message that carries every cause.

use p2pvm_proto::pb;

use super::{ApiError, apps};
use crate::compute::ComputeServiceError;

impl From<crate::node::NodeError> for ApiError {
    fn from(e: crate::node::NodeError) -> Self {
        use crate::node::NodeError as N;
        let code = match &e {
            N::Stopped => pb::ErrorCode::Unavailable,
            N::Dial(_) => pb::ErrorCode::Unavailable,
            N::Timeout => pb::ErrorCode::Timeout,
            N::NotFound => pb::ErrorCode::NotFound,
            N::Dht(_) | N::Pubsub(_) | N::NoSubscribers => pb::ErrorCode::Unavailable,
            N::Invalid(_) => pb::ErrorCode::BadRequest,
            N::Busy(_) => pb::ErrorCode::LimitExceeded,
        };
        Self::new(code, crate::report::chain(&e))
    }
}

impl From<crate::content::ContentServiceError> for ApiError {
    /// The one place a content error becomes an API error code; the message
    /// carries every cause.
    fn from(e: crate::content::ContentServiceError) -> Self {
        use crate::content::ContentServiceError as C;
        if let Some(drm) = e.drm_code() {
            return Self::new(drm_error_code(drm), crate::report::chain(&e));
        }
        let code = match &e {
            C::NotFound(_) => pb::ErrorCode::NotFound,
            C::Verification(_) => pb::ErrorCode::VerificationFailed,
            C::BadRequest(_) | C::AllowedGroup(_) => pb::ErrorCode::BadRequest,
            C::Unavailable(_) | C::Scan(_) | C::Cancelled => pb::ErrorCode::Unavailable,
            C::Local(_) if e.is_full() => pb::ErrorCode::ResourceExhausted,
            C::Local(_) => pb::ErrorCode::Internal,
            C::Denied(_) => pb::ErrorCode::PermissionDenied,
            C::Malware { .. } => pb::ErrorCode::MalwareDetected,
            C::Drm(_) | C::DrmRefused { .. } => pb::ErrorCode::Internal,
        };
        Self::new(code, crate::report::chain(&e))
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
            G::Certificate(_) | G::Invitation(_) | G::Crl { .. } | G::EpochKey(_) => {
                pb::ErrorCode::VerificationFailed
            }
            G::Make { .. } | G::Io { .. } => pb::ErrorCode::Internal,
        };
        Self::new(code, crate::report::chain(&e))
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

impl From<ComputeServiceError> for ApiError {
    fn from(e: ComputeServiceError) -> Self {
        use ComputeServiceError as E;
        let code = match &e {
            E::BadRequest(_) | E::BadJobId(_) => pb::ErrorCode::BadRequest,
            E::InsufficientCredit { .. } => pb::ErrorCode::ComputeInsufficientCredit,
            E::NotFound(_) => pb::ErrorCode::NotFound,
            E::Receipts(_) | E::Sandbox(_) | E::Io { .. } | E::Countersign(_) => {
                pb::ErrorCode::Internal
            }
        };
        ApiError::new(code, crate::report::chain(&e))
    }
}

impl From<crate::content::group_topics::GroupTopicError> for ApiError {
    fn from(e: crate::content::group_topics::GroupTopicError) -> Self {
        use crate::content::group_topics::GroupTopicError as G;
        let code = match &e {
            G::NotMember(_) => pb::ErrorCode::DrmNotGroupMember,
            G::NoKey(_) => pb::ErrorCode::Unavailable,
            G::Seal(_) => pb::ErrorCode::Internal,
            G::Node(_) => pb::ErrorCode::Unavailable,
        };
        Self::new(code, crate::report::chain(&e))
    }
}
