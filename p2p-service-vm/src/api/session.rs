//! One app session: handshake, then a loop over the app's frames, node events and
//! the session's own background work (stream opens, inbound streams, copy tasks).
//!
//! Every object an app creates belongs to its session and is released when the
//! session ends, however it ends.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use p2pvm_proto::{FrameCodec, PROTOCOL_VERSION, pb};
use pb::frame::Kind;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::apps::Principal;
use super::service::SessionEntry;
use super::streams::StreamEntry;
use super::{ApiError, ApiService, ops};
use crate::node::{Command, NodeEvent, service_key};

/// How long a new connection may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards the app before producers wait.
const OUT_QUEUE: usize = 256;
/// Background notices queued towards the session loop.
const INTERNAL_QUEUE: usize = 256;
/// How long a closing session may take to flush its last frames.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closed session's input is drained so the app can read the reason.
const LINGER: Duration = Duration::from_millis(500);
/// Protocol prefixes the node itself speaks; apps may not take them over.
const RESERVED_PROTOCOL_PREFIXES: &[&str] =
    &["/p2pvm/", "/ipfs/", "/meshsub/", "/floodsub/", "/libp2p/"];

/// Work finished in the background, reported to the session loop.
#[derive(Debug)]
pub(crate) enum Internal {
    Opened {
        request_id: u64,
        stream_id: u64,
        result: Result<libp2p::Stream, ApiError>,
    },
    Inbound {
        protocol: String,
        peer: PeerId,
        stream: libp2p::Stream,
    },
    /// A content fetch found its item and is ready to stream.
    ContentOpened {
        request_id: u64,
        stream_id: u64,
        /// Deliver through a bulk attachment rather than stream frames.
        bulk: bool,
        result: Result<(pb::ContentStream, ContentBytes), ApiError>,
    },
    ReaderDone(u64),
    WriterDone(u64),
    /// A copy task failed: reset the whole stream.
    Failed(u64, pb::Error),
}

/// Verified bytes of a content fetch, as the node produces them.
pub(crate) struct ContentBytes(
    pub(crate) std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>,
);

impl std::fmt::Debug for ContentBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentBytes")
    }
}

/// The bytes of a publish stream: its end is the item's end only when the app
/// half-closed the stream; otherwise (reset, session gone) reading fails and
/// the import is abandoned.
struct EndChecked<R> {
    inner: R,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl<R: std::io::Read> std::io::Read for EndChecked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.ended.load(std::sync::atomic::Ordering::Acquire) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the publish stream was reset before it was closed",
            ));
        }
        Ok(n)
    }
}

/// Buffer between an app's publish stream and the import.
const PUBLISH_PIPE_BYTES: usize = 256 * 1024;

fn goodbye(code: pb::ErrorCode, message: impl Into<String>) -> pb::Frame {
    pb::Frame::of(Kind::Goodbye(pb::Goodbye {
        error: Some(pb::Error::new(code, message)),
    }))
}

pub(crate) fn response(id: u64, result: Result<pb::response::Result, ApiError>) -> pb::Frame {
    let result = match result {
        Ok(r) => r,
        Err(e) => pb::response::Result::Error(e.to_pb()),
    };
    pb::Frame::of(Kind::Response(pb::Response {
        id,
        result: Some(result),
    }))
}

fn ok() -> Result<pb::response::Result, ApiError> {
    Ok(pb::response::Result::Ok(pb::Empty {}))
}

/// Tells a connection it cannot be served, then closes it.
pub(crate) async fn refuse<IO>(mut framed: Framed<IO, FrameCodec>, error: pb::Error)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // Wait briefly for the Hello so the client reads our reason instead of a
    // broken pipe in the middle of its handshake.
    let _ = tokio::time::timeout(Duration::from_millis(500), framed.next()).await;
    let frame = pb::Frame::of(Kind::Goodbye(pb::Goodbye { error: Some(error) }));
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, framed.send(frame)).await;
}

/// Serves session `id` until it ends.
pub(crate) async fn run<IO>(svc: ApiService, id: u64, framed: Framed<IO, FrameCodec>)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sink, mut source) = framed.split();
    let principal = match handshake(&svc, &mut source).await {
        Ok(p) => p,
        Err(e) => {
            debug!(session = id, error = %e, "handshake failed");
            let _ =
                tokio::time::timeout(FLUSH_TIMEOUT, sink.send(goodbye(e.code, e.message))).await;
            return;
        }
    };
    let limits = &svc.inner.limits;
    let welcome = pb::Frame::of(Kind::Welcome(pb::Welcome {
        version: PROTOCOL_VERSION,
        session_id: id,
        app: principal.app.clone(),
        admin: principal.admin,
        node_version: env!("CARGO_PKG_VERSION").into(),
        max_frame_bytes: limits.max_frame_bytes,
        stream_window_bytes: limits.stream_window_bytes,
        max_streams: limits.max_streams_per_session,
        bulk_streams: true,
    }));
    if sink.send(welcome).await.is_err() {
        return;
    }
    info!(session = id, app = %principal.app, admin = principal.admin, "session opened");

    let (out_tx, mut out_rx) = mpsc::channel::<pb::Frame>(OUT_QUEUE);
    let writer = svc.spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if sink.feed(frame).await.is_err() {
                return;
            }
            // Batch whatever else is queued into the same flush.
            while let Ok(frame) = out_rx.try_recv() {
                if sink.feed(frame).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });

    let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
    let kill = svc.inner.shutdown.child_token();
    let state = Arc::new(Mutex::new(pb::SessionState {
        session_id: id,
        app: principal.app.clone(),
        ..Default::default()
    }));
    svc.inner.sessions.lock().expect("lock").insert(
        id,
        SessionEntry {
            app: principal.app.clone(),
            state: state.clone(),
            kill: kill.clone(),
        },
    );
    let mut session = Session {
        events: svc.inner.node.subscribe_events(),
        inflight: Arc::new(Semaphore::new(limits.max_inflight_requests as usize)),
        svc,
        id,
        principal,
        out: out_tx,
        internal_tx,
        state,
        topics: HashSet::new(),
        protocols: HashMap::new(),
        services: HashSet::new(),
        streams: HashMap::new(),
        pending_opens: 0,
        next_stream: 1,
        watching: false,
        kill: kill.clone(),
        publishes: HashMap::new(),
        publish_ends: HashMap::new(),
    };
    session.serve(&mut source, internal_rx, kill).await;
    session.cleanup().await;
    drop(session);
    let writer_abort = writer.abort_handle();
    if tokio::time::timeout(FLUSH_TIMEOUT, writer).await.is_err() {
        // The app does not read: drop its queued frames and the socket now.
        writer_abort.abort();
        return;
    }
    // Linger: the writer shut our sending side down after the last frame; keep
    // discarding what the app still sends for a moment, so closing with unread
    // input does not reset the connection before the app read our Goodbye.
    let _ = tokio::time::timeout(LINGER, async { while source.next().await.is_some() {} }).await;
    info!(session = id, "session closed");
}

async fn handshake<S>(svc: &ApiService, source: &mut S) -> Result<Principal, ApiError>
where
    S: futures::Stream<Item = Result<pb::Frame, p2pvm_proto::FrameError>> + Unpin,
{
    let first = tokio::time::timeout(HELLO_TIMEOUT, source.next())
        .await
        .map_err(|_| ApiError::new(pb::ErrorCode::Timeout, "no Hello in time"))?;
    let hello = match first {
        Some(Ok(pb::Frame {
            kind: Some(Kind::Hello(h)),
        })) => h,
        Some(Ok(_)) => {
            return Err(ApiError::new(
                pb::ErrorCode::ProtocolViolation,
                "the first frame must be Hello",
            ));
        }
        Some(Err(e)) => return Err(ApiError::new(e.code(), e.to_string())),
        None => return Err(ApiError::new(pb::ErrorCode::Unavailable, "closed")),
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(ApiError::new(
            pb::ErrorCode::UnsupportedVersion,
            format!(
                "this node speaks API version {PROTOCOL_VERSION}, not {}",
                hello.version
            ),
        ));
    }
    svc.inner
        .apps
        .lock()
        .expect("lock")
        .authenticate(&hello.token)
        .ok_or_else(|| ApiError::new(pb::ErrorCode::Unauthenticated, "unknown or revoked token"))
}

struct Session {
    svc: ApiService,
    id: u64,
    principal: Principal,
    out: mpsc::Sender<pb::Frame>,
    internal_tx: mpsc::Sender<Internal>,
    events: broadcast::Receiver<NodeEvent>,
    inflight: Arc<Semaphore>,
    state: Arc<Mutex<pb::SessionState>>,
    topics: HashSet<String>,
    protocols: HashMap<String, JoinHandle<()>>,
    services: HashSet<String>,
    streams: HashMap<u64, StreamEntry>,
    pending_opens: usize,
    next_stream: u64,
    watching: bool,
    kill: CancellationToken,
    /// Publishes whose bytes are arriving on a stream, by stream id.
    publishes: HashMap<u64, oneshot::Receiver<Result<pb::ContentInfo, ApiError>>>,
    /// Set when the app half-closed a publish stream: only then is its end the
    /// end of the item (a reset or a dead session must not import a truncation).
    publish_ends: HashMap<u64, Arc<std::sync::atomic::AtomicBool>>,
}

impl Session {
    async fn serve<S>(
        &mut self,
        source: &mut S,
        mut internal_rx: mpsc::Receiver<Internal>,
        kill: CancellationToken,
    ) where
        S: futures::Stream<Item = Result<pb::Frame, p2pvm_proto::FrameError>> + Unpin,
    {
        loop {
            tokio::select! {
                _ = kill.cancelled() => {
                    let _ = self.out.try_send(goodbye(pb::ErrorCode::Unavailable, "session ended by the node (shutdown or token revoked)"));
                    return;
                }
                frame = source.next() => match frame {
                    None => return,
                    Some(Err(e)) => {
                        warn!(session = self.id, app = %self.principal.app, error = %e, "bad frame; closing session");
                        self.send(goodbye(e.code(), e.to_string())).await;
                        return;
                    }
                    Some(Ok(frame)) => {
                        if let Err(e) = self.on_frame(frame).await {
                            warn!(session = self.id, app = %self.principal.app, error = %e, "protocol violation; closing session");
                            self.send(goodbye(e.code, e.message)).await;
                            return;
                        }
                    }
                },
                event = self.events.recv() => self.on_node_event(event).await,
                Some(msg) = internal_rx.recv() => self.on_internal(msg).await,
            }
        }
    }

    async fn send(&self, frame: pb::Frame) {
        // An app that stops reading fills `out`; racing the kill token keeps
        // revocation and shutdown working for it. Errors mean the session ends.
        tokio::select! {
            _ = self.out.send(frame) => {}
            _ = self.kill.cancelled() => {}
        }
    }

    async fn reply(&self, id: u64, result: Result<pb::response::Result, ApiError>) {
        self.send(response(id, result)).await;
    }

    async fn on_frame(&mut self, frame: pb::Frame) -> Result<(), ApiError> {
        let window = self.svc.inner.limits.stream_window_bytes;
        let violation = |m: String| ApiError::new(pb::ErrorCode::ProtocolViolation, m);
        match frame.kind {
            Some(Kind::Request(req)) => {
                self.on_request(req).await;
                Ok(())
            }
            Some(Kind::StreamData(d)) => {
                // Data for a stream that just ended crosses the close in flight: drop it.
                if let Some(s) = self.streams.get_mut(&d.stream_id) {
                    s.data_from_app(d.data, window)
                        .map_err(|v| violation(v.message(d.stream_id)))?;
                }
                Ok(())
            }
            Some(Kind::StreamCredit(c)) => {
                if let Some(s) = self.streams.get(&c.stream_id) {
                    s.credit_from_app(c.bytes, window)
                        .map_err(|v| violation(v.message(c.stream_id)))?;
                }
                Ok(())
            }
            Some(Kind::StreamClose(c)) => {
                if c.reset {
                    if let Some(s) = self.streams.remove(&c.stream_id) {
                        s.reset();
                        self.sync_state();
                    }
                } else if let Some(s) = self.streams.get_mut(&c.stream_id) {
                    if let Some(end) = self.publish_ends.remove(&c.stream_id) {
                        end.store(true, std::sync::atomic::Ordering::Release);
                    }
                    s.half_close();
                }
                Ok(())
            }
            Some(other) => Err(violation(format!(
                "apps may not send {} frames",
                kind_name(&other)
            ))),
            None => Err(violation("empty frame".into())),
        }
    }

    async fn on_request(&mut self, req: pb::Request) {
        use pb::request::Op;
        let id = req.id;
        let Some(op) = req.op else {
            self.reply(id, Err(ApiError::bad("request without an operation")))
                .await;
            return;
        };
        let result = match op {
            Op::NodeInfo(_) => Ok(ops::node_info(&self.svc)),
            Op::Subscribe(r) => self.subscribe(r.topic).await,
            Op::Unsubscribe(r) => self.unsubscribe(&r.topic).await,
            Op::RegisterProtocol(r) => self.register_protocol(r.protocol),
            Op::UnregisterProtocol(r) => self.unregister_protocol(&r.protocol).await,
            Op::AdvertiseService(r) => self.advertise(r.name).await,
            Op::WithdrawService(r) => self.withdraw(&r.name).await,
            Op::WatchEvents(_) => {
                self.watching = true;
                self.sync_state();
                ok()
            }
            Op::SessionState(_) => Ok(pb::response::Result::SessionState(
                self.state.lock().expect("lock").clone(),
            )),
            Op::ContentPublish(r) if r.path.is_empty() => match self.content_publish(id, r).await {
                // Answered inside, before the stream's tasks start.
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Op::ContentPublishFinish(r) => match self.publishes.remove(&r.stream_id) {
                Some(rx) => {
                    let out = self.out.clone();
                    self.svc.spawn(async move {
                        let r = match rx.await {
                            Ok(r) => r.map(pb::response::Result::Content),
                            Err(_) => Err(ApiError::new(
                                pb::ErrorCode::Unavailable,
                                "the publish was aborted",
                            )),
                        };
                        let _ = out.send(response(id, r)).await;
                    });
                    return;
                }
                None => Err(ApiError::new(
                    pb::ErrorCode::NotFound,
                    "no publish on that stream in this session",
                )),
            },
            Op::ContentFetch(r) => match self.content_fetch(id, r) {
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Op::OpenStream(r) => match self.open_stream(id, r) {
                // Answered when the open finishes.
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Op::RevokeApp(r) if self.principal.admin => {
                let revoked = self.svc.inner.apps.lock().expect("lock").revoke(&r.app);
                match revoked {
                    Ok(()) => {
                        self.svc.kill_app_sessions(&r.app);
                        ok()
                    }
                    Err(e) => Err(e.into()),
                }
            }
            op => {
                // Stateless operations run beside the session so a slow DHT query
                // never holds up this app's other requests.
                let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
                    let e = ApiError::new(
                        pb::ErrorCode::LimitExceeded,
                        format!(
                            "at most {} requests in flight per session",
                            self.svc.inner.limits.max_inflight_requests
                        ),
                    );
                    self.reply(id, Err(e)).await;
                    return;
                };
                let svc = self.svc.clone();
                let principal = self.principal.clone();
                let out = self.out.clone();
                self.svc.spawn(async move {
                    let r = ops::run(&svc, &principal, op).await;
                    let _ = out.send(response(id, r)).await;
                    drop(permit);
                });
                return;
            }
        };
        self.reply(id, result).await;
    }

    async fn subscribe(&mut self, topic: String) -> Result<pb::response::Result, ApiError> {
        if topic.is_empty() || topic.len() > 256 {
            return Err(ApiError::bad("topic must be 1-256 bytes"));
        }
        if self.topics.contains(&topic) {
            return Err(ApiError::new(
                pb::ErrorCode::AlreadyExists,
                "already subscribed",
            ));
        }
        let mut counts = self.svc.inner.topics.lock().await;
        let count = counts.entry(topic.clone()).or_insert(0);
        if *count == 0 {
            let t = topic.clone();
            if let Err(e) = self.svc.inner.node.call(|r| Command::Subscribe(t, r)).await {
                counts.remove(&topic);
                return Err(e.into());
            }
        }
        *count += 1;
        drop(counts);
        self.topics.insert(topic);
        self.sync_state();
        ok()
    }

    async fn unsubscribe(&mut self, topic: &str) -> Result<pb::response::Result, ApiError> {
        if !self.topics.remove(topic) {
            return Err(ApiError::new(pb::ErrorCode::NotFound, "not subscribed"));
        }
        self.release_topic(topic).await;
        self.sync_state();
        ok()
    }

    async fn release_topic(&self, topic: &str) {
        let last = Command::Unsubscribe(topic.into());
        self.release(&self.svc.inner.topics, topic, last).await;
    }

    /// Drops one session's reference to a shared node-level object and sends
    /// `on_last` to the node when it was the last one.
    async fn release(
        &self,
        counts: &tokio::sync::Mutex<HashMap<String, usize>>,
        name: &str,
        on_last: Command,
    ) {
        let mut counts = counts.lock().await;
        if let Some(c) = counts.get_mut(name) {
            *c -= 1;
            if *c == 0 {
                counts.remove(name);
                let _ = self.svc.inner.node.send(on_last).await;
            }
        }
    }

    fn register_protocol(&mut self, name: String) -> Result<pb::response::Result, ApiError> {
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
        let protocol = StreamProtocol::try_from_owned(name.clone())
            .map_err(|e| ApiError::bad(e.to_string()))?;
        {
            let mut owners = self.svc.inner.protocols.lock().expect("lock");
            if owners.contains_key(&name) {
                return Err(ApiError::new(
                    pb::ErrorCode::AlreadyExists,
                    format!("{name} is already registered on this node"),
                ));
            }
            owners.insert(name.clone(), self.id);
        }
        let mut incoming = match self.svc.inner.node.stream_control().accept(protocol) {
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

    async fn unregister_protocol(&mut self, name: &str) -> Result<pb::response::Result, ApiError> {
        let Some(task) = self.protocols.remove(name) else {
            return Err(ApiError::new(
                pb::ErrorCode::NotFound,
                "not registered by this app",
            ));
        };
        // Wait until the task (and with it libp2p-stream's registration) is gone,
        // so the name can be registered again at once.
        task.abort();
        let _ = task.await;
        self.svc.inner.protocols.lock().expect("lock").remove(name);
        self.sync_state();
        ok()
    }

    async fn advertise(&mut self, name: String) -> Result<pb::response::Result, ApiError> {
        ops::validate_service_name(&name)?;
        if self.services.contains(&name) {
            return Err(ApiError::new(
                pb::ErrorCode::AlreadyExists,
                "already advertised",
            ));
        }
        let mut counts = self.svc.inner.services.lock().await;
        let count = counts.entry(name.clone()).or_insert(0);
        if *count == 0 {
            // The provider record is stored locally at once and announced to the
            // DHT in the background; waiting for that (up to the query timeout)
            // would stall this session and every other advertiser.
            let announce = Command::Announce(service_key(&name));
            if let Err(e) = self.svc.inner.node.send(announce).await {
                counts.remove(&name);
                return Err(e.into());
            }
        }
        *count += 1;
        drop(counts);
        self.services.insert(name);
        self.sync_state();
        ok()
    }

    async fn withdraw(&mut self, name: &str) -> Result<pb::response::Result, ApiError> {
        if !self.services.remove(name) {
            return Err(ApiError::new(
                pb::ErrorCode::NotFound,
                "not advertised by this app",
            ));
        }
        self.release_service(name).await;
        self.sync_state();
        ok()
    }

    async fn release_service(&self, name: &str) {
        let last = Command::StopProviding(service_key(name));
        self.release(&self.svc.inner.services, name, last).await;
    }

    fn stream_slots_left(&self) -> bool {
        self.streams.len() + self.pending_opens
            < self.svc.inner.limits.max_streams_per_session as usize
    }

    fn open_stream(&mut self, request_id: u64, r: pb::OpenStreamRequest) -> Result<(), ApiError> {
        if !self.stream_slots_left() {
            return Err(ApiError::new(
                pb::ErrorCode::LimitExceeded,
                format!(
                    "at most {} streams per session",
                    self.svc.inner.limits.max_streams_per_session
                ),
            ));
        }
        let peer = ops::parse_peer(&r.peer_id)?;
        let protocol = StreamProtocol::try_from_owned(r.protocol)
            .map_err(|e| ApiError::bad(format!("protocol: {e}")))?;
        let stream_id = self.next_stream;
        self.next_stream += 1;
        self.pending_opens += 1;
        let timeout = ops::timeout_of(r.timeout_ms);
        let mut control = self.svc.inner.node.stream_control();
        let tx = self.internal_tx.clone();
        self.svc.spawn(async move {
            let result =
                match tokio::time::timeout(timeout, control.open_stream(peer, protocol)).await {
                    Ok(Ok(s)) => Ok(s),
                    Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(p))) => Err(
                        ApiError::new(pb::ErrorCode::NotFound, format!("peer does not serve {p}")),
                    ),
                    Ok(Err(e)) => Err(ApiError::new(pb::ErrorCode::Unavailable, e.to_string())),
                    Err(_) => Err(ApiError::new(
                        pb::ErrorCode::Timeout,
                        "opening the stream timed out",
                    )),
                };
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

    fn stream_limit(&self) -> ApiError {
        ApiError::new(
            pb::ErrorCode::LimitExceeded,
            format!(
                "at most {} streams per session",
                self.svc.inner.limits.max_streams_per_session
            ),
        )
    }

    /// Starts a publish from a byte stream: the app writes the bytes on the
    /// returned stream; the import runs as they arrive.
    async fn content_publish(
        &mut self,
        request_id: u64,
        r: pb::ContentPublishRequest,
    ) -> Result<(), ApiError> {
        let content = ops::content(&self.svc)?.clone();
        let meta = ops::publish_meta(&r)?;
        if !self.stream_slots_left() {
            return Err(self.stream_limit());
        }
        let (app_side, node_side) = tokio::io::duplex(PUBLISH_PIPE_BYTES);
        let (_, app_writes) = tokio::io::split(app_side);
        let stream = tokio::io::join(tokio::io::empty(), app_writes).compat();
        let stream_id = self.next_stream;
        self.next_stream += 1;
        let opened = pb::StreamOpened { stream_id };
        self.reply(request_id, Ok(pb::response::Result::StreamOpened(opened)))
            .await;
        self.add_stream(stream_id, stream);
        let (tx, rx) = oneshot::channel();
        self.publishes.insert(stream_id, rx);
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.publish_ends.insert(stream_id, ended.clone());
        self.svc.spawn(async move {
            let reader = EndChecked {
                inner: tokio_util::io::SyncIoBridge::new(node_side),
                ended,
            };
            let r = content
                .publish(reader, meta)
                .await
                .map(ops::content_info)
                .map_err(ApiError::from);
            let _ = tx.send(r);
        });
        Ok(())
    }

    /// Starts streaming verified bytes; answered with `ContentStream` once the
    /// item is found.
    fn content_fetch(
        &mut self,
        request_id: u64,
        r: pb::ContentFetchRequest,
    ) -> Result<(), ApiError> {
        let content = ops::content(&self.svc)?.clone();
        let id = ops::parse_content_id(&r.content_id)?;
        if !self.stream_slots_left() {
            return Err(self.stream_limit());
        }
        let range = if r.offset == 0 && r.length == 0 {
            None
        } else {
            Some((r.offset, r.length))
        };
        let stream_id = self.next_stream;
        self.next_stream += 1;
        self.pending_opens += 1;
        let tx = self.internal_tx.clone();
        let bulk = r.bulk;
        self.svc.spawn(async move {
            let range = match range {
                None => None,
                Some((offset, 0)) => match content.stat(&id).await {
                    Ok(info) => Some(offset..info.manifest.manifest.size),
                    Err(e) => {
                        let result = Err(e.into());
                        let _ = tx
                            .send(Internal::ContentOpened {
                                request_id,
                                stream_id,
                                bulk,
                                result,
                            })
                            .await;
                        return;
                    }
                },
                Some((offset, len)) => Some(offset..offset.saturating_add(len)),
            };
            let result = content
                .fetch(&id, range, !r.no_keep)
                .await
                .map(|(info, range, bytes)| {
                    let opened = pb::ContentStream {
                        stream_id,
                        info: Some(ops::content_info(info)),
                        offset: range.start,
                        length: range.end - range.start,
                        bulk_ticket: bytes::Bytes::new(),
                    };
                    (opened, ContentBytes(Box::pin(bytes)))
                })
                .map_err(ApiError::from);
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

    fn add_stream<S>(&mut self, stream_id: u64, stream: S)
    where
        S: futures::AsyncRead + futures::AsyncWrite + Send + 'static,
    {
        let entry = StreamEntry::spawn(
            &self.svc.inner.tasks,
            stream_id,
            stream,
            self.svc.inner.limits.stream_window_bytes,
            self.out.clone(),
            self.internal_tx.clone(),
        );
        self.streams.insert(stream_id, entry);
        self.sync_state();
    }

    async fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Opened {
                request_id,
                stream_id,
                result,
            } => {
                self.pending_opens -= 1;
                // Answer before the copy tasks start, so the app knows the stream
                // id before any of its data or its close can arrive.
                match result {
                    Ok(stream) => {
                        let opened = pb::StreamOpened { stream_id };
                        self.reply(request_id, Ok(pb::response::Result::StreamOpened(opened)))
                            .await;
                        self.add_stream(stream_id, stream);
                    }
                    Err(e) => self.reply(request_id, Err(e)).await,
                }
            }
            Internal::ContentOpened {
                request_id,
                bulk: true,
                result,
                ..
            } => {
                self.pending_opens -= 1;
                let parked = result.and_then(|(mut opened, bytes)| {
                    let max = self.svc.inner.limits.max_streams_per_session as usize;
                    let ticket = self.svc.inner.bulk.park(self.id, bytes, max)?;
                    opened.stream_id = 0;
                    opened.bulk_ticket = bytes::Bytes::copy_from_slice(&ticket);
                    Ok(pb::response::Result::ContentStream(opened))
                });
                self.reply(request_id, parked).await;
            }
            Internal::ContentOpened {
                request_id,
                stream_id,
                bulk: false,
                result,
            } => {
                self.pending_opens -= 1;
                match result {
                    Ok((opened, bytes)) => {
                        // Answer first: the bytes start flowing as soon as the
                        // copy task runs, and must not overtake the answer.
                        self.reply(request_id, Ok(pb::response::Result::ContentStream(opened)))
                            .await;
                        let reader = tokio_util::io::StreamReader::new(bytes.0);
                        let stream = tokio::io::join(reader, tokio::io::sink()).compat();
                        self.add_stream(stream_id, stream);
                        // The app sends nothing on a fetch stream; end that direction now.
                        if let Some(s) = self.streams.get_mut(&stream_id) {
                            s.half_close();
                        }
                    }
                    Err(e) => self.reply(request_id, Err(e)).await,
                }
            }
            Internal::Inbound {
                protocol,
                peer,
                stream,
            } => {
                if !self.stream_slots_left() {
                    warn!(session = self.id, %peer, %protocol, "inbound stream dropped: stream limit");
                    return;
                }
                let stream_id = self.next_stream;
                self.next_stream += 1;
                // Announce first, so the peer's first bytes cannot overtake the event.
                let ev = pb::event::Kind::InboundStream(pb::InboundStream {
                    stream_id,
                    peer_id: peer.to_string(),
                    protocol,
                });
                self.send(pb::Frame::of(Kind::Event(pb::Event { kind: Some(ev) })))
                    .await;
                self.add_stream(stream_id, stream);
            }
            Internal::Failed(id, error) => {
                if let Some(s) = self.streams.remove(&id) {
                    s.reset();
                    self.sync_state();
                    let close = pb::StreamClose {
                        stream_id: id,
                        reset: true,
                        error: Some(error),
                    };
                    self.send(pb::Frame::of(Kind::StreamClose(close))).await;
                }
            }
            Internal::ReaderDone(id) | Internal::WriterDone(id) => {
                let reader = matches!(msg, Internal::ReaderDone(_));
                if let Some(s) = self.streams.get_mut(&id) {
                    if reader {
                        s.reader_done = true;
                    } else {
                        s.writer_done = true;
                    }
                    if s.finished() {
                        self.streams.remove(&id);
                        self.sync_state();
                    }
                }
            }
        }
    }

    async fn on_node_event(&mut self, event: Result<NodeEvent, broadcast::error::RecvError>) {
        use pb::event::Kind as E;
        let kind = match event {
            Ok(NodeEvent::Pubsub(m)) if self.topics.contains(&m.topic) => {
                E::PubsubMessage(pb::PubsubMessage {
                    topic: m.topic,
                    data: m.data,
                    source: m.source.map(|p| p.to_string()).unwrap_or_default(),
                    via: m.via.to_string(),
                    message_id: m.message_id.into(),
                })
            }
            Ok(NodeEvent::PeerConnected { peer_id, addr }) if self.watching => {
                E::PeerConnected(pb::PeerConnected {
                    peer_id: peer_id.to_string(),
                    addr: addr.to_string(),
                })
            }
            Ok(NodeEvent::PeerDisconnected { peer_id }) if self.watching => {
                E::PeerDisconnected(pb::PeerDisconnected {
                    peer_id: peer_id.to_string(),
                })
            }
            Ok(NodeEvent::NewListenAddr(a)) if self.watching => E::NewListenAddr(pb::ListenAddr {
                addr: a.to_string(),
            }),
            Ok(NodeEvent::ContentProgress {
                id,
                held_bytes,
                size,
                providers,
            }) if self.watching => E::ContentProgress(pb::ContentProgress {
                content_id: id.to_string(),
                held_bytes,
                size,
                providers,
            }),
            Ok(NodeEvent::MalwareDetected {
                id,
                signature,
                peers,
            }) if self.watching => E::MalwareDetected(pb::MalwareDetected {
                content_id: id.to_string(),
                signature,
                peer_ids: peers.iter().map(|p| p.to_string()).collect(),
            }),
            Ok(NodeEvent::CorruptData { peer, id, block }) if self.watching => {
                E::CorruptData(pb::CorruptData {
                    peer_id: peer.to_string(),
                    content_id: id.to_string(),
                    block,
                })
            }
            Err(broadcast::error::RecvError::Lagged(n))
                if self.watching || !self.topics.is_empty() =>
            {
                E::EventsLost(pb::EventsLost { count: n })
            }
            _ => return,
        };
        self.send(pb::Frame::of(Kind::Event(pb::Event { kind: Some(kind) })))
            .await;
    }

    fn sync_state(&self) {
        let mut st = self.state.lock().expect("lock");
        st.protocols = sorted(self.protocols.keys().cloned());
        st.topics = sorted(self.topics.iter().cloned());
        st.services = sorted(self.services.iter().cloned());
        let mut streams: Vec<u64> = self.streams.keys().copied().collect();
        streams.sort_unstable();
        st.streams = streams;
        st.watching_events = self.watching;
    }

    async fn cleanup(&mut self) {
        for (name, task) in self.protocols.drain() {
            task.abort();
            let _ = task.await;
            self.svc.inner.protocols.lock().expect("lock").remove(&name);
        }
        for topic in std::mem::take(&mut self.topics) {
            self.release_topic(&topic).await;
        }
        for name in std::mem::take(&mut self.services) {
            self.release_service(&name).await;
        }
        for (_, s) in self.streams.drain() {
            s.reset();
        }
        self.svc.inner.bulk.forget_session(self.id);
        self.svc
            .inner
            .sessions
            .lock()
            .expect("lock")
            .remove(&self.id);
    }
}

fn sorted(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = it.collect();
    v.sort();
    v
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Hello(_) => "Hello",
        Kind::Welcome(_) => "Welcome",
        Kind::Request(_) => "Request",
        Kind::Response(_) => "Response",
        Kind::Event(_) => "Event",
        Kind::StreamData(_) => "StreamData",
        Kind::StreamCredit(_) => "StreamCredit",
        Kind::StreamClose(_) => "StreamClose",
        Kind::Goodbye(_) => "Goodbye",
    }
}
