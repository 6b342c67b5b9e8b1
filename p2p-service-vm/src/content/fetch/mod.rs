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
//! - [`silence`]: whether a provider that left a request unanswered was slow
//!   or silent, decided after the downloader has moved on.
//!
//! A block that fails verification is dropped, the peer is excluded from this
//! download and reported ([`crate::content::ContentEvent::CorruptData`]), and the
//! block is fetched from someone else. A provider that disappears returns its
//! blocks to the pool.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use libp2p::PeerId;
use p2pvm_content::ContentId;

use super::{ContentInfo, ContentService, ContentServiceError, ProviderError, Transfer};

mod download;
mod driver;
mod peer;
mod reader;
mod scan;
mod sched;
mod silence;
mod worker;

pub(crate) use download::Download;
pub(crate) use driver::first_providers;
pub(crate) use peer::{group_session, manifest_from, open_stream, request_response};
pub(crate) use reader::{READ_AHEAD_UNIT, charge_buffer};
pub(crate) use reader::{download, open_reader};
pub(crate) use sched::{Have, Sched};
pub(crate) use worker::have_bits;

/// How many ended downloads [`ContentService::transfers`] still shows.
const ENDED_SHOWN: usize = 16;

fn transfer_of(d: &Download) -> Transfer {
    let size = d.partial.size();
    Transfer {
        id: d.id,
        name: d.manifest.manifest.name.clone(),
        held_bytes: (d.partial.held() * p2pvm_content::BLOCK_BYTES).min(size),
        size,
        state: "running",
    }
}

impl ContentService {
    /// A stream of `protocol` to `peer`, opened as content streams are (a
    /// dial first when not connected, bounded in time): for the other
    /// services' protocols.
    pub(crate) async fn open_protocol(
        &self,
        peer: PeerId,
        protocol: libp2p::StreamProtocol,
    ) -> Result<libp2p::Stream, ProviderError> {
        peer::open_protocol(self, peer, protocol).await
    }

    /// The downloads running now, largest share held first, then the
    /// latest to end, newest first.
    pub fn transfers(&self) -> Vec<Transfer> {
        let downloads: Vec<Arc<Download>> = self
            .inner
            .downloads
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect();
        let mut out: Vec<Transfer> = downloads
            .iter()
            .map(|d| Transfer {
                state: "running",
                ..transfer_of(d)
            })
            .collect();
        out.sort_by(|a, b| {
            // Shares compared without division (and without overflow).
            (u128::from(b.held_bytes) * u128::from(a.size.max(1)))
                .cmp(&(u128::from(a.held_bytes) * u128::from(b.size.max(1))))
                .then(a.id.0.cmp(&b.id.0))
        });
        out.extend(self.inner.ended.lock().expect("lock").iter().rev().cloned());
        out
    }

    /// Keeps how a download ended among the latest.
    pub(crate) fn transfer_ended(&self, d: &Download, state: &'static str) {
        let mut ended = self.inner.ended.lock().expect("lock");
        if ended.len() == ENDED_SHOWN {
            ended.pop_front();
        }
        ended.push_back(Transfer {
            state,
            ..transfer_of(d)
        });
    }

    /// Streams verified bytes of `range` (the whole item when `None`), blocks in
    /// playback order. The item is kept and provided to others when `keep` is
    /// set and the whole item was asked for.
    pub async fn fetch(
        &self,
        id: &ContentId,
        range: Option<Range<u64>>,
        keep: bool,
    ) -> Result<
        (
            ContentInfo,
            Range<u64>,
            impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
        ),
        ContentServiceError,
    > {
        open_reader(self, id, range, keep).await
    }

    /// A buffer of up to `want` bytes to hold ahead of a client (a bulk
    /// ring), charged to the node's read-ahead pool while the returned
    /// permit lives: the largest power of two the pool has room for, else
    /// 64 KiB uncharged.
    pub(crate) fn charge_buffer(
        &self,
        want: u64,
    ) -> (u64, Option<tokio::sync::OwnedSemaphorePermit>) {
        charge_buffer(&self.inner.read_ahead, want)
    }

    /// Downloads a whole item into the store (swarm-friendly order) and returns
    /// once it is stored.
    pub async fn download(&self, id: &ContentId) -> Result<ContentInfo, ContentServiceError> {
        download(self, id, &[]).await
    }

    /// [`Self::download`], asking `sources` first (see [`Self::stat_from`]).
    pub async fn download_from(
        &self,
        id: &ContentId,
        sources: &[PeerId],
    ) -> Result<ContentInfo, ContentServiceError> {
        download(self, id, sources).await
    }
}
