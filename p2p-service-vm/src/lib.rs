//! The P2P service: what runs in the P2P service VM (or as a host daemon).
//!
//! ```text
//!   app sessions (the Unix socket; the inter-VM channel's back-end, backend.rs)
//!        │  p2pvm API frames
//!        ▼
//!   api::ApiService ── per-app auth, per-session state, limits; api::ops by domain
//!        │                 │                    │
//!        ▼                 ▼                    ▼
//!   node::Node      content::ContentService  compute::ComputeService
//!   (libp2p swarm)  (store, transfers,       (WebAssembly jobs, receipts)
//!        ▲           fast path, search)          │
//!        └──────────── context::NodeContext ◄────┘
//!                      identity, node handle, credit ledger, virus filter,
//!                      store, tasks, shutdown, configuration, metrics
//!                      (`GET /metrics`: metrics::server)
//! ```
//!
//! Start reading at [`daemon::run`], which builds the [`context::NodeContext`]
//! once and hands it to each service, then [`api`] for how one app session
//! is served and [`node`] for the swarm. The API layer is transport-agnostic:
//! [`api::ApiService::serve`] takes any byte stream, which is how the channel
//! back-end ([`backend`]) plugs in: one channel session per app connection of
//! the front-end, in the sandbox or from the client VM. The security
//! decisions (credit, virus verdicts, DRM, groups) are `p2pvm_security`'s;
//! the services here ask it.

#![forbid(unsafe_code)]

pub mod api;
pub mod backend;
mod clock;
pub mod compute;
pub mod config;
pub mod confine;
pub mod content;
pub mod context;
pub mod credit;
pub mod daemon;
pub mod dashboard;
mod fsutil;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod report;
pub mod tasks;
