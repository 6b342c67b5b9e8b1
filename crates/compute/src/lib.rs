//! Compute leasing's core: metered WebAssembly jobs and the double-signed
//! receipts that pay for them.
//!
//! ```text
//!  requester ──job (module id, input id, fuel)──► provider's P2P service
//!                                                   │ Sandbox::compile: refuse bad modules
//!                                                   │ Sandbox::run: fuel, memory, wall time
//!  requester ◄──result id + receipt signed by provider
//!      │ results compared across providers (majority by result id and work)
//!      └─► countersigned receipt ──► both nodes' Receipts (redb) ──► balances
//! ```
//!
//! The P2P service (`p2p-service-vm`'s `compute` module) moves jobs between
//! nodes; this crate holds what must be exact and testable without a network:
//! the sandbox (wasmtime with Cranelift, fuel metering and epoch interruption),
//! the host API a job may import, and receipts with the balances derived from
//! them. No node can mint credit alone: a receipt counts only when both the
//! requester's and the provider's node keys signed it.

mod error;
pub mod hostapi;
mod receipt;
mod receipts;
#[doc(hidden)]
pub mod reference;
mod sandbox;

pub use error::ComputeError;
pub use receipt::{JobId, Receipt, ReceiptBody, ReceiptError, SignedReceipt, credits_for};
pub use receipts::{Balance, Receipts, ReceiptsError};
pub use sandbox::{Limits, Outcome, Program, Sandbox};

/// The most bytes a module may have.
pub const MAX_MODULE_BYTES: u64 = 16 << 20;
