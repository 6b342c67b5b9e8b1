//! What a worker's connections share: which lane each runs on, why the
//! worker is winding down, when to spread over more connections, and how a
//! provider's `Have` answer is taken.

use crate::content::ContentService;
use crate::content::error::ProviderError;
use crate::content::fetch::download::Download;
use crate::content::fetch::sched::Have;
use libp2p::PeerId;
use p2pvm_content::transfer::{Status, TransferResponse};
use p2pvm_security::EventKind;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a provider may leave requests unanswered before it is dropped.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a worker is winding down, once one of its connections has decided
/// that it should (nothing wanted, no upload slot): its connections stop
/// asking and end once their answers are in, so blocks already on their way
/// are not thrown away with the connection.
#[derive(Default)]
pub(super) struct Ending(std::sync::Mutex<Option<ProviderError>>);

impl Ending {
    pub(super) fn set(&self, e: ProviderError) {
        let mut why = self.0.lock().unwrap_or_else(|p| p.into_inner());
        why.get_or_insert(e);
    }

    pub(super) fn is_set(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The worker's result once all its connections have ended cleanly.
    pub(super) fn result(self) -> Result<(), ProviderError> {
        match self.0.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Connections per provider beyond the first are dialled once the first
/// carries more than this: only then is one connection's decryption and
/// hashing, on one core at a time, what limits the transfer (on loopback a
/// second connection gives 13 % more). A home line never gets there, and on
/// 60 home lines the second connection's handshake and `Have` polls cost a
/// quarter of the downloaders' CPU time for nothing.
pub(super) const SPREAD_ABOVE: f64 = 40.0 * 1024.0 * 1024.0;

/// Which of a worker's connections a pipeline runs on: the first asks the
/// provider what it holds for all of them and says when the link is fast
/// enough to spread over more.
#[derive(Clone, Copy)]
pub(super) enum Lane<'a> {
    First(&'a Spread),
    Extra,
    /// The libp2p stream while the fast path is dialled: it asks what the
    /// provider holds, and winds down once the token says the fast path
    /// took over.
    Bridge(&'a CancellationToken),
}

impl Lane<'_> {
    /// Whether this connection asks the provider what it holds.
    pub(super) fn asks_have(&self) -> bool {
        !matches!(self, Lane::Extra)
    }

    /// Whether another connection took over from this one.
    pub(super) fn handed_over(&self) -> bool {
        matches!(self, Lane::Bridge(t) if t.is_cancelled())
    }

    /// Resolves when another connection takes over (never for most lanes).
    pub(super) async fn taken_over(&self) {
        match self {
            Lane::Bridge(t) => t.cancelled().await,
            _ => std::future::pending().await,
        }
    }
}

/// Between a worker's first connection and the dialling of more.
#[derive(Default)]
pub(super) struct Spread {
    pub(super) fast: tokio::sync::Notify,
    pub(super) ended: tokio::sync::Notify,
}

impl Spread {
    /// Whether more connections are wanted: the first one said its link is
    /// fast before it ended.
    pub(super) async fn wanted(&self) -> bool {
        // An ended first connection wins a tie: its worker is done.
        tokio::select! {
            biased;
            _ = self.ended.notified() => false,
            _ = self.fast.notified() => true,
        }
    }
}

/// Takes a provider's answer to `Have`; true when it holds the whole item.
pub(super) fn on_have(
    svc: &ContentService,
    dl: &Download,
    peer: PeerId,
    header: &TransferResponse,
    payload: &[u8],
) -> Result<bool, ProviderError> {
    let (have, complete) = match Status::try_from(header.status) {
        Ok(Status::Complete) => (Have::All, true),
        Ok(Status::Ok) => (Have::Some(have_bits(payload, dl.partial.blocks())?), false),
        Ok(Status::Forbidden) => {
            return Err(crate::content::fetch::peer::forbidden(
                header.message.clone(),
            ));
        }
        Ok(Status::TooManyStreams) => {
            return Err(ProviderError::StreamsFull(header.message.clone()));
        }
        _ => return Err(ProviderError::NotProviding(header.message.clone())),
    };
    svc.inner.ctx.ledger.record(peer, EventKind::RequestOk);
    dl.state().sched.set_have(peer, have);
    dl.changed.notify_waiters();
    Ok(complete)
}

/// A `Have` bitfield (least significant bit first) as one flag per block of
/// an item of `blocks` blocks; bits past the last block are ignored, a
/// bitfield too short for the item is refused.
pub(crate) fn have_bits(payload: &[u8], blocks: u64) -> Result<Vec<bool>, ProviderError> {
    if (payload.len() as u64) < blocks.div_ceil(8) {
        return Err(ProviderError::ShortBitfield);
    }
    Ok((0..blocks)
        .map(|k| {
            payload
                .get((k / 8) as usize)
                .is_some_and(|b| b & (1 << (k % 8)) != 0)
        })
        .collect())
}
