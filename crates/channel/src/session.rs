//! One session: a byte stream in each direction with credit-based flow control,
//! exposed to its user as [`ChannelStream`] (`AsyncRead + AsyncWrite`).
//!
//! The stream side and the pump share [`State`] under a mutex. The stream
//! appends what the app writes and takes what the pump received; the pump
//! turns state into messages (`next_message`) and messages into state
//! (in `mux`). Neither ever waits for the other while holding the lock.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::wire::{Header, Kind};

/// Bytes an app may have queued for sending beyond what the peer's window
/// accepts before `poll_write` waits.
const OUT_BUFFER: usize = 512 * 1024;

/// Received payloads smaller than this are appended to the previous queue
/// entry while it stays under `MERGE_UP_TO` bytes.
const MERGE_BELOW: usize = 512;
const MERGE_UP_TO: usize = 4096;

/// What a session tells the pump: "I have something to send".
#[derive(Debug, Default)]
pub(crate) struct Wants {
    pub queue: Mutex<Vec<Arc<Session>>>,
    pub notify: Notify,
    /// Set once the pump has stopped: nothing will ever be sent again.
    /// Read on every write, so a lock-free cell rather than a mutex.
    closed: std::sync::OnceLock<String>,
}

impl Wants {
    /// The pump is gone: kills every queued session and any scheduled later.
    pub fn close(&self, why: &str) {
        let _ = self.closed.set(why.to_owned());
        let queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        for s in queued {
            s.lock().kill(why);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Session {
    pub id: u32,
    state: Mutex<State>,
    wants: Arc<Wants>,
}

#[derive(Debug)]
pub(crate) struct State {
    /// Bytes we buffer for the app at most (our receive window).
    pub rx_window: u64,
    inbound: VecDeque<Bytes>,
    /// Received and not yet returned to the peer as credit.
    pub in_window: u64,
    /// Read by the app and not yet returned as credit.
    consumed: u64,
    pub fin_in: bool,
    /// Why the session is dead, if it is.
    pub reset: Option<String>,
    read_waker: Option<Waker>,

    outbound: VecDeque<Bytes>,
    outbound_len: usize,
    /// Bytes the peer's window still accepts.
    pub peer_credit: u64,
    pub tx_window: u64,
    fin_out_wanted: bool,
    pub fin_out_sent: bool,
    /// The app dropped its stream before both directions ended cleanly.
    pub dropped: bool,
    rst_sent: bool,
    write_waker: Option<Waker>,

    /// Driver side: OPEN not yet sent.
    pub open_wanted: bool,
    /// OPEN sent (driver) or received (device): the peer knows this session.
    pub opened: bool,
    /// In the pump's ready list.
    queued: bool,
    /// Gone from the pump's table; nothing more will be sent or received.
    pub closed: bool,
}

impl Session {
    pub fn new(
        id: u32,
        rx_window: u64,
        tx_window: u64,
        wants: Arc<Wants>,
        opened: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            wants,
            state: Mutex::new(State {
                rx_window,
                inbound: VecDeque::new(),
                in_window: 0,
                consumed: 0,
                fin_in: false,
                reset: None,
                read_waker: None,
                outbound: VecDeque::new(),
                outbound_len: 0,
                peer_credit: tx_window,
                tx_window,
                fin_out_wanted: false,
                fin_out_sent: false,
                dropped: false,
                rst_sent: false,
                write_waker: None,
                open_wanted: !opened,
                opened,
                queued: false,
                closed: false,
            }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a bug elsewhere; the data is still
        // consistent enough to tear the session down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts the session on the pump's ready list unless it is there already.
    pub fn schedule(self: &Arc<Self>, st: &mut State) {
        if let Some(why) = self.wants.closed.get() {
            st.kill(why);
            return;
        }
        if !st.queued && !st.closed {
            st.queued = true;
            self.wants
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.clone());
            self.wants.notify.notify_one();
        }
    }
}

impl State {
    /// The pump took the session off its ready list.
    pub fn unqueue(&mut self) {
        self.queued = false;
    }

    /// Kills the session and wakes its user.
    pub fn kill(&mut self, why: &str) {
        if self.reset.is_none() {
            self.reset = Some(why.to_owned());
        }
        self.closed = true;
        self.wake_all();
    }

    pub fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    /// Accepts received bytes (window already checked by the caller).
    pub fn push_inbound(&mut self, data: Bytes) {
        if self.dropped {
            // Nobody will read it; the peer has not seen our RST yet.
            return;
        }
        self.in_window += data.len() as u64;
        // Tiny messages are merged so that queue entries cannot cost more
        // memory than the bytes the window admits.
        if data.len() < MERGE_BELOW
            && let Some(last) = self.inbound.back_mut()
            && last.len() + data.len() <= MERGE_UP_TO
        {
            let mut merged = bytes::BytesMut::with_capacity(last.len() + data.len());
            merged.extend_from_slice(last);
            merged.extend_from_slice(&data);
            *last = merged.freeze();
        } else {
            self.inbound.push_back(data);
        }
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    pub fn add_credit(&mut self, n: u64) {
        self.peer_credit += n;
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    pub fn set_fin_in(&mut self) {
        self.fin_in = true;
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    fn credit_due(&self) -> bool {
        !self.dropped && self.consumed > 0 && self.consumed >= self.rx_window / 4
    }

    /// True when both directions ended cleanly or the session was aborted.
    pub fn finished(&self) -> bool {
        self.rst_sent || self.reset.is_some() || (self.fin_in && self.fin_out_sent)
    }

    /// The next message this session wants to send, if any (and it can). A
    /// DATA payload is gathered from as many queued chunks as fit one buffer,
    /// in `payload` (empty for control messages); the pump copies the pieces
    /// into the region back to back, so small writes cost no extra messages.
    pub fn next_message(&mut self, max_payload: usize, payload: &mut Vec<Bytes>) -> Option<Header> {
        payload.clear();
        if self.closed {
            return None;
        }
        if self.open_wanted {
            self.open_wanted = false;
            self.opened = true;
            return Some(Header::control(Kind::Open, 0, 0));
        }
        if self.reset.is_some() {
            return None;
        }
        if self.credit_due() {
            let n = self.consumed.min(u64::from(u32::MAX));
            self.consumed -= n;
            self.in_window -= n;
            return Some(Header::control(Kind::Credit, 0, n as u32));
        }
        if self.peer_credit > 0 && !self.outbound.is_empty() {
            let limit = max_payload.min(self.peer_credit as usize);
            let mut n = 0;
            while n < limit {
                let Some(front) = self.outbound.front_mut() else {
                    break;
                };
                let take = front.len().min(limit - n);
                let piece = if take == front.len() {
                    self.outbound.pop_front().expect("front exists")
                } else {
                    front.split_to(take)
                };
                n += take;
                payload.push(piece);
            }
            self.outbound_len -= n;
            self.peer_credit -= n as u64;
            if self.outbound_len < OUT_BUFFER
                && let Some(w) = self.write_waker.take()
            {
                w.wake();
            }
            return Some(Header {
                kind: Kind::Data,
                session: 0,
                len: n as u32,
                value: 0,
            });
        }
        if self.dropped
            && !self.fin_out_wanted
            && self.peer_credit == 0
            && !self.outbound.is_empty()
        {
            // Dropped without a clean shutdown while the peer is not reading:
            // what is queued may never go out. Abort instead of waiting
            // forever. (After a shutdown the rest is still delivered as the
            // peer reads; if the peer gives up, its RST ends the session.)
            self.outbound.clear();
            self.outbound_len = 0;
            self.fin_out_wanted = false;
        }
        if self.outbound.is_empty() {
            if self.fin_out_wanted && !self.fin_out_sent {
                self.fin_out_sent = true;
                return Some(Header::control(Kind::Fin, 0, 0));
            }
            if self.dropped && !self.rst_sent && !(self.fin_in && self.fin_out_sent) {
                self.rst_sent = true;
                return Some(Header::control(Kind::Rst, 0, 0));
            }
        }
        None
    }

    /// Whether another call to `next_message` could produce something.
    pub fn has_more(&self) -> bool {
        if self.closed || self.reset.is_some() {
            return false;
        }
        self.open_wanted
            || self.credit_due()
            || (!self.outbound.is_empty()
                && (self.peer_credit > 0 || (self.dropped && !self.fin_out_wanted)))
            || (self.outbound.is_empty()
                && ((self.fin_out_wanted && !self.fin_out_sent)
                    || (self.dropped && !self.rst_sent && !(self.fin_in && self.fin_out_sent))))
    }
}

/// Runs the end-of-stream logic once the last user handle is gone.
#[derive(Debug)]
struct Handle {
    session: Arc<Session>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let session = &self.session;
        let mut st = session.lock();
        st.dropped = true;
        if !st.inbound.is_empty() {
            // Closed with unread data (as TCP): the exchange is broken, so
            // abort now rather than finish sending.
            st.outbound.clear();
            st.outbound_len = 0;
            st.fin_out_wanted = false;
        }
        st.inbound.clear();
        // A clean close (both FINs) needs nothing; otherwise the pump sends
        // what is queued, then FIN or RST as `next_message` decides.
        if st.reset.is_none() && !(st.fin_in && st.fin_out_sent) {
            session.schedule(&mut st);
        }
    }
}

fn poll_read(
    session: &Arc<Session>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let mut st = session.lock();
    let mut copied = 0;
    while buf.remaining() > 0 {
        let Some(front) = st.inbound.front_mut() else {
            break;
        };
        let n = front.len().min(buf.remaining());
        buf.put_slice(&front[..n]);
        front.advance(n);
        if front.is_empty() {
            st.inbound.pop_front();
        }
        copied += n;
    }
    if copied > 0 {
        consumed(session, &mut st, copied);
        return Poll::Ready(Ok(()));
    }
    end_or_wait(&mut st, cx).map_ok(|_| ())
}

fn consumed(session: &Arc<Session>, st: &mut State, n: usize) {
    st.consumed += n as u64;
    if st.credit_due() {
        session.schedule(st);
    }
}

/// No data buffered: end of stream, the reset, or wait.
fn end_or_wait(st: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    if st.fin_in {
        return Poll::Ready(Ok(None));
    }
    if let Some(why) = &st.reset {
        return Poll::Ready(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            why.clone(),
        )));
    }
    st.read_waker = Some(cx.waker().clone());
    Poll::Pending
}

/// Moves every buffered chunk (up to `max` bytes, at least one chunk) into
/// `out`; `Ok(false)` at the end of the stream.
fn poll_chunks(
    session: &Arc<Session>,
    cx: &mut Context<'_>,
    out: &mut Vec<Bytes>,
    max: usize,
) -> Poll<io::Result<bool>> {
    let mut st = session.lock();
    let mut taken = 0;
    while taken < max {
        let Some(b) = st.inbound.pop_front() else {
            break;
        };
        taken += b.len();
        out.push(b);
    }
    if taken > 0 {
        consumed(session, &mut st, taken);
        return Poll::Ready(Ok(true));
    }
    end_or_wait(&mut st, cx).map_ok(|_| false)
}

fn poll_chunk(session: &Arc<Session>, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    let mut st = session.lock();
    if let Some(b) = st.inbound.pop_front() {
        consumed(session, &mut st, b.len());
        return Poll::Ready(Ok(Some(b)));
    }
    end_or_wait(&mut st, cx)
}

/// Room for more outbound bytes, or why there never will be.
fn poll_room(st: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if let Some(why) = &st.reset {
        return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, why.clone())));
    }
    if st.fin_out_wanted {
        return Poll::Ready(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "write after shutdown",
        )));
    }
    let room = OUT_BUFFER.saturating_sub(st.outbound_len);
    if room == 0 {
        st.write_waker = Some(cx.waker().clone());
        return Poll::Pending;
    }
    Poll::Ready(Ok(room))
}

fn queue(session: &Arc<Session>, st: &mut State, data: Bytes) {
    st.outbound_len += data.len();
    st.outbound.push_back(data);
    session.schedule(st);
}

fn poll_write(session: &Arc<Session>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    if buf.is_empty() {
        return Poll::Ready(Ok(0));
    }
    let mut st = session.lock();
    let room = ready!(poll_room(&mut st, cx))?;
    let n = room.min(buf.len());
    queue(session, &mut st, Bytes::copy_from_slice(&buf[..n]));
    Poll::Ready(Ok(n))
}

/// Queues a whole chunk without copying it (the pump copies it into the
/// region); it may overfill the out buffer by itself, never by more.
fn poll_send(
    session: &Arc<Session>,
    cx: &mut Context<'_>,
    data: &mut Bytes,
) -> Poll<io::Result<()>> {
    if data.is_empty() {
        return Poll::Ready(Ok(()));
    }
    let mut st = session.lock();
    ready!(poll_room(&mut st, cx))?;
    queue(session, &mut st, std::mem::take(data));
    Poll::Ready(Ok(()))
}

fn shutdown(session: &Arc<Session>) {
    let mut st = session.lock();
    if st.reset.is_none() && !st.fin_out_wanted {
        st.fin_out_wanted = true;
        session.schedule(&mut st);
    }
}

/// One session's byte stream, as its user sees it: an app connection on the
/// front-end, an API session on the back-end.
#[derive(Debug)]
pub struct ChannelStream {
    h: Arc<Handle>,
}

impl ChannelStream {
    pub(crate) fn new(session: Arc<Session>) -> Self {
        Self {
            h: Arc::new(Handle { session }),
        }
    }

    /// The session id (unique among live sessions of one channel).
    pub fn id(&self) -> u32 {
        self.h.session.id
    }

    /// Splits into halves that can be used from different tasks; the session
    /// ends when both are dropped.
    pub fn into_split(self) -> (ChannelReader, ChannelWriter) {
        (
            ChannelReader { h: self.h.clone() },
            ChannelWriter { h: self.h },
        )
    }
}

/// The receiving half of a [`ChannelStream`].
#[derive(Debug)]
pub struct ChannelReader {
    h: Arc<Handle>,
}

impl ChannelReader {
    /// The next received chunk as the channel delivered it (no copy); `None`
    /// at the end of the stream.
    pub async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| poll_chunk(&self.h.session, cx)).await
    }

    /// Waits for data, then appends every chunk already received (up to about
    /// `max` bytes) to `out`, for one vectored write; false at the end.
    pub async fn chunks(&mut self, out: &mut Vec<Bytes>, max: usize) -> io::Result<bool> {
        std::future::poll_fn(|cx| poll_chunks(&self.h.session, cx, out, max)).await
    }
}

/// The sending half of a [`ChannelStream`].
#[derive(Debug)]
pub struct ChannelWriter {
    h: Arc<Handle>,
}

impl ChannelWriter {
    /// Sends `data` without copying it first: bulk producers hand over the
    /// buffers they already own, and the pump copies them into the region.
    pub async fn send(&mut self, data: Bytes) -> io::Result<()> {
        let mut data = data;
        std::future::poll_fn(|cx| poll_send(&self.h.session, cx, &mut data)).await
    }
}

impl AsyncRead for ChannelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read(&self.h.session, cx, buf)
    }
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read(&self.h.session, cx, buf)
    }
}

impl AsyncWrite for ChannelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write(&self.h.session, cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes handed to the stream are on their way; the pump sends them as
        // the peer's window allows. There is nothing to push harder.
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        shutdown(&self.h.session);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write(&self.h.session, cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        shutdown(&self.h.session);
        Poll::Ready(Ok(()))
    }
}
