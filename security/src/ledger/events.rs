//! The ledger's vocabulary: what a peer can do that the ledger records
//! (with its weight in the score), a recorded event, a ban, and a peer's
//! credit as it is reported.

use super::*;

/// What was observed.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// Verified data received from the peer, and how long it took.
    Received {
        /// Bytes that verified.
        bytes: u64,
        /// Seconds spent receiving them.
        secs: f64,
    },
    /// Data this node served to the peer.
    Served {
        /// Bytes sent.
        bytes: u64,
    },
    /// The peer answered a request.
    RequestOk,
    /// The peer failed a request (refused, vanished, broke off).
    RequestFailed,
    /// The peer took a request and never answered it (silent or hung);
    /// counted among failed requests, weighed heavier.
    Unanswered,
    /// A block from the peer failed verification.
    CorruptBlock,
    /// The peer broke the protocol.
    Violation,
    /// The peer sent malware.
    Malware {
        /// Signature name.
        signature: String,
    },
    /// A DRM check on the peer's content passed.
    DrmPassed,
    /// A DRM check on the peer's content failed.
    DrmFailed,
    /// A compute job the peer ran agreed with the majority (it was paid):
    /// `fuel` units of work returned `secs` after they were asked for.
    ComputeAgreed {
        /// Work units (fuel) of the run.
        fuel: u64,
        /// Seconds from the request to the result.
        secs: f64,
    },
    /// A compute job the peer ran disagreed with the majority (wrong result
    /// or overstated work; it was not paid).
    ComputeDisagreed,
    /// The peer was connected for this long.
    Seen {
        /// Seconds.
        secs: u64,
    },
}

impl EventKind {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::Received { .. } => "received",
            Self::Served { .. } => "served",
            Self::RequestOk => "request-ok",
            Self::RequestFailed => "request-failed",
            Self::Unanswered => "unanswered",
            Self::CorruptBlock => "corrupt-block",
            Self::Violation => "violation",
            Self::Malware { .. } => "malware",
            Self::DrmPassed => "drm-passed",
            Self::DrmFailed => "drm-failed",
            Self::ComputeAgreed { .. } => "compute-agreed",
            Self::ComputeDisagreed => "compute-disagreed",
            Self::Seen { .. } => "seen",
        }
    }
}

/// One history row.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Unix seconds.
    #[prost(double, tag = "1")]
    pub at_unix: f64,
    /// Kind, e.g. "corrupt-block".
    #[prost(string, tag = "2")]
    pub kind: String,
    /// Bytes or seconds, when the kind has an amount.
    #[prost(uint64, tag = "3")]
    pub amount: u64,
    /// Free text (a malware signature name).
    #[prost(string, tag = "4")]
    pub detail: String,
}

/// A ban (after malware): the peer is disconnected and refused until it ends.
#[derive(Clone, PartialEq, Message)]
pub struct Ban {
    /// Unix seconds when the ban ends.
    #[prost(uint64, tag = "1")]
    pub until_unix: u64,
    /// Why.
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// A peer's credit as operators and the content engine see it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerCredit {
    /// The peer.
    pub peer: PeerId,
    /// 0-100; 50 for a stranger.
    pub score: u8,
    /// What the node does with it.
    pub standing: Standing,
    /// Forecast: expected delivery rate, bytes per second (0 = unknown).
    pub expected_bps: f64,
    /// Forecast: probability the next interaction is good.
    pub reliability: f64,
    /// Bytes that verified, received from it.
    pub bytes_received: u64,
    /// Bytes served to it.
    pub bytes_served: u64,
    /// Requests it answered.
    pub requests_ok: u64,
    /// Requests it failed.
    pub requests_failed: u64,
    /// Blocks from it that failed verification.
    pub corrupt_blocks: u64,
    /// Protocol violations.
    pub violations: u64,
    /// Malware detections.
    pub malware: u64,
    /// DRM checks passed.
    pub drm_passed: u64,
    /// DRM checks failed.
    pub drm_failed: u64,
    /// Compute jobs it ran whose result agreed with the majority.
    pub compute_agreed: u64,
    /// Compute jobs it ran whose result disagreed.
    pub compute_disagreed: u64,
    /// Forecast: its compute rate, fuel per second from request to result
    /// (0 = unknown).
    pub expected_fuel_per_sec: f64,
    /// Seconds connected, in total.
    pub uptime_secs: u64,
    /// Unix seconds of the first and last observation.
    pub first_seen_unix: u64,
    /// Unix seconds of the last observation.
    pub last_seen_unix: u64,
    /// Active ban, if any.
    pub ban: Option<Ban>,
}
