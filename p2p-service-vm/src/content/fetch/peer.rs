//! Talking to one provider before a download starts: opening a content
//! stream (finding and dialling the peer if needed) and getting a manifest
//! whose signature and claimed size are proven.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use p2pvm_content::transfer::{self, Op, Status, TransferRequest, TransferResponse};
use p2pvm_content::{ContentId, block_count};
use p2pvm_security::{DrmChecker, DrmError, EventKind, GroupId};
use tracing::{debug, warn};

use crate::content::ContentEvent;
use crate::content::error::{ProviderError, Unavailable, VerifyError};
use crate::content::wire::{Duplex, read_msg, read_payload, write_msg};
use crate::content::{ContentService, ContentServiceError, VerifiedManifest};
use crate::node::Command;
use crate::report::chain;
use p2pvm_security::sealed::{SealedReader, SealedWriter};

/// Time allowed to open a stream (including finding and dialling the peer).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one provider may take over a manifest exchange: the manifest
/// (at most 16 KiB), the DRM checks and the proof of the item's size.
/// A provider that opens the stream and goes silent must not hold up a
/// download, a stat, or a compute job waiting for its inputs.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a single request/response exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a provider may take to start answering a manifest request once
/// it has it (its server answers `Busy` within 5 s when overloaded).
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause before asking a provider again after a transport failure.
const TRANSPORT_RETRY_PAUSE: Duration = Duration::from_millis(250);

fn protocol() -> StreamProtocol {
    StreamProtocol::new(transfer::PROTOCOL)
}

/// Opens a content stream to `peer`, finding and dialling it through the DHT
/// when no connection exists yet.
pub(crate) async fn open_stream(
    svc: &ContentService,
    peer: PeerId,
) -> Result<libp2p::Stream, ProviderError> {
    open_protocol(svc, peer, protocol()).await
}

/// Opens a stream of `protocol` to `peer`, dialling it through the DHT when
/// no connection exists yet.
pub(crate) async fn open_protocol(
    svc: &ContentService,
    peer: PeerId,
    protocol: StreamProtocol,
) -> Result<libp2p::Stream, ProviderError> {
    let mut control = svc.inner.ctx.node.stream_control();
    let first =
        tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, protocol.clone())).await;
    match first {
        Ok(Ok(s)) => return Ok(s),
        Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
            return Err(ProviderError::Unsupported);
        }
        _ => {}
    }
    let node = &svc.inner.ctx.node;
    let found = node
        .call_timeout(OPEN_TIMEOUT, |reply| Command::FindPeer(peer, reply))
        .await
        .map_err(ProviderError::Unreachable)?;
    node.call_timeout(OPEN_TIMEOUT, |reply| Command::Connect {
        peer: Some(peer),
        addrs: found.addrs,
        reply,
    })
    .await
    .map_err(ProviderError::Unreachable)?;
    tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, protocol))
        .await
        .map_err(|_| ProviderError::OpenTimedOut)?
        .map_err(ProviderError::OpenStream)
}

/// Connected peers asked at once whether they hold an item.
const NEIGHBOURS_ASKED: usize = 32;
/// How long a connected peer may take to say whether it holds an item.
const NEIGHBOUR_TIMEOUT: Duration = Duration::from_secs(3);

/// Connected peers that say they hold `id`, whole or in part, and announce
/// it (or hold it for a group: a refusal that names the group). Where a lookup turns when the DHT knows no provider yet, as
/// Bitswap asks its neighbours: the records of an item published a moment
/// ago, or before its publisher had peers, may sit only with the publisher,
/// which is often a peer we are connected to (our bootstrap node, say).
pub(crate) async fn neighbours_holding(svc: &ContentService, id: &ContentId) -> Vec<PeerId> {
    use futures::StreamExt;
    let peers = svc
        .inner
        .ctx
        .node
        .call_timeout(OPEN_TIMEOUT, Command::Peers)
        .await
        .unwrap_or_default();
    let asked = peers
        .into_iter()
        .map(|p| p.peer_id)
        .filter(|p| svc.standing(p) < p2pvm_security::Standing::Refused)
        .take(NEIGHBOURS_ASKED);
    futures::stream::iter(asked)
        .map(|peer| async move {
            let holds = tokio::time::timeout(NEIGHBOUR_TIMEOUT, holds(svc, id, peer)).await;
            matches!(holds, Ok(Ok(true))).then_some(peer)
        })
        .buffer_unordered(8)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// Whether a connected `peer` says it holds `id`.
async fn holds(svc: &ContentService, id: &ContentId, peer: PeerId) -> std::io::Result<bool> {
    let mut stream = svc
        .inner
        .ctx
        .node
        .stream_control()
        .open_stream(peer, protocol())
        .await
        .map_err(std::io::Error::other)?;
    request(&mut stream, Op::Holds(id.0.to_vec())).await?;
    let header = response(&mut stream).await?;
    let _ = stream.close().await;
    Ok([Status::Complete, Status::Ok, Status::Forbidden]
        .iter()
        .any(|s| header.status == *s as i32))
}

/// Sends one request.
pub(super) async fn request(stream: &mut (impl AsyncWrite + Unpin), op: Op) -> std::io::Result<()> {
    write_msg(stream, &TransferRequest { op: Some(op) }).await?;
    stream.flush().await
}

/// Reads one answer's header.
pub(super) async fn response(
    stream: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<TransferResponse> {
    read_msg(stream)
        .await?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "stream closed"))
}

/// A manifest whose size a provider proved, with the proof (see
/// [`p2pvm_content::size_proof`]; empty for an empty item). A download keeps
/// it, so a peer that finds it through the DHT while it is still downloading
/// can have the size proven by it in turn.
pub(crate) struct Proven {
    pub manifest: VerifiedManifest,
    pub size_proof: Vec<u8>,
}

/// Providers asked for a manifest at once: one silent or lying provider
/// then costs a download no time, and several in a row no answer (a swarm
/// with 10 bad peers of 25 lost downloads that asked 8 bad ones in turn).
const MANIFEST_PARALLEL: usize = 4;
/// Providers asked in all before a manifest request gives up.
pub(crate) const MANIFEST_ASKED: usize = 16;

/// Asks providers for the manifest of `id`, a few at a time, until one
/// verifies. A provider that failed in transport (a connection closing
/// under a simultaneous dial, say) is asked once more after a pause before
/// the lookup gives up.
pub(crate) async fn manifest_from(
    svc: &ContentService,
    id: &ContentId,
    providers: &[PeerId],
) -> Result<Proven, ContentServiceError> {
    let mut last = ContentServiceError::NotFound(*id);
    let mut again = Vec::new();
    let failed = |peer: PeerId, e: ProviderError| -> ContentServiceError {
        match e {
            ProviderError::Manifest(v) => v.into(),
            ProviderError::Drm(d) => d.into(),
            ProviderError::Forbidden { code, message } => ContentServiceError::DrmRefused {
                peer,
                code,
                message,
            },
            ProviderError::Local(e) => e,
            e => Unavailable::Provider {
                peer,
                source: Arc::new(e),
            }
            .into(),
        }
    };
    let once = |peer: PeerId| async move {
        tokio::time::timeout(MANIFEST_TIMEOUT, manifest_once(svc, id, peer))
            .await
            .unwrap_or(Err(ProviderError::NoAnswer))
    };
    let ask = |peer: PeerId| async move { (peer, once(peer).await) };
    let mut queue = providers.iter().take(MANIFEST_ASKED).copied();
    let mut asking = futures::stream::FuturesUnordered::new();
    for peer in queue.by_ref().take(MANIFEST_PARALLEL) {
        asking.push(ask(peer));
    }
    while let Some((peer, answer)) = futures::StreamExt::next(&mut asking).await {
        match answer {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => {
                // Asking a peer that sat silent through the whole exchange
                // again would only double the wait.
                if e.transient() && !matches!(e, ProviderError::NoAnswer) {
                    again.push(peer);
                }
                last = failed(peer, e);
            }
        }
        if let Some(next) = queue.next() {
            asking.push(ask(next));
        }
    }
    if !again.is_empty() {
        tokio::time::sleep(TRANSPORT_RETRY_PAUSE).await;
        for peer in again {
            match once(peer).await {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => last = failed(peer, e),
            }
        }
    }
    Err(last)
}

/// One provider's answer: its verified manifest, `None` if it does not hold
/// the item, or why it could not be used.
async fn manifest_once(
    svc: &ContentService,
    id: &ContentId,
    peer: PeerId,
) -> Result<Option<Proven>, ProviderError> {
    let mut stream = open_stream(svc, peer).await?;
    // The size proof is asked with the manifest, one round trip for both
    // (a viewer waits on each); its answer is read once the manifest
    // verifies, and left unread with the stream otherwise.
    write_msg(
        &mut stream,
        &TransferRequest {
            op: Some(Op::Manifest(id.0.to_vec())),
        },
    )
    .await?;
    request(&mut stream, Op::SizeProof(id.0.to_vec())).await?;
    let header = match tokio::time::timeout(HEADER_TIMEOUT, response(&mut stream)).await {
        Ok(header) => header?,
        Err(_) => {
            // It took the request and sent nothing back: slow or silent, its
            // record says once the stream has been watched a while longer.
            // (The time to reach it, and what comes after its answer, is not
            // on its record.)
            super::silence::judge(svc, peer, stream);
            return Err(ProviderError::NoAnswer);
        }
    };
    // A group item: asked again in a group session of a group it names.
    if header.status == Status::Forbidden as i32
        && DrmError::code_in(&header.message) == Some("DRM_NOT_GROUP_MEMBER")
    {
        let ours = svc.memberships_named(&header.message);
        debug!(%peer, %id, groups = ours.len(), "a group item: asking in a group session");
        let mut last = forbidden(header.message);
        for group in ours {
            match group_session(svc, peer, group, header.fast_path_port).await {
                Ok(mut session) => {
                    request(&mut session, Op::Manifest(id.0.to_vec())).await?;
                    let header = response(&mut session).await?;
                    return manifest_answer(svc, id, peer, &mut session, header, false).await;
                }
                Err(e) => last = e,
            }
        }
        return Err(last);
    }
    manifest_answer(svc, id, peer, &mut stream, header, true).await
}

/// A provider's answer to a manifest request on `stream`: the manifest,
/// verified, accepted by the DRM checker and its size proven (`proof_asked`:
/// the size proof was asked with the manifest; its answer is next).
async fn manifest_answer(
    svc: &ContentService,
    id: &ContentId,
    peer: PeerId,
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    header: TransferResponse,
    proof_asked: bool,
) -> Result<Option<Proven>, ProviderError> {
    if header.status == Status::Forbidden as i32 {
        return Err(forbidden(header.message));
    }
    if header.status == Status::TooManyStreams as i32 {
        return Err(ProviderError::StreamsFull(header.message));
    }
    if header.status != Status::Ok as i32 {
        return Ok(None);
    }
    let bytes = read_payload(
        stream,
        header.payload_len,
        transfer::MAX_HEADER_BYTES as u64,
    )
    .await?;
    let m = match VerifiedManifest::parse(&bytes) {
        Ok(m) if m.id == *id => m,
        Ok(_) => {
            warn!(%peer, %id, "peer sent a manifest for another item");
            return Err(ProviderError::Manifest(VerifyError::WrongItem));
        }
        Err(e) => {
            warn!(%peer, %id, error = %chain(&e), "peer sent a forged manifest");
            let e = ProviderError::Drm(DrmError::ForgedManifest(chain(&e)));
            record_drm(svc, peer, &e);
            return Err(e);
        }
    };
    // The DRM checker, before anything is sized or fetched by this manifest.
    match svc.drm_accept(&m, &peer) {
        Ok(_) => svc.inner.ctx.ledger.record(peer, EventKind::DrmPassed),
        Err(e) if DrmChecker::provider_at_fault(&e, crate::content::now_unix()) => {
            warn!(%peer, %id, error = %chain(&e), "provider served what it must not");
            let e = ProviderError::Drm(e);
            record_drm(svc, peer, &e);
            return Err(e);
        }
        Err(e) => {
            debug!(%peer, %id, error = %chain(&e), "refusing the item: DRM policy");
            return Err(ProviderError::Local(e.into()));
        }
    }
    match prove_size(svc, stream, &m, proof_asked).await {
        Ok(size_proof) => Ok(Some(Proven {
            manifest: m,
            size_proof,
        })),
        Err(e) => Err(size_unproven(svc, peer, &m, e)),
    }
}

/// Logs why `peer` could not prove `m`'s size and records its evidence.
fn size_unproven(
    svc: &ContentService,
    peer: PeerId,
    m: &VerifiedManifest,
    e: ProviderError,
) -> ProviderError {
    let id = m.id;
    warn!(%peer, %id, error = %chain(&e), "manifest size not proven; ignoring it");
    if let Some(evidence) = e.evidence() {
        svc.inner.ctx.ledger.record(peer, evidence);
    }
    if let ProviderError::Manifest(VerifyError::SizeProof(_)) = &e {
        svc.emit(ContentEvent::CorruptData {
            peer,
            id,
            block: block_count(m.manifest.size).saturating_sub(1),
        });
    }
    e
}

/// The IP address our libp2p connection to `peer` dials, where its fast
/// path listens too.
pub(super) async fn remote_ip(svc: &ContentService, peer: PeerId) -> Option<std::net::IpAddr> {
    let remote = svc
        .inner
        .ctx
        .node
        .call(|reply| Command::RemoteAddr(peer, reply))
        .await
        .ok()
        .flatten()?;
    crate::content::fastpath::ip_of(&remote)
}

/// A group session of `group` with `peer`, on its fast path at `port` (as
/// its answers give it): mutual TLS with both ends' member certificates,
/// then the content protocol, as on any fast-path connection.
pub(crate) async fn group_session(
    svc: &ContentService,
    peer: PeerId,
    group: GroupId,
    port: u32,
) -> Result<Duplex<SealedReader, SealedWriter>, ProviderError> {
    let fast = svc.inner.fast_path.as_ref().ok_or_else(|| {
        ProviderError::Open("group sessions run on the content fast path, which is off here".into())
    })?;
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ProviderError::Open("the provider offers no group sessions".into()))?;
    let ip = remote_ip(svc, peer)
        .await
        .ok_or_else(|| ProviderError::Open("no address of the provider".into()))?;
    match fast
        .dial_group(peer, std::net::SocketAddr::new(ip, port), group)
        .await
    {
        Ok((rd, wr)) => Ok(Duplex(rd, wr)),
        Err(e) => Err(session_failed(group, e)),
    }
}

/// Why a group session could not be opened: the provider refusing our
/// member certificate is a DRM refusal, named as TLS reported it.
fn session_failed(group: GroupId, e: std::io::Error) -> ProviderError {
    use rustls::AlertDescription as A;
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let why = match tls {
        Some(rustls::Error::AlertReceived(a)) => match a {
            A::CertificateRevoked => "our member certificate is revoked",
            A::CertificateExpired => "our member certificate expired or is not valid yet",
            A::UnknownCA => "our member certificate is not of the group's CA",
            _ => "the provider refused our member certificate",
        },
        Some(rustls::Error::InvalidCertificate(c)) => {
            return ProviderError::Open(format!(
                "the provider is not a current member of group {group}: {c:?}"
            ));
        }
        _ => return ProviderError::Open(format!("group session: {e}")),
    };
    forbidden(format!(
        "DRM_NOT_GROUP_MEMBER: no session in group {group}: {why} ({e})"
    ))
}

/// One request and its answer (payload at most `max` bytes).
pub(crate) async fn request_response(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    op: Op,
    max: u64,
) -> std::io::Result<(TransferResponse, Vec<u8>)> {
    let exchange = async {
        request(stream, op).await?;
        let header = response(stream).await?;
        let payload = read_payload(stream, header.payload_len, max).await?;
        Ok((header, payload))
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer did not answer in time",
            ))
        })
}

/// A provider's DRM refusal, with the check it names.
pub(super) fn forbidden(message: String) -> ProviderError {
    ProviderError::Forbidden {
        code: DrmError::code_in(&message).unwrap_or("DRM_REFUSED"),
        message,
    }
}

/// Puts a DRM failure on the provider's record.
fn record_drm(svc: &ContentService, peer: PeerId, e: &ProviderError) {
    if let Some(evidence) = e.evidence() {
        svc.inner.ctx.ledger.record(peer, evidence);
    }
}

/// Anyone can sign a manifest for any id, so its size is checked before it
/// sizes anything: within the configured bound, and proven by the path to the
/// item's last chunk, whose shape commits to the length (see
/// [`p2pvm_content::size_proof`]). Returns the verified proof.
async fn prove_size(
    svc: &ContentService,
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    m: &VerifiedManifest,
    asked: bool,
) -> Result<Vec<u8>, ProviderError> {
    let size = m.manifest.size;
    let max = svc.inner.config.max_item_bytes;
    if size > max {
        return Err(ProviderError::Manifest(VerifyError::TooLarge { size, max }));
    }
    if size == 0 {
        return if m.id == ContentId::from(blake3::hash(b"")) {
            Ok(Vec::new())
        } else {
            Err(ProviderError::Manifest(VerifyError::NotEmpty))
        };
    }
    if !asked {
        request(stream, Op::SizeProof(m.id.0.to_vec())).await?;
    }
    let header = response(stream).await?;
    if header.status != Status::Ok as i32 {
        return Err(ProviderError::SizeUnproven(header.message));
    }
    let proof = read_payload(stream, header.payload_len, transfer::size_proof_wire(size)).await?;
    // A couple of KiB to hash: no blocking thread needed.
    p2pvm_content::size_proof::verify(m.id, size, &proof)
        .map(|()| proof)
        .map_err(|e| ProviderError::Manifest(VerifyError::SizeProof(Arc::new(e))))
}
