//! The security checker of the P2P service (the patent's "security checker"),
//! used by p2pd on every exchange with other peers.
//!
//! ```text
//!   content engine / transfer server ──observations──► Ledger (redb, own observations only)
//!                         ▲                               │
//!                         └──── score, forecast, policy ◄─┘
//! ```
//!
//! This first part is the peer credit ledger: what this node itself observed of
//! each peer, a decaying Beta-reputation score with throughput and reliability
//! forecasts, and the throttle/refuse policy. The virus filter (clamd), the DRM
//! checker and the privacy controller plug in beside it.

pub mod ledger;
mod score;

pub use ledger::{Ban, Event, EventKind, Ledger, LedgerError, PeerCredit};
pub use score::{Policy, Standing, Weights};
