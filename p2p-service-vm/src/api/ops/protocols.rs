//! App-defined protocols and their streams: an app registers a protocol name
//! to receive peers' streams of it, and opens streams of any protocol to a
//! peer. Each such stream is bridged by the stream table.
//!
//! ```text
//!  RegisterProtocol ─► accept task ─ Internal::Inbound ─► InboundStream event ─► stream
//!  OpenStream ─► dial task ─ Internal::Opened ─► StreamOpened answer ─► stream
//! ```
//!
//! A protocol name has one owner on the node ([`crate::api::service::Inner::protocols`]);
//! it is freed when the app unregisters it or its session ends.

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use p2pvm_proto::pb;
use pb::frame::Kind;
use tracing::warn;

use super::{parse_peer, timeout_of};
use crate::api::ApiError;
use crate::api::session::internal::Internal;
use crate::api::session::{Session, ok};

/// Protocol prefixes the node itself speaks; apps may not take them over.
const RESERVED_PROTOCOL_PREFIXES: &[&str] =
    &["/p2pvm/", "/ipfs/", "/meshsub/", "/floodsub/", "/libp2p/"];

/// A name an app may register: well-formed and not the node's own.
fn app_protocol(name: &str) -> Result<StreamProtocol, ApiError> {
    if !name.starts_with('/') || name.len() > 256 {
        return Err(ApiError::bad(
            "a protocol name starts with '/' and has at most 256 bytes",
        ));
    }
    if RESERVED_PROTOCOL_PREFIXES
        .iter()
        .any(|p| name.starts_with(p))
    {
        return Err(ApiError::new(
            pb::ErrorCode::PermissionDenied,
            format!("{name} is reserved for the node"),
        ));
    }
    StreamProtocol::try_from_owned(name.to_owned()).map_err(|e| ApiError::bad(e.to_string()))
}

/// Opens a stream of `protocol` to `peer`, within `timeout`.
async fn dial(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    protocol: StreamProtocol,
    timeout: std::time::Duration,
) -> Result<libp2p::Stream, ApiError> {
    match tokio::time::timeout(timeout, control.open_stream(peer, protocol)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(p))) => Err(ApiError::new(
            pb::ErrorCode::NotFound,
            format!("peer does not serve {p}"),
        )),
        Ok(Err(e)) => Err(ApiError::new(pb::ErrorCode::Unavailable, e.to_string())),
        Err(_) => Err(ApiError::new(
            pb::ErrorCode::Timeout,
            "opening the stream timed out",
        )),
    }
}

impl Session {
    pub(in crate::api) fn register_protocol(
        &mut self,
        name: String,
    ) -> Result<pb::response::Result, ApiError> {
        let protocol = app_protocol(&name)?;
        self.claim_protocol(&name)?;
        let mut incoming = match self.svc.inner.ctx.node.stream_control().accept(protocol) {
            Ok(i) => i,
            Err(_) => {
                self.svc.inner.protocols.lock().expect("lock").remove(&name);
                return Err(ApiError::new(pb::ErrorCode::AlreadyExists, "protocol busy"));
            }
        };
        let tx = self.internal_tx.clone();
        let proto = name.clone();
        let task = self.svc.spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let msg = Internal::Inbound {
                    protocol: proto.clone(),
                    peer,
                    stream,
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
        self.protocols.insert(name, task);
        self.sync_state();
        ok()
    }

    /// Makes this session the node-wide owner of `name`, if nobody is.
    fn claim_protocol(&self, name: &str) -> Result<(), ApiError> {
        let mut owners = self.svc.inner.protocols.lock().expect("lock");
        if owners.contains_key(name) {
            return Err(ApiError::new(
                pb::ErrorCode::AlreadyExists,
                format!("{name} is already registered on this node"),
            ));
        }
        owners.insert(name.to_owned(), self.id);
        Ok(())
    }

    pub(in crate::api) async fn unregister_protocol(
        &mut self,
        name: &str,
    ) -> Result<pb::response::Result, ApiError> {
        let Some(task) = self.protocols.remove(name) else {
            return Err(ApiError::new(
                pb::ErrorCode::NotFound,
                "not registered by this app",
            ));
        };
        self.release_protocol(name, task).await;
        self.sync_state();
        ok()
    }

    /// Stops accepting `name` and frees it for any session.
    async fn release_protocol(&self, name: &str, task: tokio::task::JoinHandle<()>) {
        // Wait until the task (and with it libp2p-stream's registration) is gone,
        // so the name can be registered again at once.
        task.abort();
        let _ = task.await;
        self.svc.inner.protocols.lock().expect("lock").remove(name);
    }

    /// At the session's end: every protocol it registered.
    pub(in crate::api) async fn release_protocols(&mut self) {
        for (name, task) in std::mem::take(&mut self.protocols) {
            self.release_protocol(&name, task).await;
        }
    }

    /// Opens a stream to a peer in the background; answered when it is open.
    pub(in crate::api) fn open_stream(
        &mut self,
        request_id: u64,
        r: pb::OpenStreamRequest,
    ) -> Result<(), ApiError> {
        if !self.stream_slots_left() {
            return Err(self.stream_limit());
        }
        let peer = parse_peer(&r.peer_id)?;
        let protocol = StreamProtocol::try_from_owned(r.protocol)
            .map_err(|e| ApiError::bad(format!("protocol: {e}")))?;
        let stream_id = self.streams.begin_open();
        let timeout = timeout_of(r.timeout_ms);
        let control = self.svc.inner.ctx.node.stream_control();
        let tx = self.internal_tx.clone();
        self.svc.spawn(async move {
            let result = dial(control, peer, protocol, timeout).await;
            let _ = tx
                .send(Internal::Opened {
                    request_id,
                    stream_id,
                    result,
                })
                .await;
        });
        Ok(())
    }

    pub(in crate::api) async fn on_opened(
        &mut self,
        request_id: u64,
        stream_id: u64,
        result: Result<libp2p::Stream, ApiError>,
    ) {
        self.streams.open_done();
        // Answer before the copy tasks start, so the app knows the stream
        // id before any of its data or its close can arrive.
        match result {
            Ok(stream) => {
                let opened = pb::StreamOpened { stream_id };
                self.reply(request_id, Ok(pb::response::Result::StreamOpened(opened)))
                    .await;
                self.add_stream(stream_id, stream, "OpenStream");
            }
            Err(e) => self.reply(request_id, Err(e)).await,
        }
    }

    pub(in crate::api) async fn on_inbound(
        &mut self,
        protocol: String,
        peer: PeerId,
        stream: libp2p::Stream,
    ) {
        if !self.stream_slots_left() {
            warn!(session = self.id, %peer, %protocol, "inbound stream dropped: stream limit");
            return;
        }
        let stream_id = self.streams.next_id();
        // Announce first, so the peer's first bytes cannot overtake the event.
        let ev = pb::event::Kind::InboundStream(pb::InboundStream {
            stream_id,
            peer_id: peer.to_string(),
            protocol,
        });
        self.send(pb::Frame::of(Kind::Event(pb::Event { kind: Some(ev) })))
            .await;
        self.add_stream(stream_id, stream, "InboundStream");
    }
}
