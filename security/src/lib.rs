//! The security checker of the P2P service (the patent's "security checker"),
//! used by p2pd on every exchange with other peers.
//!
//! ```text
//!   content engine / transfer server ──observations──► Ledger (redb, own observations only)
//!                         ▲                               │
//!                         └──── score, forecast, policy ◄─┘
//! ```
//!
//! Two units so far: the peer credit ledger (what this node itself observed of
//! each peer, a decaying Beta-reputation score with throughput and reliability
//! forecasts, the throttle/refuse policy, bans) and the virus filter (content
//! streamed to a real ClamAV clamd, with a cache of clean verdicts per
//! signature database). The DRM checker and the privacy controller
//! plug in beside them.

#![forbid(unsafe_code)]

pub mod ledger;
mod score;
pub mod verdicts;
pub mod virus;

pub use ledger::{Ban, Event, EventKind, Ledger, LedgerError, PeerCredit};
pub use score::{Policy, Standing, Weights};
pub use verdicts::{VerdictCache, VerdictCacheError};
pub use virus::{ClamdAddr, Scanner, Verdict, VirusError, VirusFilter};
