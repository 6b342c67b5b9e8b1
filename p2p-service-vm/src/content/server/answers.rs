//! The answer to one request: a block (proof, then bytes), the size proof,
//! what this node holds (`Have`), a manifest, search hits, a group's topic
//! key; each after the access policy's say and within the item's limits.

use libp2p::PeerId;
use p2pvm_content::transfer::{self, Op, Status, TransferRequest, TransferResponse};
use p2pvm_content::{ContentId, block_count};
use p2pvm_security::GroupId;
use prost::Message;
use tracing::{debug, warn};

use crate::content::ContentService;
use crate::content::limits::SEARCHES_PER_SEC;
use crate::report::chain;

/// Most search hits one provider returns.
pub(super) const MAX_HITS: usize = 100;

pub(super) fn failed(status: Status, msg: impl Into<String>) -> (TransferResponse, Vec<u8>) {
    (TransferResponse::failed(status, msg), Vec::new())
}

pub(super) fn parse_id(bytes: &[u8]) -> Option<ContentId> {
    Some(ContentId(bytes.try_into().ok()?))
}

/// A block of a stored item or of a download in progress (reads the disk:
/// called on a blocking thread).
pub(super) fn answer_block(
    svc: &ContentService,
    peer: &PeerId,
    b: &transfer::BlockRequest,
) -> (TransferResponse, Vec<u8>) {
    let store = &svc.inner.ctx.store;
    let Some(id) = parse_id(&b.content_id) else {
        return failed(Status::BadRequest, "content id must be 32 bytes");
    };
    let busy = || {
        !svc.inner
            .upload_slots
            .admit(*peer, std::time::Instant::now())
    };
    match store.get(&id) {
        Ok(Some(info)) => {
            if b.block >= block_count(info.size) {
                return failed(Status::BadRequest, "block beyond the end");
            }
            if busy() {
                return failed(Status::Busy, "all upload slots are taken");
            }
            match store.encode_block(&id, b.block, svc.inner.config.verify_on_serve) {
                Ok(wire) => (TransferResponse::ok(wire.len() as u64), wire),
                Err(e) => {
                    warn!(%id, block = b.block, error = %chain(&e), "cannot serve a stored block");
                    failed(Status::Unavailable, "local read failed")
                }
            }
        }
        Ok(None) => {
            let dl = svc.inner.downloads.lock().expect("lock").get(&id).cloned();
            let Some(dl) = dl else {
                return failed(Status::NotFound, "unknown content");
            };
            if b.block >= dl.partial.blocks() {
                return failed(Status::BadRequest, "block beyond the end");
            }
            if !dl.partial.has(b.block) {
                return failed(Status::NotHeld, "not downloaded yet");
            }
            if busy() {
                return failed(Status::Busy, "all upload slots are taken");
            }
            match dl.partial.encode_block(b.block) {
                Ok(wire) => (TransferResponse::ok(wire.len() as u64), wire),
                Err(_) => failed(Status::Unavailable, "local read failed"),
            }
        }
        Err(e) => {
            warn!(error = %chain(&e), "store lookup failed");
            failed(Status::Unavailable, "local error")
        }
    }
}

/// The proof of an item's size: derived from the last block of a stored
/// item, and for a download the proof it started with (it may not hold the
/// last block yet). Not subject to upload slots: it is a couple of KiB, and a
/// newcomer cannot start without it.
pub(super) fn answer_size_proof(
    svc: &ContentService,
    id: &ContentId,
) -> (TransferResponse, Vec<u8>) {
    let validate = svc.inner.config.verify_on_serve;
    match svc.inner.ctx.store.size_proof(id, validate) {
        Ok(proof) => return (TransferResponse::ok(proof.len() as u64), proof),
        Err(p2pvm_content::StoreError::NotFound(_)) => {}
        Err(e) => {
            warn!(%id, error = %chain(&e), "cannot prove a stored item's size");
            return failed(Status::Unavailable, "local read failed");
        }
    }
    let dl = svc.inner.downloads.lock().expect("lock").get(id).cloned();
    match dl {
        Some(dl) => (
            TransferResponse::ok(dl.size_proof.len() as u64),
            dl.size_proof.clone(),
        ),
        None => failed(Status::NotFound, "unknown content"),
    }
}

/// What a neighbour is told about `id`: `Complete` or `Ok` (part of it)
/// if this node holds it and announces it, else nothing.
pub(super) fn holds(svc: &ContentService, id: &ContentId) -> Option<Status> {
    if let Ok(Some(signed)) = svc.inner.ctx.store.manifest(id) {
        let m = crate::content::VerifiedManifest::parse(&signed).ok()?;
        return svc.may_announce(&m.manifest).then_some(Status::Complete);
    }
    let dl = svc.inner.downloads.lock().expect("lock").get(id).cloned()?;
    (dl.keep() && svc.may_announce(&dl.manifest.manifest)).then_some(Status::Ok)
}

/// The item a request is about, if it names one.
pub(super) fn item_of(op: &Op) -> Option<&[u8]> {
    match op {
        Op::Block(b) => Some(&b.content_id),
        Op::Manifest(id) | Op::Have(id) | Op::Holds(id) | Op::SizeProof(id) => Some(id),
        Op::Search(_) | Op::GroupKey(_) => None,
    }
}

/// One answer (reads the disk and hashes: called on a blocking thread).
pub(super) fn answer(
    svc: &ContentService,
    peer: &PeerId,
    group: Option<GroupId>,
    req: TransferRequest,
) -> (TransferResponse, Vec<u8>) {
    let (mut header, payload) = answer_op(svc, peer, group, req);
    // A refusal says where a group session can be opened: a member asks
    // again there.
    if header.status == Status::Forbidden as i32 {
        header.fast_path_port = u32::from(svc.fast_path_port().unwrap_or(0));
    }
    (header, payload)
}

pub(super) fn answer_op(
    svc: &ContentService,
    peer: &PeerId,
    group: Option<GroupId>,
    req: TransferRequest,
) -> (TransferResponse, Vec<u8>) {
    // The DRM checker first: nothing of an item (not even whether we hold
    // it) goes to a peer it may not be served to.
    if let Some(id) = req.op.as_ref().and_then(item_of).and_then(parse_id)
        && let Some(Err(e)) = svc.drm_serve(&id, peer, group)
    {
        debug!(%peer, %id, error = %chain(&e), "not serving: DRM");
        return failed(Status::Forbidden, e.to_string());
    }
    let store = &svc.inner.ctx.store;
    match req.op {
        Some(Op::Block(b)) => answer_block(svc, peer, &b),
        Some(Op::Manifest(id)) => {
            let Some(id) = parse_id(&id) else {
                return failed(Status::BadRequest, "content id must be 32 bytes");
            };
            let stored = store.manifest(&id).ok().flatten();
            let m = stored.or_else(|| {
                let dl = svc.inner.downloads.lock().expect("lock").get(&id).cloned();
                dl.map(|d| d.manifest.signed.clone())
            });
            match m {
                Some(m) => (TransferResponse::ok(m.len() as u64), m),
                None => failed(Status::NotFound, "unknown content"),
            }
        }
        Some(Op::Have(id)) => {
            let Some(id) = parse_id(&id) else {
                return failed(Status::BadRequest, "content id must be 32 bytes");
            };
            let fast_path_port = u32::from(svc.fast_path_port().unwrap_or(0));
            if matches!(store.get(&id), Ok(Some(_))) {
                let mut r = TransferResponse::failed(Status::Complete, "");
                r.fast_path_port = fast_path_port;
                return (r, Vec::new());
            }
            let dl = svc.inner.downloads.lock().expect("lock").get(&id).cloned();
            match dl {
                Some(d) => {
                    d.asked_by(*peer);
                    let bits = d.partial.bitfield();
                    let mut r = TransferResponse::ok(bits.len() as u64);
                    r.fast_path_port = fast_path_port;
                    (r, bits)
                }
                None => failed(Status::NotFound, "unknown content"),
            }
        }
        Some(Op::SizeProof(id)) => match parse_id(&id) {
            Some(id) => answer_size_proof(svc, &id),
            None => failed(Status::BadRequest, "content id must be 32 bytes"),
        },
        Some(Op::Holds(id)) => {
            let Some(id) = parse_id(&id) else {
                return failed(Status::BadRequest, "content id must be 32 bytes");
            };
            match holds(svc, &id) {
                Some(status) => failed(status, ""),
                None => failed(Status::NotFound, "unknown content"),
            }
        }
        Some(Op::Search(s)) => {
            if !svc.inner.search_limits.allow(peer) {
                return failed(
                    Status::Unavailable,
                    format!("too many searches: {SEARCHES_PER_SEC} a second at most"),
                );
            }
            if s.keywords.len() > 16 || s.keywords.iter().any(|w| w.len() > 64) {
                return failed(Status::BadRequest, "1-16 keywords of at most 64 bytes");
            }
            // Words as a local query has them: lower-cased, two characters
            // or more (an empty or one-letter prefix matches nearly all).
            let words = p2pvm_content::keywords::query_keywords(&s.keywords.join(" "));
            if words.is_empty() || words.len() > 16 {
                return failed(
                    Status::BadRequest,
                    "1-16 keywords of two or more letters or digits",
                );
            }
            let limit = (s.limit as usize).clamp(1, MAX_HITS);
            // The store's word index: only items under the query's longest
            // word are decoded (manifests were verified when stored).
            let found = store
                .search(&words, limit, |_, m| svc.drm_may_list(m, peer, group))
                .unwrap_or_default();
            let mut hits = transfer::SearchHits::default();
            let mut size = 0;
            for (_, signed) in found {
                size += signed.len();
                if size as u64 > transfer::MAX_PAYLOAD_BYTES / 2 {
                    break;
                }
                hits.manifests.push(signed);
            }
            let bytes = hits.encode_to_vec();
            (TransferResponse::ok(bytes.len() as u64), bytes)
        }
        Some(Op::GroupKey(r)) => match svc.answer_group_key(peer, group, &r) {
            Ok(key) => (TransferResponse::ok(key.len() as u64), key),
            Err(why) => failed(Status::Forbidden, why.to_string()),
        },
        None => failed(Status::BadRequest, "empty request"),
    }
}
