//! `p2pvmm`: the supervisor of the split platform. It plays the VMM's role in
//! the architecture: it creates the shared region and the event channels that
//! join the client side and the P2P service side, isolates the service side,
//! and restarts what crashes.
//!
//! ```text
//!  host apps ─► front-end (p2p-frontend) ⇄ region + eventfds ⇄ p2pd (sandbox)
//!                                 ▲ brokered by p2pvmm ▲
//! ```
//!
//! Backends: `sandbox` ([`sandbox`], [`supervisor`]) runs everywhere; `vm`
//! (KVM guests over the same channel) needs hardware virtualization and is
//! chosen by [`isolation`] only where it exists.

pub mod isolation;
pub mod sandbox;
pub mod supervisor;
