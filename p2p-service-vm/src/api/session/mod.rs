//! One app session's lifecycle: the handshake (Hello → Welcome), one loop over
//! the app's frames, node events and the session's own background work, the
//! writer task that carries frames to the app, and the release of everything
//! the session created, however it ends.
//!
//! ```text
//!  app ─► frames ─► serve ─┬─► requests ─┬─► ops::run (stateless, beside the loop)
//!                          │             └─► ops::<domain> on the session: topics,
//!                          │                 services, app protocols, content streams
//!                          └─► stream_table (StreamData/Credit/Close)
//!  node events ──────────────► events (what the app subscribed to or watches)
//!  background work ─ Internal ─► ops::protocols, ops::content, stream_table
//!  every reply, event, data ─► out queue ─► writer task ─► app
//! ```
//!
//! The domain modules (`api::ops`) add `impl Session` blocks for their part
//! of the session; [`report`] keeps the admins' view of it current.

mod events;
pub(crate) mod internal;
mod report;
mod requests;
mod stream_frames;
mod stream_table;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use p2pvm_proto::{FrameCodec, PROTOCOL_VERSION, pb};
use pb::frame::Kind;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::apps::Principal;
use super::service::SessionEntry;
use super::{ApiError, ApiService};
use crate::content::ContentEvent;
use crate::node::{Command, NodeEvent};
use stream_table::StreamTable;

use crate::report::chain;
pub(crate) use internal::Internal;
use internal::Publishes;

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

pub(in crate::api) fn ok() -> Result<pb::response::Result, ApiError> {
    Ok(pb::response::Result::Ok(pb::Empty {}))
}

fn violation(message: String) -> ApiError {
    ApiError::new(pb::ErrorCode::ProtocolViolation, message)
}

impl ApiService {
    /// Serves one session over any byte stream until either side ends it.
    ///
    /// This is the single entry point for every transport: the Unix socket
    /// listener calls it per connection, and the channel back-end will call it
    /// per multiplexed session.
    pub async fn serve<IO>(&self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let framed =
            tokio_util::codec::Framed::new(io, FrameCodec::new(self.inner.limits.max_frame_bytes));
        let Ok(permit) = self.inner.session_slots.clone().try_acquire_owned() else {
            warn!("session refused: max_sessions reached");
            refuse(
                framed,
                pb::Error::new(
                    pb::ErrorCode::LimitExceeded,
                    format!(
                        "the node serves at most {} sessions",
                        self.inner.limits.max_sessions
                    ),
                ),
            )
            .await;
            return;
        };
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let _open = crate::metrics::Held::new(&self.inner.ctx.metrics.api.sessions);
        run(self.clone(), id, framed).await;
        drop(permit);
    }
}

/// Tells a connection it cannot be served, then closes it.
async fn refuse<IO>(mut framed: Framed<IO, FrameCodec>, error: pb::Error)
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
async fn run<IO>(svc: ApiService, id: u64, framed: Framed<IO, FrameCodec>)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sink, mut source) = framed.split();
    let principal = match handshake(&svc, &mut source).await {
        Ok(p) => p,
        Err(e) => {
            debug!(session = id, error = %chain(&e), "handshake failed");
            let _ =
                tokio::time::timeout(FLUSH_TIMEOUT, sink.send(goodbye(e.code, e.message))).await;
            return;
        }
    };
    if sink.send(welcome(&svc, id, &principal)).await.is_err() {
        return;
    }
    info!(session = id, app = %principal.app, admin = principal.admin, "session opened");

    let (out_tx, out_rx) = mpsc::channel::<pb::Frame>(OUT_QUEUE);
    let writer = spawn_writer(&svc, sink, out_rx);
    let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
    let kill = svc.inner.ctx.shutdown.child_token();
    let mut session = Session::open(svc, id, principal, out_tx, internal_tx, kill.clone());
    session.serve(&mut source, internal_rx, kill).await;
    session.cleanup().await;
    // Dropping the session drops its sender of the out queue: the writer ends
    // once the queued frames are written.
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

fn welcome(svc: &ApiService, id: u64, principal: &Principal) -> pb::Frame {
    let limits = &svc.inner.limits;
    pb::Frame::of(Kind::Welcome(pb::Welcome {
        version: PROTOCOL_VERSION,
        session_id: id,
        app: principal.app.clone(),
        admin: principal.admin,
        node_version: env!("CARGO_PKG_VERSION").into(),
        max_frame_bytes: limits.max_frame_bytes,
        stream_window_bytes: limits.stream_window_bytes,
        max_streams: limits.max_streams_per_session,
        bulk_streams: true,
    }))
}

/// The one task that writes to the app: every producer queues into `out_rx`,
/// so frames never interleave and a slow app only fills the queue.
fn spawn_writer<IO>(
    svc: &ApiService,
    mut sink: SplitSink<Framed<IO, FrameCodec>, pb::Frame>,
    mut out_rx: mpsc::Receiver<pb::Frame>,
) -> JoinHandle<()>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    svc.spawn(async move {
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
    })
}

pub(in crate::api) struct Session {
    pub(in crate::api) svc: ApiService,
    pub(in crate::api) id: u64,
    pub(in crate::api) principal: Principal,
    /// Frames towards the app, drained by the writer task.
    pub(in crate::api) out: mpsc::Sender<pb::Frame>,
    /// Where the session's background work reports back.
    pub(in crate::api) internal_tx: mpsc::Sender<Internal>,
    pub(in crate::api) events: broadcast::Receiver<NodeEvent>,
    pub(in crate::api) content_events: broadcast::Receiver<ContentEvent>,
    /// Stateless requests running beside the loop.
    pub(in crate::api) inflight: Arc<Semaphore>,
    /// What admins see of this session; [`report`] keeps it current.
    pub(in crate::api) state: Arc<Mutex<pb::SessionState>>,
    /// Ends the session from outside (shutdown, token revoked).
    pub(in crate::api) kill: CancellationToken,
    pub(in crate::api) topics: HashSet<String>,
    pub(in crate::api) services: HashSet<String>,
    /// Accept tasks of the app's protocols, by name.
    pub(in crate::api) protocols: HashMap<String, JoinHandle<()>>,
    pub(in crate::api) streams: StreamTable,
    pub(in crate::api) publishes: Publishes,
    pub(in crate::api) watching: bool,
}

impl Session {
    /// Creates the session and lists it among the node's live sessions, where
    /// admins see it and revocation finds it.
    fn open(
        svc: ApiService,
        id: u64,
        principal: Principal,
        out: mpsc::Sender<pb::Frame>,
        internal_tx: mpsc::Sender<Internal>,
        kill: CancellationToken,
    ) -> Self {
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
        let max_inflight = svc.inner.limits.max_inflight_requests as usize;
        Self {
            events: svc.inner.ctx.node.subscribe_events(),
            content_events: svc.inner.content.subscribe_events(),
            inflight: Arc::new(Semaphore::new(max_inflight)),
            svc,
            id,
            principal,
            out,
            internal_tx,
            state,
            kill,
            topics: HashSet::new(),
            services: HashSet::new(),
            protocols: HashMap::new(),
            streams: StreamTable::new(),
            publishes: Publishes::default(),
            watching: false,
        }
    }

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
                        warn!(session = self.id, app = %self.principal.app, error = %chain(&e), "bad frame; closing session");
                        self.send(goodbye(e.code(), e.to_string())).await;
                        return;
                    }
                    Some(Ok(frame)) => {
                        if let Err(e) = self.on_frame(frame).await {
                            warn!(session = self.id, app = %self.principal.app, error = %chain(&e), "protocol violation; closing session");
                            self.send(goodbye(e.code, e.message)).await;
                            return;
                        }
                    }
                },
                event = self.events.recv() => self.on_node_event(event).await,
                event = self.content_events.recv() => self.on_content_event(event).await,
                Some(msg) = internal_rx.recv() => self.on_internal(msg).await,
            }
        }
    }

    pub(in crate::api) async fn send(&self, frame: pb::Frame) {
        // An app that stops reading fills `out`; racing the kill token keeps
        // revocation and shutdown working for it. Errors mean the session ends.
        tokio::select! {
            _ = self.out.send(frame) => {}
            _ = self.kill.cancelled() => {}
        }
    }

    pub(in crate::api) async fn reply(
        &self,
        id: u64,
        result: Result<pb::response::Result, ApiError>,
    ) {
        self.send(response(id, result)).await;
    }

    /// An app frame; an error is a protocol violation that ends the session.
    async fn on_frame(&mut self, frame: pb::Frame) -> Result<(), ApiError> {
        match frame.kind {
            Some(Kind::Request(req)) => {
                self.on_request(req).await;
                Ok(())
            }
            Some(Kind::StreamData(d)) => self.on_stream_data(d),
            Some(Kind::StreamCredit(c)) => self.on_stream_credit(c),
            Some(Kind::StreamClose(c)) => {
                self.on_stream_close(c);
                Ok(())
            }
            Some(other) => Err(violation(format!(
                "apps may not send {} frames",
                kind_name(&other)
            ))),
            None => Err(violation("empty frame".into())),
        }
    }

    async fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Opened {
                request_id,
                stream_id,
                result,
            } => self.on_opened(request_id, stream_id, result).await,
            Internal::ContentOpened {
                request_id,
                stream_id,
                bulk,
                result,
            } => {
                self.on_content_opened(request_id, stream_id, bulk, result)
                    .await
            }
            Internal::Inbound {
                protocol,
                peer,
                stream,
            } => self.on_inbound(protocol, peer, stream).await,
            Internal::Failed(id, error) => self.on_stream_failed(id, error).await,
            Internal::ReaderDone(id) => self.on_copy_done(id, true),
            Internal::WriterDone(id) => self.on_copy_done(id, false),
        }
    }

    /// Releases everything the session created, then unlists it.
    async fn cleanup(&mut self) {
        self.release_protocols().await;
        self.release_registrations().await;
        for kind in self.streams.reset_all() {
            self.stream_ended(kind, "session_ended");
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

/// What a session holds node-wide by reference count (topics, services).
impl Session {
    /// At the session's end: every topic, then every service it held.
    pub(in crate::api) async fn release_registrations(&mut self) {
        for topic in std::mem::take(&mut self.topics) {
            self.release_topic(&topic).await;
        }
        for name in std::mem::take(&mut self.services) {
            self.release_service(&name).await;
        }
    }

    /// Takes one session's reference to a shared node-level object; the
    /// first reference runs `on_first` (which tells the node), and when that
    /// fails nothing is counted.
    pub(in crate::api) async fn acquire<F>(
        counts: &tokio::sync::Mutex<HashMap<String, usize>>,
        name: &str,
        on_first: F,
    ) -> Result<(), ApiError>
    where
        F: std::future::Future<Output = Result<(), ApiError>>,
    {
        let mut counts = counts.lock().await;
        let count = counts.get(name).copied().unwrap_or(0);
        if count == 0 {
            on_first.await?;
        }
        counts.insert(name.to_owned(), count + 1);
        Ok(())
    }

    /// Drops one session's reference to a shared node-level object and sends
    /// `on_last` to the node when it was the last one.
    pub(in crate::api) async fn release(
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
                let _ = self.svc.inner.ctx.node.send(on_last).await;
            }
        }
    }
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
