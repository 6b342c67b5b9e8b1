//! Why a content operation failed, typed, with the cause kept as a source.
//!
//! [`ContentServiceError`] is what apps see (mapped once to an API error code
//! in `api`); [`ProviderError`] is what went wrong with one provider, and
//! [`ProviderError::evidence`] is the one place that decides what it costs
//! that provider in the credit ledger.

use std::sync::Arc;

use libp2p::PeerId;
use p2pvm_content::{ContentError, ContentId, ManifestError, StoreError};
use p2pvm_security::{CertError, DrmError, EventKind, VirusError};

use crate::node::NodeError;

/// Why a content operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ContentServiceError {
    /// No such item here, and no provider has it.
    #[error("Content {0} not found")]
    NotFound(ContentId),
    /// The request is malformed (bad id, range outside the item).
    #[error("{0}")]
    BadRequest(String),
    /// The item's rights name a group this node cannot resolve.
    #[error("allowed_groups")]
    AllowedGroup(#[source] std::sync::Arc<p2pvm_security::GroupError>),
    /// Not allowed.
    #[error("{0}")]
    Denied(String),
    /// A manifest or data did not verify.
    #[error("Verification failed: {0}")]
    Verification(#[from] VerifyError),
    /// Providers exist but the transfer cannot proceed.
    #[error("Unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    /// The virus filter could not give a verdict (clamd down, or it refused).
    #[error("{0}")]
    Scan(#[source] Arc<VirusError>),
    /// The virus filter found this signature.
    #[error("Malware detected: {signature}{}", if *.elsewhere { " (found in another part of this item)" } else { "" })]
    Malware {
        /// The signature's name, as clamd reports it.
        signature: String,
        /// Found by another reader's scan of the same item.
        elsewhere: bool,
    },
    /// The DRM checker refused the item here (its code names the check).
    #[error("{0}")]
    Drm(#[from] DrmError),
    /// A provider's DRM checker refused to serve it to this node.
    #[error("provider {peer} refused: {message}")]
    DrmRefused {
        /// The provider.
        peer: PeerId,
        /// The check that failed there.
        code: &'static str,
        /// Its message.
        message: String,
    },
    /// A local failure: the store, its disk, a task of ours.
    #[error("{0}")]
    Local(#[source] Arc<LocalError>),
    /// The transfer was called off (shutdown, or no reader is left).
    #[error("Cancelled")]
    Cancelled,
}

impl ContentServiceError {
    /// Whether the local disk is full (a different answer for the app: free
    /// space, or lower the quota).
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Local(l) if l.is_full())
    }

    /// The DRM check that failed, here or at a provider (`DRM_EXPIRED`...).
    pub fn drm_code(&self) -> Option<&'static str> {
        match self {
            Self::Drm(e) => Some(e.code()),
            Self::DrmRefused { code, .. } => Some(code),
            Self::Unavailable(Unavailable::Provider { source, .. }) => match &**source {
                ProviderError::Drm(e) => Some(e.code()),
                ProviderError::Forbidden { code, .. } => Some(code),
                _ => None,
            },
            _ => None,
        }
    }

    pub(crate) fn malware(signature: impl Into<String>) -> Self {
        Self::Malware {
            signature: signature.into(),
            elsewhere: false,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LocalError::Io {
            what: what.into(),
            source,
        }
        .into()
    }

    /// A task of ours panicked or was aborted.
    pub(crate) fn task(e: tokio::task::JoinError) -> Self {
        LocalError::Task(e).into()
    }
}

/// A local failure.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The store (index or files).
    #[error("Store")]
    Store(#[from] StoreError),
    /// Other file I/O (a download's partial file, a stored item's bytes).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A task of ours panicked or was aborted.
    #[error("Internal task failed")]
    Task(#[source] tokio::task::JoinError),
    /// Making the fast path's TLS identity failed.
    #[error("Fast path identity")]
    FastPath(#[source] p2pvm_security::PeerTlsError),
    /// The DRM configuration (trusted publisher CAs, CRLs, this node's own
    /// publisher chain) is not usable.
    #[error("DRM configuration")]
    Drm(#[source] CertError),
    /// The trusted groups' directory cannot be read.
    #[error("Trusted groups")]
    Groups(#[source] p2pvm_security::GroupError),
}

impl LocalError {
    fn is_full(&self) -> bool {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = src {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::StorageFull
            {
                return true;
            }
            src = e.source();
        }
        false
    }
}

impl From<LocalError> for ContentServiceError {
    fn from(e: LocalError) -> Self {
        Self::Local(Arc::new(e))
    }
}

impl From<StoreError> for ContentServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => Self::NotFound(id),
            e => LocalError::Store(e).into(),
        }
    }
}

impl From<VirusError> for ContentServiceError {
    fn from(e: VirusError) -> Self {
        Self::Scan(Arc::new(e))
    }
}

impl From<ManifestError> for ContentServiceError {
    fn from(e: ManifestError) -> Self {
        Self::Verification(VerifyError::Manifest(Arc::new(e)))
    }
}

/// Why a manifest or a block was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    /// The signature or the encoding is wrong.
    #[error("manifest does not verify")]
    Manifest(#[source] Arc<ManifestError>),
    /// A provider answered with the manifest of something else.
    #[error("manifest for another item")]
    WrongItem,
    /// Anyone can sign a manifest for any id: the size it claims must be
    /// within this node's bound...
    #[error("claimed size {size} is above content.max_item_bytes ({max})")]
    TooLarge {
        /// What the manifest claims.
        size: u64,
        /// The configured bound.
        max: u64,
    },
    /// ...and match the id.
    #[error("claimed size 0 for a non-empty id")]
    NotEmpty,
    /// The proof of the item's size did not verify.
    #[error("size proof does not verify")]
    SizeProof(#[source] Arc<ContentError>),
}

/// Why a transfer cannot go on although the item exists somewhere.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    /// Providers were found, but none delivered for the stall timeout.
    #[error("no verified data for {secs}s from {providers} provider(s)")]
    Stalled {
        /// The configured stall timeout.
        secs: u64,
        /// Providers being asked when it stalled.
        providers: usize,
    },
    /// The providers are reached only through relays, and the relays'
    /// circuits (limited in bytes and time by their operators) did not
    /// carry the item.
    #[error(
        "no verified data for {secs}s: the {providers} provider(s) are reachable only through relays, whose circuits carry {limit} bytes (their operators' limit)"
    )]
    RelayLimited {
        /// The configured stall timeout.
        secs: u64,
        /// Providers known when it stalled.
        providers: usize,
        /// What one circuit carries, in words ("at most 262144").
        limit: String,
    },
    /// The only providers failed; the last one's reason.
    #[error("provider {peer}: {source}")]
    Provider {
        /// The provider.
        peer: PeerId,
        /// What went wrong with it.
        #[source]
        source: Arc<ProviderError>,
    },
    /// The transfer ended without an outcome (its driver panicked).
    #[error("the transfer ended unexpectedly")]
    Ended,
}

/// What went wrong with one provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// It does not speak the content protocol.
    #[error("peer does not speak the content protocol")]
    Unsupported,
    /// It could not be found or dialled.
    #[error("cannot reach the peer")]
    Unreachable(#[source] NodeError),
    /// Opening a stream to it failed.
    #[error("opening a stream")]
    OpenStream(#[source] libp2p_stream::OpenStreamError),
    /// Opening a stream to it timed out.
    #[error("opening a stream: timed out")]
    OpenTimedOut,
    /// A session to it cannot be opened, for this reason.
    #[error("opening a stream: {0}")]
    Open(String),
    /// The stream failed or closed early.
    #[error("stream")]
    Io(#[from] std::io::Error),
    /// It did not answer in time.
    #[error("the provider did not answer")]
    NoAnswer,
    /// It accepted requests and stopped answering them.
    #[error("the provider stopped answering")]
    StoppedAnswering,
    /// Its bitfield is shorter than the item.
    #[error("short bitfield")]
    ShortBitfield,
    /// It was announced as a provider but does not hold the item (a lie, or a
    /// stale record).
    #[error("peer does not have the item: {0}")]
    NotProviding(String),
    /// It refused a block it said it held.
    #[error("block {block} refused: {message}")]
    Refused {
        /// The block.
        block: u64,
        /// Its reason.
        message: String,
    },
    /// It is still downloading and has had nothing we need for a while.
    #[error("holds nothing this download still needs")]
    NothingWanted,
    /// It had no upload slot for us for this long (it serves others first).
    #[error("no upload slot for {0:?}")]
    NoSlot(std::time::Duration),
    /// It already serves us on as many content streams as it allows one peer.
    #[error("busy: {0}")]
    StreamsFull(String),
    /// It refused to prove the item's size.
    #[error("size proof refused: {0}")]
    SizeUnproven(String),
    /// It declined a request (a search, say) with this reason.
    #[error("declined: {0}")]
    Declined(String),
    /// Its answer does not decode.
    #[error("malformed answer")]
    BadAnswer(#[source] prost::DecodeError),
    /// It sent a block that did not verify.
    #[error("block {block} failed verification")]
    Corrupt {
        /// The block.
        block: u64,
        /// How it failed.
        #[source]
        source: ContentError,
    },
    /// It sent a manifest that is not acceptable.
    #[error("bad manifest")]
    Manifest(#[source] VerifyError),
    /// It served what the DRM checker refuses from it: a forged manifest, an
    /// expired item, an item only its publisher may serve.
    #[error("{0}")]
    Drm(DrmError),
    /// Its DRM checker refused to serve this node (no fault of its own).
    #[error("refused: {message}")]
    Forbidden {
        /// The check that failed there.
        code: &'static str,
        /// Its message.
        message: String,
    },
    /// It is reachable only through a relay whose circuits carry fewer
    /// bytes than the item still needs (the relay operator's limit).
    #[error(
        "reachable only through a relay whose circuits carry at most {limit} bytes; {missing} bytes are still missing"
    )]
    RelayLimited {
        /// Bytes one circuit carries.
        limit: u64,
        /// Bytes of the item not held yet.
        missing: u64,
    },
    /// The download ended for a reason of ours, not the provider's.
    #[error("the download failed locally")]
    Local(#[source] ContentServiceError),
}

impl ProviderError {
    /// What this costs the provider in the credit ledger, decided here only.
    pub(crate) fn evidence(&self) -> Option<EventKind> {
        match self {
            // Verification failures are on the sender's record.
            Self::Corrupt { .. } | Self::Manifest(VerifyError::SizeProof(_)) => {
                Some(EventKind::CorruptBlock)
            }
            // It served what it must not.
            Self::Drm(_) => Some(EventKind::DrmFailed),
            // It took a request and sent nothing back for the whole answer
            // timeout while its connection lived: an honest peer answers at
            // once, if only `Busy` (its server does when it is overloaded).
            // Where the stream can still be watched, that watch decides
            // instead (`fetch::silence`): a late answer is a failed request.
            Self::NoAnswer => Some(EventKind::Unanswered),
            // It took requests and did not serve them. (Answers that stopped
            // coming may only be slow: a 256 KiB answer on a thin uplink.)
            Self::StoppedAnswering
            | Self::ShortBitfield
            | Self::NotProviding(_)
            | Self::Refused { .. }
            | Self::BadAnswer(_)
            | Self::Io(_) => Some(EventKind::RequestFailed),
            // Not reachable, a manifest too large or for another item, a
            // refusal its DRM checker owed us, or our own failure.
            Self::Unsupported
            | Self::Unreachable(_)
            | Self::Open(_)
            | Self::OpenStream(_)
            | Self::OpenTimedOut
            | Self::SizeUnproven(_)
            | Self::NoSlot(_)
            | Self::StreamsFull(_)
            | Self::NothingWanted
            | Self::Declined(_)
            | Self::Forbidden { .. }
            | Self::Manifest(_)
            | Self::RelayLimited { .. }
            | Self::Local(_) => None,
        }
    }

    /// A short name of the kind of failure, for counts in logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Unsupported => "unsupported",
            Self::Unreachable(_) => "unreachable",
            Self::Open(_) | Self::OpenStream(_) | Self::OpenTimedOut => "open",
            Self::Io(_) => "io",
            Self::NoAnswer => "no_answer",
            Self::StoppedAnswering => "stopped_answering",
            Self::ShortBitfield => "short_bitfield",
            Self::NotProviding(_) => "not_providing",
            Self::Refused { .. } => "refused",
            Self::NothingWanted => "nothing_wanted",
            Self::NoSlot(_) => "no_slot",
            Self::StreamsFull(_) => "streams_full",
            Self::SizeUnproven(_) => "size_unproven",
            Self::Declined(_) => "declined",
            Self::BadAnswer(_) => "bad_answer",
            Self::Corrupt { .. } => "corrupt",
            Self::Manifest(_) => "manifest",
            Self::Drm(_) => "drm",
            Self::Forbidden { .. } => "forbidden",
            Self::RelayLimited { .. } => "relay_limited",
            Self::Local(_) => "local",
        }
    }

    /// Whether a retry of the same provider may work (a transport hiccup).
    pub(crate) fn transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_)
                | Self::Open(_)
                | Self::OpenStream(_)
                | Self::OpenTimedOut
                | Self::Io(_)
                | Self::NoAnswer
        )
    }

    /// Whether it is the connection's failure, not the provider's data or
    /// policy: a closed or silent stream.
    pub(crate) fn transient_on_stream(&self) -> bool {
        matches!(self, Self::Io(_) | Self::StoppedAnswering | Self::NoAnswer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_found_under_the_store_error() {
        let e: ContentServiceError = StoreError::Io {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        }
        .into();
        assert!(e.is_full());
        let other: ContentServiceError = ContentServiceError::io(
            "writing block 3",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(!other.is_full());
        let msg = crate::report::chain(&other);
        assert!(
            msg.contains("writing block 3") && msg.contains("denied"),
            "{msg}"
        );
    }

    #[test]
    fn only_serving_failures_cost_credit() {
        assert!(matches!(
            ProviderError::StoppedAnswering.evidence(),
            Some(EventKind::RequestFailed)
        ));
        assert!(matches!(
            ProviderError::Corrupt {
                block: 1,
                source: ContentError::NotHeld(1)
            }
            .evidence(),
            Some(EventKind::CorruptBlock)
        ));
        assert!(
            ProviderError::Local(ContentServiceError::Cancelled)
                .evidence()
                .is_none()
        );
        assert!(ProviderError::Unsupported.evidence().is_none());
    }
}
