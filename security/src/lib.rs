//! The security checker of the P2P service (the patent's "security checker"),
//! used by p2pd on every exchange with other peers.
//!
//! ```text
//!   content engine / transfer server ──observations──► Ledger (redb, own observations only)
//!                         ▲                               │
//!                         └──── score, forecast, policy ◄─┘
//! ```
//!
//! Units: the peer credit ledger (what this node itself observed of each
//! peer, a decaying Beta-reputation score with throughput and reliability
//! forecasts, the throttle/refuse policy, bans); the virus filter (content
//! streamed to a real ClamAV clamd, with a cache of clean verdicts per
//! signature database); the DRM checker (rights and publisher certificates,
//! checked before sharing and before accepting), on the X.509 helpers in
//! `pki`; the privacy controller (trusted groups: `groups`, their TLS
//! sessions `group_tls`, their topic keys `group_topics`); the access
//! policy (`access`) that joins the DRM checker and the groups into the
//! content engine's questions: may this be published, served, accepted?; and
//! the content fast path's session security: who may open one (`peer_tls`,
//! libp2p certificates or a group's) and its record layer (`sealed`).

#![forbid(unsafe_code)]

pub mod access;
mod cause;
pub mod drm;
#[doc(hidden)]
pub mod fuzzing;
mod group_id;
pub mod group_tls;
pub mod group_topics;
pub mod groups;
pub mod ledger;
pub mod peer_tls;
pub mod pki;
mod score;
pub mod sealed;
pub mod tls13;
pub mod verdicts;
pub mod virus;

pub use access::{AccessPolicy, PublisherTrust};
pub use cause::Cause;
pub use drm::{Certification, DrmChecker, DrmError, DrmPolicy, Untrusted};
pub use group_tls::GroupTls;
pub use groups::{GroupError, GroupId, GroupInfo, Groups, MemberInfo};
pub use ledger::{Ban, Event, EventKind, Ledger, LedgerError, PeerCredit};
pub use peer_tls::{PeerTls, PeerTlsError};
pub use pki::{CertError, TrustList};
pub use score::{Policy, Standing, Weights};
pub use verdicts::{VerdictCache, VerdictCacheError};
pub use virus::{ClamdAddr, Detection, ScanStats, Scanner, Verdict, VirusError, VirusFilter};
