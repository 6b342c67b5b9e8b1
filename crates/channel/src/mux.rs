//! The pump: one task per channel side that moves messages between the rings
//! and the sessions, keeps the link handshake going, and sleeps on the event
//! channel when there is nothing to do.
//!
//! Fairness: sessions with something to send wait in a round-robin list and
//! each gets one message (at most one buffer) per turn, so a film streaming at
//! full speed and an app's one-line request interleave buffer by buffer.
//! Flow control: each session's receiver grants a window; the sender never
//! has more than that outstanding, and a peer that sends beyond it is a
//! protocol violation that resets the channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::answer::AnswerPoll;
use crate::event::EventChannel;
use crate::layout::ResetReason;
use crate::session::{ChannelStream, Session, Wants};
use crate::wire::{Header, Kind};

/// Bytes the front-end buffers per session (back-end → front-end direction:
/// content streams, so it is the larger one).
pub const DRIVER_WINDOW: u64 = 4 << 20;
/// Bytes the back-end buffers per session (front-end → back-end).
pub const DEVICE_WINDOW: u64 = 1 << 20;
/// Live sessions per channel the back-end accepts; further OPENs are refused
/// with RST. Bounds the back-end's memory to `MAX_SESSIONS × DEVICE_WINDOW`.
pub const MAX_SESSIONS: usize = 256;
/// Replies owed to no session (RSTs for refused OPENs) that may wait for
/// receive buffers before the peer counts as abusive.
const MAX_CONTROL_BACKLOG: usize = 1024;
/// Messages handled per direction per pump step.
const BUDGET: usize = 64;
/// When idle, how long to keep looking before sleeping on the event channel:
/// adapted between these bounds (longer after a poll that found work). Kept
/// short: on a 2-core machine the peer process needs the core we would spin
/// on (measured: 50 µs cost ~15% of a 1 GiB stream's throughput vs 10 µs).
const POLL_MIN: Duration = Duration::from_micros(2);
const POLL_MAX: Duration = Duration::from_micros(10);
/// The header is rechecked at least this often even without notifications
/// (a peer that died cannot ring).
const RECHECK: Duration = Duration::from_millis(100);

/// Something the peer did that a correct peer never does. The channel is reset.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Violation {
    /// Ring indices, descriptors or addresses.
    #[error("invalid ring: {0}")]
    Ring(String),
    /// Malformed message or broken session protocol.
    #[error("invalid message: {0}")]
    Message(String),
    /// Sent beyond the window.
    #[error("flow control: {0}")]
    Flow(String),
}

impl Violation {
    pub(crate) fn reason(&self) -> ResetReason {
        match self {
            Violation::Ring(_) => ResetReason::BadRing,
            Violation::Message(_) => ResetReason::BadMessage,
            Violation::Flow(_) => ResetReason::FlowControl,
        }
    }
}

/// Ring access for one side of an attached channel.
pub(crate) trait End: Send {
    /// Copies up to `budget` incoming messages out of the rings.
    fn recv(&mut self, budget: usize, out: &mut Vec<(Header, Bytes)>) -> Result<usize, Violation>;
    /// Whether a message can be sent now.
    fn can_send(&mut self) -> Result<bool, Violation>;
    /// Sends one message, its payload gathered from `payload`'s pieces; only
    /// after `can_send` said yes.
    fn send(&mut self, h: &Header, payload: &[Bytes]) -> Result<(), Violation>;
    /// Makes everything since the last call visible; true if the peer needs a notification.
    fn publish(&mut self) -> Result<bool, Violation>;
    /// Asks to be notified of input (and of send space); true if work already arrived.
    fn arm(&mut self, want_space: bool) -> Result<bool, Violation>;
    /// Cheap check for input, for polling.
    fn has_input(&mut self) -> bool;
    /// Largest payload per message.
    fn max_payload(&self) -> usize;
}

/// What a header check found.
#[derive(Debug)]
pub(crate) enum Refresh {
    Same,
    /// This side published a status change the peer should see now.
    Changed,
    Up,
    Down(String),
}

/// One side's part of the header handshake.
pub(crate) trait Link: Send + 'static {
    type End: End;
    fn refresh(&mut self, end: &mut Option<Self::End>) -> Refresh;
    fn fail(&mut self, end: &mut Option<Self::End>, v: &Violation);
    fn stop(&mut self);
}

/// Whether the channel is attached, as seen from one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not yet attached.
    Down {
        /// Why it went down last (empty before the first attach).
        reason: String,
        /// How many times the link has gone down.
        resets: u64,
    },
    /// Attached; sessions flow.
    Up {
        /// How many times the link has gone down before.
        resets: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Device,
    Driver,
}

/// The pump of one channel side. Run it with [`Pump::run`].
pub struct Pump<L: Link, E: EventChannel> {
    role: Role,
    link: L,
    end: Option<L::End>,
    events: E,
    wants: Arc<Wants>,
    sessions: HashMap<u32, Arc<Session>>,
    ready: VecDeque<Arc<Session>>,
    /// Replies that belong to no live session (RST for a refused OPEN).
    control: VecDeque<Header>,
    accept: Option<mpsc::Sender<ChannelStream>>,
    state: watch::Sender<LinkState>,
    resets: u64,
    poll: Duration,
    /// How long to keep looking for an expected answer.
    answer: AnswerPoll,
    /// The pieces of the message being sent (kept to reuse its allocation).
    scratch: Vec<Bytes>,
    stats: Arc<PumpStats>,
}

/// What a pump has done so far, counted as it goes and read at any time
/// (the node's metrics). Shared with whoever asked for it.
#[derive(Debug, Default)]
pub struct PumpStats {
    doorbells: AtomicU64,
    wakeups: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    batches: AtomicU64,
    resets: AtomicU64,
    sessions: AtomicU64,
}

/// A reading of [`PumpStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpCounts {
    /// Doorbells this side rang (in VM mode each is an exit of its VM).
    pub doorbells: u64,
    /// Times the peer's doorbell woke this side.
    pub wakeups: u64,
    /// Messages sent and received.
    pub sent: u64,
    /// Messages received.
    pub received: u64,
    /// Looks at the ring that found messages: `received / batches` is how
    /// many were waiting, on average, when this side looked.
    pub batches: u64,
    /// Times the link went down (a reset, the peer gone).
    pub resets: u64,
    /// Sessions open now.
    pub sessions: u64,
}

impl PumpStats {
    /// The counts now.
    pub fn counts(&self) -> PumpCounts {
        let r = |a: &AtomicU64| a.load(AtomicOrdering::Relaxed);
        PumpCounts {
            doorbells: r(&self.doorbells),
            wakeups: r(&self.wakeups),
            sent: r(&self.sent),
            received: r(&self.received),
            batches: r(&self.batches),
            resets: r(&self.resets),
            sessions: r(&self.sessions),
        }
    }

    fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, AtomicOrdering::Relaxed);
    }
}

impl<L: Link, E: EventChannel> std::fmt::Debug for Pump<L, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pump")
            .field("role", &self.role)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl<L: Link, E: EventChannel> Pump<L, E> {
    pub(crate) fn new(
        role: Role,
        link: L,
        events: E,
        wants: Arc<Wants>,
        accept: Option<mpsc::Sender<ChannelStream>>,
        state: watch::Sender<LinkState>,
    ) -> Self {
        Self {
            role,
            link,
            end: None,
            events,
            wants,
            sessions: HashMap::new(),
            ready: VecDeque::new(),
            control: VecDeque::new(),
            accept,
            state,
            resets: 0,
            poll: POLL_MIN,
            answer: AnswerPoll::default(),
            scratch: Vec::new(),
            stats: Arc::default(),
        }
    }

    /// This pump's counts, to read while it runs.
    pub(crate) fn stats(&self) -> Arc<PumpStats> {
        self.stats.clone()
    }

    /// Rings the peer's doorbell.
    fn ring(&self) {
        PumpStats::add(&self.stats.doorbells, 1);
        let _ = self.events.notify();
    }

    fn windows(&self) -> (u64, u64) {
        match self.role {
            Role::Device => (DEVICE_WINDOW, DRIVER_WINDOW),
            Role::Driver => (DRIVER_WINDOW, DEVICE_WINDOW),
        }
    }

    /// Runs until `shutdown`; then marks this side absent and aborts its sessions.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Whatever we published at start (a reset request, a new generation)
        // should reach the peer now, not at its next timeout.
        self.ring();
        let mut steps = 0u32;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if self.turn() {
                steps += 1;
                if steps.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            if self.end.is_some() && self.poll_briefly().await {
                continue;
            }
            let armed = match self.end.as_mut() {
                Some(end) => end.arm(!self.ready.is_empty() || !self.control.is_empty()),
                None => Ok(false),
            };
            match armed {
                Ok(true) => continue,
                Ok(false) => {}
                Err(v) => {
                    self.violated(&v);
                    continue;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.events.wait() => match r {
                    Ok(()) => PumpStats::add(&self.stats.wakeups, 1),
                    Err(e) => {
                        warn!(error = %e, "event channel failed");
                        tokio::time::sleep(RECHECK).await;
                    }
                },
                _ = self.wants.notify.notified() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
        self.link.stop();
        self.end = None;
        self.down("the channel was shut down");
        for s in self.ready.drain(..) {
            s.lock().kill("the channel was shut down");
        }
        // Sessions opened but never adopted, and any opened from now on.
        self.wants.close("the channel was shut down");
        self.ring();
    }

    /// One synchronous round: header handshake, new sessions, rings. A
    /// violation resets the channel here. Returns whether anything happened.
    pub(crate) fn turn(&mut self) -> bool {
        self.refresh();
        self.adopt();
        match self.step() {
            Ok(progress) => progress,
            Err(v) => {
                self.violated(&v);
                true
            }
        }
    }

    fn violated(&mut self, v: &Violation) {
        warn!(side = ?self.role, reason = %v, "peer violated the channel protocol; resetting");
        self.link.fail(&mut self.end, v);
        self.down(&format!("channel reset: {v}"));
        self.ring();
    }

    /// Whether the channel is attached.
    pub(crate) fn attached(&self) -> bool {
        self.end.is_some()
    }

    fn refresh(&mut self) {
        match self.link.refresh(&mut self.end) {
            Refresh::Same => {}
            Refresh::Changed => {
                self.ring();
            }
            Refresh::Up => {
                self.state.send_replace(LinkState::Up {
                    resets: self.resets,
                });
                self.ring();
            }
            Refresh::Down(reason) => {
                self.down(&reason);
                self.ring();
            }
        }
    }

    /// Aborts every session the peer knew about.
    fn down(&mut self, reason: &str) {
        self.resets += 1;
        PumpStats::add(&self.stats.resets, 1);
        self.control.clear();
        let role = self.role;
        self.sessions.retain(|_, s| {
            let mut st = s.lock();
            if st.opened || role == Role::Device {
                st.kill(reason);
                false
            } else {
                true
            }
        });
        self.ready.retain(|s| !s.lock().closed);
        self.stats
            .sessions
            .store(self.sessions.len() as u64, AtomicOrdering::Relaxed);
        self.state.send_replace(LinkState::Down {
            reason: reason.to_owned(),
            resets: self.resets,
        });
    }

    /// Moves sessions that asked to send (or are new) onto the ready list.
    fn adopt(&mut self) {
        let mut q = self.wants.queue.lock().unwrap_or_else(|e| e.into_inner());
        for s in q.drain(..) {
            if self.role == Role::Driver && !self.sessions.contains_key(&s.id) && !s.lock().closed {
                self.sessions.insert(s.id, s.clone());
            }
            self.ready.push_back(s);
        }
    }

    fn step(&mut self) -> Result<bool, Violation> {
        let Some(end) = self.end.as_mut() else {
            return Ok(false);
        };
        let mut inbox = Vec::new();
        let received = end.recv(BUDGET, &mut inbox)?;
        for (h, payload) in inbox {
            self.on_message(h, payload)?;
        }
        let sent = self.send_round()?;
        let end = self.end.as_mut().expect("still attached");
        if end.publish()? {
            self.ring();
        }
        if received > 0 || sent > 0 {
            self.answer.step(Instant::now(), sent, received);
        }
        if received > 0 {
            PumpStats::add(&self.stats.batches, 1);
            PumpStats::add(&self.stats.received, received as u64);
        }
        PumpStats::add(&self.stats.sent, sent as u64);
        self.stats
            .sessions
            .store(self.sessions.len() as u64, AtomicOrdering::Relaxed);
        Ok(received > 0 || sent > 0)
    }

    fn on_message(&mut self, h: Header, payload: Bytes) -> Result<(), Violation> {
        if h.kind == Kind::Open {
            return self.on_open(h.session);
        }
        let Some(s) = self.sessions.get(&h.session).cloned() else {
            // A session we already closed; the peer had not seen our RST yet.
            debug!(session = h.session, kind = ?h.kind, "message for a closed session");
            return Ok(());
        };
        let mut st = s.lock();
        match h.kind {
            Kind::Open => unreachable!("handled above"),
            Kind::Data => {
                if h.len == 0 {
                    // An honest sender never sends an empty DATA; unlimited
                    // empty ones would queue without using any window.
                    return Err(Violation::Message(format!(
                        "session {}: empty DATA",
                        h.session
                    )));
                }
                if st.fin_in {
                    return Err(Violation::Message(format!(
                        "session {}: data after FIN",
                        h.session
                    )));
                }
                if st.in_window + u64::from(h.len) > st.rx_window {
                    return Err(Violation::Flow(format!(
                        "session {}: {} bytes outstanding exceed the {}-byte window",
                        h.session,
                        st.in_window + u64::from(h.len),
                        st.rx_window
                    )));
                }
                st.push_inbound(payload);
            }
            Kind::Credit => {
                let credit = st.peer_credit + u64::from(h.value);
                if credit > st.tx_window {
                    return Err(Violation::Flow(format!(
                        "session {}: credit {credit} exceeds the {}-byte window",
                        h.session, st.tx_window
                    )));
                }
                st.add_credit(u64::from(h.value));
                if st.has_more() {
                    s.schedule(&mut st);
                }
            }
            Kind::Fin => {
                st.set_fin_in();
                if st.finished() {
                    st.closed = true;
                    drop(st);
                    self.sessions.remove(&h.session);
                } else if st.dropped {
                    s.schedule(&mut st);
                }
            }
            Kind::Rst => {
                st.kill("the session was reset by the other side");
                drop(st);
                self.sessions.remove(&h.session);
            }
        }
        Ok(())
    }

    fn on_open(&mut self, id: u32) -> Result<(), Violation> {
        if self.role != Role::Device {
            return Err(Violation::Message("OPEN sent to the front-end".into()));
        }
        if self.sessions.contains_key(&id) {
            return Err(Violation::Message(format!("session {id} opened twice")));
        }
        if self.sessions.len() >= MAX_SESSIONS {
            // The refusals themselves must not pile up: a front-end that keeps
            // opening without taking our replies is not honest.
            if self.control.len() >= MAX_CONTROL_BACKLOG {
                return Err(Violation::Flow(
                    "refused OPENs keep coming while their RSTs are not taken".into(),
                ));
            }
            warn!(
                session = id,
                limit = MAX_SESSIONS,
                "session limit reached; refusing"
            );
            self.control.push_back(Header::control(Kind::Rst, id, 0));
            return Ok(());
        }
        let (rx, tx) = self.windows();
        let s = Session::new(id, rx, tx, self.wants.clone(), true);
        let stream = ChannelStream::new(s.clone());
        match &self.accept {
            // Full cannot happen (the queue holds at most MAX_SESSIONS, all
            // live); closed means no one accepts: refused either way.
            Some(accept) if accept.try_send(stream).is_ok() => {
                self.sessions.insert(id, s);
            }
            _ => self.control.push_back(Header::control(Kind::Rst, id, 0)),
        }
        Ok(())
    }

    fn send_round(&mut self) -> Result<usize, Violation> {
        let end = self.end.as_mut().expect("attached");
        let max = end.max_payload();
        let mut sent = 0;
        while let Some(h) = self.control.front() {
            if !end.can_send()? {
                return Ok(sent);
            }
            end.send(h, &[])?;
            self.control.pop_front();
            sent += 1;
        }
        while sent < BUDGET * 2 {
            let Some(s) = self.ready.pop_front() else {
                break;
            };
            if !end.can_send()? {
                self.ready.push_front(s);
                break;
            }
            let mut st = s.lock();
            let Some(mut h) = st.next_message(max, &mut self.scratch) else {
                st.unqueue();
                continue;
            };
            h.session = s.id;
            end.send(&h, &self.scratch)?;
            self.scratch.clear();
            sent += 1;
            if st.finished() {
                st.closed = true;
                st.unqueue();
                st.wake_all();
                drop(st);
                self.sessions.remove(&s.id);
            } else if st.has_more() {
                drop(st);
                self.ready.push_back(s);
            } else {
                st.unqueue();
            }
        }
        Ok(sent)
    }

    /// Looks for work for a short, adaptive while before going to sleep;
    /// longer when an answer to what was just sent is due soon (`answer`).
    async fn poll_briefly(&mut self) -> bool {
        let start = Instant::now();
        let answer_due = self
            .events
            .poll_for_answers()
            .then(|| self.answer.deadline())
            .flatten()
            .filter(|d| *d > start + self.poll);
        loop {
            let wants = !self
                .wants
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            let input = self.end.as_mut().is_some_and(|e| e.has_input());
            if wants || input {
                self.poll = (self.poll * 2).min(POLL_MAX);
                return true;
            }
            if let Some(due) = answer_due {
                if Instant::now() >= due {
                    self.answer.missed();
                    return false;
                }
                // Whatever else wants this CPU (in a one-vCPU guest, the app
                // itself) runs first: only idle time is spent looking.
                std::thread::yield_now();
            } else if start.elapsed() >= self.poll {
                self.poll = (self.poll / 2).max(POLL_MIN);
                return false;
            }
            tokio::task::yield_now().await;
        }
    }
}
