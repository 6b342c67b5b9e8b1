//! Content sharing through the API: publishing (from a path the node reads,
//! or from bytes the app writes on a stream), fetching verified bytes (as
//! stream frames or, parked under a ticket, through a bulk attachment,
//! [`crate::api::bulk`]), and downloading, searching, listing, pinning and
//! deleting items.
//!
//! ```text
//!  publish: app ─ StreamData ─► stream ─► pipe ─► EndChecked ─► ContentService::publish
//!           ContentPublishFinish ─► waits for the import's result ─► app
//!  fetch:   ContentService::fetch ─ Internal::ContentOpened ─┬─► stream ─► app
//!                                                            └─► bulk ticket
//! ```
//!
//! The path form of publish and the other operations need no session state:
//! they are the stateless `run` below.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use p2pvm_content::ContentId;
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::api::apps::Principal;
use crate::api::session::internal::{ContentBytes, Internal};
use crate::api::session::{Session, response};
use crate::api::{ApiError, ApiService};
use crate::content::{ContentInfo, ContentService, PublishMeta};

/// Buffer between an app's publish stream and the import.
const PUBLISH_PIPE_BYTES: usize = 256 * 1024;

/// The bytes of a publish stream: its end is the item's end only when the app
/// half-closed the stream; otherwise (reset, session gone) reading fails and
/// the import is abandoned.
struct EndChecked<R> {
    inner: R,
    ended: Arc<AtomicBool>,
}

impl<R: std::io::Read> std::io::Read for EndChecked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.ended.load(Ordering::Acquire) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the publish stream was reset before it was closed",
            ));
        }
        Ok(n)
    }
}

impl Session {
    /// Starts a publish from a byte stream: the app writes the bytes on the
    /// returned stream; the import runs as they arrive.
    pub(in crate::api) async fn content_publish(
        &mut self,
        request_id: u64,
        r: pb::ContentPublishRequest,
    ) -> Result<(), ApiError> {
        let content = self.svc.content().clone();
        let meta = publish_meta(&r)?;
        if !self.stream_slots_left() {
            return Err(self.stream_limit());
        }
        let (app_side, node_side) = tokio::io::duplex(PUBLISH_PIPE_BYTES);
        let (_, app_writes) = tokio::io::split(app_side);
        // Write-only for the app: the stream's node → app direction ends at once.
        let stream = tokio::io::join(tokio::io::empty(), app_writes).compat();
        let stream_id = self.streams.next_id();
        let opened = pb::StreamOpened { stream_id };
        self.reply(request_id, Ok(pb::response::Result::StreamOpened(opened)))
            .await;
        self.add_stream(stream_id, stream, "ContentPublish");
        let (tx, ended) = self.publishes.start(stream_id);
        self.svc.spawn(async move {
            let reader = EndChecked {
                inner: tokio_util::io::SyncIoBridge::new(node_side),
                ended,
            };
            let r = content
                .publish(reader, meta)
                .await
                .map(|i| content_info(&content, i))
                .map_err(ApiError::from);
            let _ = tx.send(r);
        });
        Ok(())
    }

    /// Answers `request_id` with the result of the publish on `stream_id` once
    /// its import ends, without holding up the session meanwhile.
    pub(in crate::api) fn content_publish_finish(
        &mut self,
        request_id: u64,
        stream_id: u64,
    ) -> Result<(), ApiError> {
        let Some(rx) = self.publishes.take_result(stream_id) else {
            return Err(ApiError::new(
                pb::ErrorCode::NotFound,
                "no publish on that stream in this session",
            ));
        };
        let out = self.out.clone();
        self.svc.spawn(async move {
            let r = match rx.await {
                Ok(r) => r.map(pb::response::Result::Content),
                Err(_) => Err(ApiError::new(
                    pb::ErrorCode::Unavailable,
                    "the publish was aborted",
                )),
            };
            let _ = out.send(response(request_id, r)).await;
        });
        Ok(())
    }

    /// Starts streaming verified bytes; answered with `ContentStream` once the
    /// item is found.
    pub(in crate::api) fn content_fetch(
        &mut self,
        request_id: u64,
        r: pb::ContentFetchRequest,
    ) -> Result<(), ApiError> {
        let content = self.svc.content().clone();
        let id = parse_content_id(&r.content_id)?;
        if !self.stream_slots_left() {
            return Err(self.stream_limit());
        }
        let range = if r.offset == 0 && r.length == 0 {
            None
        } else {
            Some((r.offset, r.length))
        };
        let stream_id = self.streams.begin_open();
        let tx = self.internal_tx.clone();
        let bulk = r.bulk;
        self.svc.spawn(async move {
            let result = open_fetch(&content, &id, range, !r.no_keep, stream_id).await;
            let _ = tx
                .send(Internal::ContentOpened {
                    request_id,
                    stream_id,
                    bulk,
                    result,
                })
                .await;
        });
        Ok(())
    }

    /// A fetch found its item (or failed to): answer, and start the bytes.
    pub(in crate::api) async fn on_content_opened(
        &mut self,
        request_id: u64,
        stream_id: u64,
        bulk: bool,
        result: Result<(pb::ContentStream, ContentBytes), ApiError>,
    ) {
        self.streams.open_done();
        if bulk {
            let parked = result.and_then(|(opened, bytes)| self.park(opened, bytes));
            self.reply(request_id, parked).await;
            return;
        }
        match result {
            Ok((opened, bytes)) => {
                // Answer first: the bytes start flowing as soon as the
                // copy task runs, and must not overtake the answer.
                self.reply(request_id, Ok(pb::response::Result::ContentStream(opened)))
                    .await;
                let reader = tokio_util::io::StreamReader::new(bytes.0);
                let stream = tokio::io::join(reader, tokio::io::sink()).compat();
                self.add_stream(stream_id, stream, "ContentFetch");
                // The app sends nothing on a fetch stream; end that direction now.
                self.streams.half_close(stream_id);
            }
            Err(e) => self.reply(request_id, Err(e)).await,
        }
    }

    /// Parks a fetch's bytes for a bulk attachment; the answer carries the
    /// ticket instead of a stream id.
    fn park(
        &self,
        mut opened: pb::ContentStream,
        bytes: ContentBytes,
    ) -> Result<pb::response::Result, ApiError> {
        let max = self.svc.inner.limits.max_streams_per_session as usize;
        let inner = &self.svc.inner;
        let ticket =
            inner
                .bulk
                .park(self.id, bytes, max, (&inner.ctx.tasks, &inner.ctx.shutdown))?;
        opened.stream_id = 0;
        opened.bulk_ticket = bytes::Bytes::copy_from_slice(&ticket);
        Ok(pb::response::Result::ContentStream(opened))
    }
}

/// Finds item `id` and opens its bytes over `range` (offset, length; a zero
/// length runs to the item's end, which needs its size first).
async fn open_fetch(
    content: &crate::content::ContentService,
    id: &p2pvm_content::ContentId,
    range: Option<(u64, u64)>,
    keep: bool,
    stream_id: u64,
) -> Result<(pb::ContentStream, ContentBytes), ApiError> {
    let range = match range {
        None => None,
        Some((offset, 0)) => {
            let info = content.stat(id).await?;
            Some(offset..info.manifest.manifest.size)
        }
        Some((offset, len)) => Some(offset..offset.saturating_add(len)),
    };
    let (info, range, bytes) = content.fetch(id, range, keep).await?;
    let opened = pb::ContentStream {
        stream_id,
        info: Some(content_info(content, info)),
        offset: range.start,
        length: range.end - range.start,
        bulk_ticket: bytes::Bytes::new(),
    };
    Ok((opened, ContentBytes(Box::pin(bytes))))
}

pub(crate) fn parse_content_id(s: &str) -> Result<ContentId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad(format!("invalid content id {s:?} (64 hex digits)")))
}

pub(crate) fn publish_meta(r: &pb::ContentPublishRequest) -> Result<PublishMeta, ApiError> {
    Ok(PublishMeta {
        name: r.name.clone(),
        mime_type: r.mime_type.clone(),
        tags: r.tags.clone(),
        rights: r.rights.as_ref().map(|x| p2pvm_content::Rights {
            licence: x.licence.clone(),
            redistribution_allowed: x.redistribution_allowed,
            expires_unix: x.expires_unix,
            allowed_groups: x.allowed_groups.clone(),
        }),
        pin: r.pin,
    })
}

pub(crate) fn content_info(c: &ContentService, i: ContentInfo) -> pb::ContentInfo {
    use p2pvm_security::Certification;
    let (certification, certified_by, certified_subject) = match c
        .certification(&i.manifest.manifest)
    {
        Ok(Certification::SelfSigned) => ("self-signed".to_string(), String::new(), String::new()),
        Ok(Certification::Certified { subject, issuer }) => ("certified".into(), issuer, subject),
        Ok(Certification::Unverified { subject, issuer }) => ("unverified".into(), issuer, subject),
        Err(e) => (
            format!("invalid: {}", crate::report::chain(&e)),
            String::new(),
            String::new(),
        ),
    };
    let m = i.manifest.manifest;
    pb::ContentInfo {
        certification,
        certified_by,
        certified_subject,
        content_id: i.manifest.id.to_string(),
        name: m.name,
        mime_type: m.mime_type,
        size: m.size,
        publisher: m.publisher,
        created_unix: m.created_unix,
        tags: m.tags,
        rights: m.rights.map(|r| pb::ContentRights {
            licence: r.licence,
            redistribution_allowed: r.redistribution_allowed,
            expires_unix: r.expires_unix,
            allowed_groups: r.allowed_groups,
        }),
        signed_manifest: i.manifest.signed.into(),
        local: i.local.is_some(),
        pinned: i.local.is_some_and(|l| l.pinned),
        providers: i.providers.iter().map(|p| p.to_string()).collect(),
    }
}

/// Runs one of this domain's stateless operations.
pub(in crate::api) async fn run(svc: &ApiService, who: &Principal, op: Op) -> Result<R, ApiError> {
    match op {
        Op::ContentPublish(r) => {
            // Only the path form is stateless; the stream form is the session's.
            let meta = publish_meta(&r)?;
            let info = svc
                .content()
                .publish_path(std::path::Path::new(&r.path), meta)
                .await?;
            Ok(R::Content(content_info(svc.content(), info)))
        }
        Op::ContentDownload(r) => {
            let id = parse_content_id(&r.content_id)?;
            let c = svc.content();
            Ok(R::Content(content_info(c, c.download(&id).await?)))
        }
        Op::ContentSearch(r) => {
            let c = svc.content();
            let items = c
                .search(&r.query, if r.limit == 0 { 50 } else { r.limit as usize })
                .await?;
            Ok(R::ContentList(pb::ContentList {
                items: items.into_iter().map(|i| content_info(c, i)).collect(),
            }))
        }
        Op::ContentStat(r) => {
            let id = parse_content_id(&r.content_id)?;
            let c = svc.content();
            Ok(R::Content(content_info(c, c.stat(&id).await?)))
        }
        Op::ContentList(_) => {
            let c = svc.content();
            Ok(R::ContentList(pb::ContentList {
                items: c
                    .list()
                    .await?
                    .into_iter()
                    .map(|i| content_info(c, i))
                    .collect(),
            }))
        }
        Op::ContentPin(r) => {
            let id = parse_content_id(&r.content_id)?;
            svc.content().pin(&id, r.pinned).await?;
            Ok(R::Ok(pb::Empty {}))
        }
        Op::ContentDelete(r) => {
            who.require_admin()?;
            let id = parse_content_id(&r.content_id)?;
            svc.content().delete(&id).await?;
            Ok(R::Ok(pb::Empty {}))
        }
        // The dispatcher routes only this domain's operations here.
        _ => Err(super::routed_wrongly()),
    }
}
