//! Fetching from many providers at once.
//!
//! ```text
//!  open_reader / download ──► driver (one per item) ──► worker per provider ──► peer
//!        ▲                        │ finds providers,          │ Have, pipelined Block
//!        │                        │ watches for stalls,       ▼ requests, verifies
//!   reader: scans segments,       │ commits kept items    Download (shared state:
//!   hands bytes to the app ◄──────┴──────────────────────  schedule, memory, phase)
//! ```
//!
//! - [`sched`]: which block to ask which provider for next — a pure state
//!   machine (time and a seed in, choices out) with property tests.
//! - [`download`]: one item being fetched, shared by its readers and workers.
//! - [`driver`]: one task per download; provider choice, stall watch, finish.
//! - [`worker`]: one task per provider; the request pipeline and verification.
//! - [`peer`]: opening streams; manifests whose size is proven.
//! - [`reader`]: verified bytes to readers, from the store or a download.
//! - [`scan`]: the virus filter's part; malware isolates the peers that sent it.
//!
//! A block that fails verification is dropped, the peer is excluded from this
//! download and reported ([`crate::content::ContentEvent::CorruptData`]), and the
//! block is fetched from someone else. A provider that disappears returns its
//! blocks to the pool.

mod download;
mod driver;
mod peer;
mod reader;
mod scan;
mod sched;
mod worker;

pub(crate) use download::Download;
pub(crate) use driver::first_providers;
pub(crate) use peer::{group_session, manifest_from, open_protocol, open_stream, request_response};
pub(crate) use reader::{READ_AHEAD_UNIT, charge_buffer};
pub(crate) use reader::{download, open_reader};
pub(crate) use sched::{Have, Sched};
pub(crate) use worker::have_bits;
