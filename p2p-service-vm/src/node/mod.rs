//! The libp2p node: one `Swarm` owned by one event loop task.
//!
//! ```text
//!  API sessions ──NodeHandle (bounded mpsc of Command)──► EventLoop ──► Swarm
//!       ▲                                                    │
//!       └────────── broadcast of NodeEvent ◄─────────────────┘
//! ```
//!
//! Following rust-libp2p's file-sharing example, callers never touch the swarm:
//! they send a [`Command`] carrying a oneshot reply, and the loop answers when the
//! swarm reports the outcome. App-defined protocols bypass the loop through a
//! cloned [`libp2p_stream::Control`].

mod behaviour;
mod event_loop;
mod handle;
mod pending_per_ip;
mod punch_guard;
mod reach;
mod redial;
mod relay_budget;
mod relay_guard;
mod repunch;

pub use behaviour::{relay_key, service_key};
pub use event_loop::{Node, NodeStartError};
pub use handle::{
    Command, ConnectionSummary, NodeError, NodeEvent, NodeHandle, Paths, PeerSummary,
    PubsubMessage, ReachStatus,
};
pub use reach::{Reachability, transport_of};
