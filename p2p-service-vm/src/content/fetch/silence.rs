//! Telling a silent provider from a slow one.
//!
//! A downloader gives a provider [`ANSWER_TIMEOUT`](super::worker) to answer
//! the first request of a stream, then moves on: the slot and the blocks are
//! worth more elsewhere. What goes on the provider's record is decided later.
//! A silent peer (hung, or holding streams on purpose) never answers, and one
//! such episode refuses a stranger. An honest node answers eventually, even on
//! a starved machine, on a thin uplink behind other answers, or while its
//! serving permits are held; charging it as silent refused honest nodes in a
//! loaded 25-node swarm after a single late answer. So the stream is kept and
//! watched for [`LATE_GRACE`] more: any answer in that time is a late one
//! (a failed request, the mild charge a provider that stops answering gets),
//! and nothing at all is silence.

use futures::{AsyncRead, AsyncReadExt};
use libp2p::PeerId;
use p2pvm_security::EventKind;
use std::time::Duration;

use crate::content::ContentService;

/// How much longer than its answer timeout a provider has to show it is
/// slow and not silent. A silent peer is refused this much later than it
/// would be at once; the downloader does not wait for it meanwhile.
pub(crate) const LATE_GRACE: Duration = Duration::from_secs(30);

/// Watches `stream`, whose request `peer` left unanswered for the whole
/// answer timeout, and puts the verdict on `peer`'s record.
pub(crate) fn judge<S>(svc: &ContentService, peer: PeerId, stream: S)
where
    S: AsyncRead + Unpin + Send + 'static,
{
    let ledger = svc.inner.ctx.ledger.clone();
    let shutdown = svc.inner.ctx.shutdown.clone();
    svc.spawn(async move {
        let evidence = tokio::select! {
            e = verdict(stream, LATE_GRACE) => e,
            // Our own shutdown says nothing about the peer.
            _ = shutdown.cancelled() => return,
        };
        tracing::debug!(%peer, ?evidence, "late-answer watch ended");
        ledger.record(peer, evidence);
    });
}

/// What a stream whose answer is overdue shows within `grace`: a late answer
/// (any byte of it) is a failed request; nothing, or the stream's end without
/// a byte, is an unanswered one.
pub(crate) async fn verdict<S: AsyncRead + Unpin>(mut stream: S, grace: Duration) -> EventKind {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(grace, stream.read(&mut byte)).await {
        Ok(Ok(n)) if n > 0 => EventKind::RequestFailed,
        _ => EventKind::Unanswered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_util::compat::TokioAsyncReadCompatExt;

    #[tokio::test(start_paused = true)]
    async fn an_answer_within_the_grace_is_late_not_silent() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            theirs.write_all(b"\x00\x00\x00\x02ok").await.unwrap();
            theirs
        });
        let e = verdict(ours.compat(), Duration::from_secs(30)).await;
        assert!(matches!(e, EventKind::RequestFailed), "{e:?}");
        drop(answer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_within_the_grace_is_silence() {
        let (ours, theirs) = tokio::io::duplex(64);
        let e = verdict(ours.compat(), Duration::from_secs(30)).await;
        assert!(matches!(e, EventKind::Unanswered), "{e:?}");
        drop(theirs);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_closed_without_an_answer_is_silence() {
        let (ours, theirs) = tokio::io::duplex(64);
        drop(theirs);
        let e = verdict(ours.compat(), Duration::from_secs(30)).await;
        assert!(matches!(e, EventKind::Unanswered), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_after_the_grace_is_too_late() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(31)).await;
            let _ = theirs.write_all(b"late").await;
        });
        let e = verdict(ours.compat(), Duration::from_secs(30)).await;
        assert!(matches!(e, EventKind::Unanswered), "{e:?}");
        answer.await.unwrap();
    }
}
