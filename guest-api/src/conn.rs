//! The connection task: owns the socket, matches responses to requests, routes
//! events, pubsub messages and stream data, and reconnects when the node goes
//! away, restoring the session's subscriptions, protocols, services and watch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use p2pvm_proto::{FrameCodec, PROTOCOL_VERSION, pb};
use pb::frame::Kind;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::codec::Framed;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::stream::{AppStream, Shared};

/// Outbound frames queued before senders wait.
pub(crate) const OUT_QUEUE: usize = 1024;
/// Per-subscription / per-protocol delivery queue.
pub(crate) const DELIVERY_QUEUE: usize = 1024;
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A pubsub message delivered to this app.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub data: Bytes,
    /// Original publisher's peer id (empty when unsigned).
    pub source: String,
    /// Neighbour that forwarded it.
    pub via: String,
}

/// How to reach and authenticate to the node.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub socket: PathBuf,
    pub token: String,
    pub name: String,
    pub reconnect: bool,
}

/// What survives reconnection: the app's registrations.
#[derive(Debug, Default)]
pub(crate) struct Registrations {
    pub topics: HashMap<String, mpsc::Sender<Message>>,
    pub protocols: HashMap<String, mpsc::Sender<AppStream>>,
    pub services: Vec<String>,
    pub watching: bool,
}

pub(crate) struct StreamSlot {
    shared: Arc<Mutex<Shared>>,
}

/// State shared by the client handle and the connection task.
pub(crate) struct Inner {
    pub target: Target,
    pub next_id: AtomicU64,
    pub out: Mutex<Option<mpsc::Sender<pb::Frame>>>,
    pub pending: Mutex<HashMap<u64, oneshot::Sender<pb::response::Result>>>,
    pub regs: Mutex<Registrations>,
    pub streams: Mutex<HashMap<u64, StreamSlot>>,
    /// Streams the node opened for us, created as soon as the response arrives
    /// so that data following it is never dropped; taken by `open_stream`.
    pub opened: Mutex<HashMap<u64, AppStream>>,
    pub events: broadcast::Sender<pb::event::Kind>,
    pub welcome: Mutex<pb::Welcome>,
    /// Bumped after each (re)connection, so callers can wait for one.
    pub generation: watch::Sender<u64>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("socket", &self.target.socket)
            .finish_non_exhaustive()
    }
}

type Conn = Framed<UnixStream, FrameCodec>;

/// Connects and says Hello; returns the framed connection and the Welcome.
pub(crate) async fn dial(target: &Target) -> Result<(Conn, pb::Welcome)> {
    let io = UnixStream::connect(&target.socket)
        .await
        .map_err(|e| Error::Connect {
            path: target.socket.display().to_string(),
            reason: e.to_string(),
        })?;
    // A generous decode limit: the node announces its own, which is never larger.
    let mut framed = Framed::new(io, FrameCodec::new(16 << 20));
    let hello = pb::Frame::of(Kind::Hello(pb::Hello {
        version: PROTOCOL_VERSION,
        token: target.token.clone(),
        client_name: target.name.clone(),
    }));
    // A node that refuses the session may have closed already; its Goodbye is
    // still readable, so a failed send is not the end of the story.
    let _ = framed.send(hello).await;
    match framed.next().await {
        Some(Ok(pb::Frame {
            kind: Some(Kind::Welcome(w)),
        })) => Ok((framed, w)),
        Some(Ok(pb::Frame {
            kind: Some(Kind::Goodbye(g)),
        })) => {
            let e = g.error.unwrap_or_default();
            Err(Error::Closed {
                code: e.code(),
                message: e.message,
            })
        }
        Some(Ok(_)) => Err(Error::Protocol("expected Welcome".into())),
        Some(Err(e)) => Err(Error::Protocol(e.to_string())),
        None => Err(Error::Disconnected),
    }
}

impl Inner {
    pub(crate) fn sender(&self) -> Result<mpsc::Sender<pb::Frame>> {
        self.out
            .lock()
            .expect("lock")
            .clone()
            .ok_or(Error::Disconnected)
    }

    /// Sends a request and waits for its response.
    pub(crate) async fn request(&self, op: pb::request::Op) -> Result<pb::response::Result> {
        let out = self.sender()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("lock").insert(id, tx);
        let frame = pb::Frame::of(Kind::Request(pb::Request { id, op: Some(op) }));
        if out.send(frame).await.is_err() {
            self.pending.lock().expect("lock").remove(&id);
            return Err(Error::Disconnected);
        }
        match rx.await {
            Ok(pb::response::Result::Error(e)) => Err(Error::from_pb(e)),
            Ok(r) => Ok(r),
            Err(_) => Err(Error::Disconnected),
        }
    }

    pub(crate) fn new_stream(
        self: &Arc<Self>,
        id: u64,
        peer: String,
        protocol: String,
    ) -> Result<AppStream> {
        let window = self.welcome.lock().expect("lock").stream_window_bytes;
        let shared = Shared::new(window);
        let mut streams = self.streams.lock().expect("lock");
        // Forget streams the app has dropped (only our slot still holds them).
        streams.retain(|_, s| Arc::strong_count(&s.shared) > 1);
        streams.insert(
            id,
            StreamSlot {
                shared: shared.clone(),
            },
        );
        drop(streams);
        Ok(AppStream::new(
            id,
            peer,
            protocol,
            shared,
            self.sender()?,
            window,
        ))
    }
}

/// Runs one connection until it drops, then reconnects if asked to.
pub(crate) async fn run(inner: Arc<Inner>, conn: Conn) {
    let mut next = Some(conn);
    loop {
        let conn = match next.take() {
            Some(c) => c,
            None => match restore(&inner).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "giving up reconnecting");
                    return;
                }
            },
        };
        let (mut sink, mut source) = conn.split();
        let (tx, mut rx) = mpsc::channel::<pb::Frame>(OUT_QUEUE);
        *inner.out.lock().expect("lock") = Some(tx);
        inner.generation.send_modify(|g| *g += 1);
        let writer = tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if sink.feed(f).await.is_err() {
                    return;
                }
                while let Ok(f) = rx.try_recv() {
                    if sink.feed(f).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        });
        while let Some(frame) = source.next().await {
            match frame {
                Ok(f) => {
                    if !dispatch(&inner, f).await {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "bad frame from node");
                    break;
                }
            }
        }
        writer.abort();
        disconnected(&inner);
        if !inner.target.reconnect {
            return;
        }
    }
}

/// Fails in-flight work after the connection dropped.
fn disconnected(inner: &Inner) {
    *inner.out.lock().expect("lock") = None;
    inner.pending.lock().expect("lock").clear();
    inner.opened.lock().expect("lock").clear();
    for (_, s) in inner.streams.lock().expect("lock").drain() {
        s.shared
            .lock()
            .expect("lock")
            .fail("session to the node was lost".into());
    }
}

/// Reconnects with backoff and re-registers what the app had.
async fn restore(inner: &Arc<Inner>) -> Result<Conn> {
    let mut delay = RECONNECT_MIN;
    loop {
        match dial(&inner.target).await {
            Ok((mut conn, welcome)) => {
                debug!(session = welcome.session_id, "reconnected");
                *inner.welcome.lock().expect("lock") = welcome;
                let ops = replay_ops(inner);
                let mut ok = true;
                for (id, op) in ops.into_iter().enumerate() {
                    let f = pb::Frame::of(Kind::Request(pb::Request {
                        id: u64::MAX - id as u64,
                        op: Some(op),
                    }));
                    if conn.send(f).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    return Ok(conn);
                }
            }
            Err(Error::Closed { code, message }) if code == pb::ErrorCode::Unauthenticated => {
                return Err(Error::Closed { code, message });
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

fn replay_ops(inner: &Inner) -> Vec<pb::request::Op> {
    use pb::request::Op;
    let regs = inner.regs.lock().expect("lock");
    let mut ops = Vec::new();
    for t in regs.topics.keys() {
        ops.push(Op::Subscribe(pb::SubscribeRequest { topic: t.clone() }));
    }
    for p in regs.protocols.keys() {
        ops.push(Op::RegisterProtocol(pb::RegisterProtocolRequest {
            protocol: p.clone(),
        }));
    }
    for s in &regs.services {
        ops.push(Op::AdvertiseService(pb::AdvertiseServiceRequest {
            name: s.clone(),
        }));
    }
    if regs.watching {
        ops.push(Op::WatchEvents(pb::WatchEventsRequest {}));
    }
    ops
}

/// Routes one frame; false when the session is over.
async fn dispatch(inner: &Arc<Inner>, frame: pb::Frame) -> bool {
    match frame.kind {
        Some(Kind::Response(r)) => {
            let opened = match &r.result {
                Some(pb::response::Result::StreamOpened(o)) => Some(o.stream_id),
                Some(pb::response::Result::ContentStream(o)) => Some(o.stream_id),
                _ => None,
            };
            if let Some(id) = opened
                && let Ok(s) = inner.new_stream(id, String::new(), String::new())
            {
                inner.opened.lock().expect("lock").insert(id, s);
            }
            if let Some(tx) = inner.pending.lock().expect("lock").remove(&r.id) {
                let result = r
                    .result
                    .unwrap_or(pb::response::Result::Error(pb::Error::new(
                        pb::ErrorCode::Internal,
                        "empty response",
                    )));
                let _ = tx.send(result);
            }
        }
        Some(Kind::Event(e)) => on_event(inner, e.kind).await,
        Some(Kind::StreamData(d)) => {
            if let Some(s) = inner.streams.lock().expect("lock").get(&d.stream_id) {
                let mut sh = s.shared.lock().expect("lock");
                sh.inbound.extend_from_slice(&d.data);
                if let Some(w) = sh.read_waker.take() {
                    w.wake();
                }
            }
        }
        Some(Kind::StreamCredit(c)) => {
            if let Some(s) = inner.streams.lock().expect("lock").get(&c.stream_id) {
                let mut sh = s.shared.lock().expect("lock");
                sh.credit = sh.credit.saturating_add(c.bytes);
                if let Some(w) = sh.write_waker.take() {
                    w.wake();
                }
            }
        }
        Some(Kind::StreamClose(c)) => {
            let mut streams = inner.streams.lock().expect("lock");
            if c.reset {
                if let Some(s) = streams.remove(&c.stream_id) {
                    let why = c
                        .error
                        .map(|e| e.message)
                        .unwrap_or_else(|| "reset by peer".into());
                    s.shared.lock().expect("lock").fail(why);
                }
            } else if let Some(s) = streams.get(&c.stream_id) {
                let mut sh = s.shared.lock().expect("lock");
                sh.eof = true;
                sh.wake_all();
            }
        }
        Some(Kind::Goodbye(g)) => {
            let e = g.error.unwrap_or_default();
            warn!(code = ?e.code(), message = %e.message, "node closed the session");
            return false;
        }
        _ => {
            warn!("unexpected frame from node");
            return false;
        }
    }
    true
}

async fn on_event(inner: &Arc<Inner>, kind: Option<pb::event::Kind>) {
    use pb::event::Kind as E;
    let Some(kind) = kind else { return };
    match kind {
        E::PubsubMessage(m) => {
            let tx = inner
                .regs
                .lock()
                .expect("lock")
                .topics
                .get(&m.topic)
                .cloned();
            if let Some(tx) = tx {
                let msg = Message {
                    topic: m.topic,
                    data: m.data,
                    source: m.source,
                    via: m.via,
                };
                // Waiting here back-pressures only this app's own session; the
                // node reports what it had to drop as EventsLost.
                if tx.send(msg).await.is_err() {
                    debug!("subscription dropped by the app");
                }
            }
        }
        E::InboundStream(s) => {
            let tx = inner
                .regs
                .lock()
                .expect("lock")
                .protocols
                .get(&s.protocol)
                .cloned();
            if let (Some(tx), Ok(stream)) =
                (tx, inner.new_stream(s.stream_id, s.peer_id, s.protocol))
            {
                // Dropping the stream on a full queue resets it: the peer sees a
                // clear failure instead of a hang.
                let _ = tx.try_send(stream);
            }
        }
        other => {
            let _ = inner.events.send(other);
        }
    }
}
