//! The front-end driver, in the client (the client VM, or the host in the
//! sandbox backend): it owns the driver end of the inter-VM channel and serves
//! the p2pvm API on a local Unix socket — the same socket protocol `p2pd`
//! serves in host mode, so `guest-api`, `p2pctl` and every app work unchanged.
//!
//! ```text
//!  app ─ Unix socket ─► bridge ─► ChannelStream ─► driver pump ⇄ region ⇄ back-end
//! ```
//!
//! The front-end never interprets API frames: each app connection becomes one
//! channel session and bytes are copied both ways. The one exception is a
//! bulk attachment (a connection that starts with the bulk magic, see
//! `p2pvm-bulk`): the front-end forwards its preamble on a channel session,
//! hands the app a shared-memory ring, and copies the bulk frames the
//! back-end answers with straight into it. When the service side
//! restarts, the channel resets: every app connection is closed (in-flight
//! requests fail with a disconnect), `guest-api` reconnects, and the new
//! session opens as soon as the new service side attaches.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes};
use p2pvm_bulk::attach::{self, Preamble, Reply};
use p2pvm_bulk::frames::{Decoder, Frame};
use p2pvm_channel::{Connector, LinkState, Side, Source};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Why the front-end could not start.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The channel could not be attached.
    #[error(transparent)]
    Channel(#[from] p2pvm_channel::ChannelError),
    /// The app socket could not be bound.
    #[error(transparent)]
    Bind(#[from] p2pvm_proto::socket::BindError),
    /// An OS call failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Where the front-end gets its channel and serves apps.
#[derive(Debug, Clone)]
pub struct Options {
    /// The supervisor's broker (sandbox backend) or this VM's channel device.
    pub channel: Source,
    /// The app-facing API socket.
    pub socket: PathBuf,
    /// Where to write the channel's figures every second (Prometheus text;
    /// the sandbox supervisor serves them with its own), if anywhere.
    pub figures: Option<PathBuf>,
}

/// Attaches to the channel and serves apps until `shutdown`.
pub async fn run(opts: Options, shutdown: CancellationToken) -> Result<(), FrontendError> {
    let from = opts.channel.clone();
    let (region, events) =
        tokio::task::spawn_blocking(move || p2pvm_channel::connect(&from, Side::Driver))
            .await
            .map_err(std::io::Error::other)??;
    let (pump, connector) = p2pvm_channel::driver(region, events);
    if let Some(path) = opts.figures.clone() {
        tokio::spawn(write_figures(pump.stats(), path, shutdown.clone()));
    }
    let pump_task = tokio::spawn(pump.run(shutdown.clone()));
    tokio::spawn(log_link(connector.state()));
    let listener = bind(&opts.socket)?;
    info!(socket = %opts.socket.display(), "front-end serving apps");
    serve(listener, connector, shutdown.clone()).await;
    let _ = pump_task.await;
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

/// How often the figures file is rewritten.
const FIGURES_EVERY: Duration = Duration::from_secs(1);

/// Rewrites `path` with the pump's counts every [`FIGURES_EVERY`] until
/// `shutdown` (whole or not at all: written aside, then renamed).
async fn write_figures(
    stats: std::sync::Arc<p2pvm_channel::PumpStats>,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    let tmp = path.with_extension("tmp");
    let mut tick = tokio::time::interval(FIGURES_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let text = figures_text(&stats.counts());
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            debug!(path = %path.display(), error = %e, "cannot write the channel's figures");
        }
    }
}

/// The front-end's side of the channel in Prometheus' text format (the same
/// figures the back-end serves as `p2pvm_channel_*`).
pub fn figures_text(c: &p2pvm_channel::PumpCounts) -> String {
    let family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let mut s = format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (labels, v) in samples {
            let suffix = if kind == "counter" { "_total" } else { "" };
            s.push_str(&format!("{name}{suffix}{labels} {v}\n"));
        }
        s
    };
    let p = "p2pvm_frontend_channel";
    [
        family(
            &format!("{p}_messages"),
            "counter",
            "The front-end's channel messages",
            &[
                ("{direction=\"in\"}", c.received),
                ("{direction=\"out\"}", c.sent),
            ],
        ),
        family(
            &format!("{p}_doorbells"),
            "counter",
            "Doorbells the front-end rang",
            &[("", c.doorbells)],
        ),
        family(
            &format!("{p}_wakeups"),
            "counter",
            "Times the back-end's doorbell woke the front-end",
            &[("", c.wakeups)],
        ),
        family(
            &format!("{p}_receive_batches"),
            "counter",
            "Looks at the ring that found messages",
            &[("", c.batches)],
        ),
        family(
            &format!("{p}_resets"),
            "counter",
            "Times the channel went down",
            &[("", c.resets)],
        ),
        family(
            &format!("{p}_sessions"),
            "gauge",
            "App sessions open over the channel",
            &[("", c.sessions)],
        ),
    ]
    .concat()
}

fn bind(path: &Path) -> Result<UnixListener, FrontendError> {
    Ok(UnixListener::from_std(p2pvm_proto::socket::bind(path)?)?)
}

/// Accepts app connections and bridges each over its own channel session.
pub async fn serve(listener: UnixListener, connector: Connector, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((app, _)) => {
                    tokio::spawn(serve_app(app, connector.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// How long a new app connection may take to show what it is.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);

/// One app connection: an API session bridged byte for byte, or a bulk
/// attachment served from a ring.
async fn serve_app(mut app: UnixStream, connector: Connector) {
    let mut first = [0u8; 4];
    match tokio::time::timeout(OPENING_TIMEOUT, app.read_exact(&mut first)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    if attach::is_attach(&first) {
        let preamble = tokio::time::timeout(OPENING_TIMEOUT, Preamble::read_after_magic(&mut app));
        match preamble.await {
            Ok(Ok(p)) => bulk(app, connector.open(), p).await,
            Ok(Err(e)) => debug!(error = %e, "bad bulk attachment"),
            Err(_) => debug!("bulk attachment timed out"),
        }
        return;
    }
    bridge(app, connector.open(), first).await
}

/// Copies bytes both ways until both directions end or either side fails.
/// A channel reset fails the channel side; dropping the app socket then tells
/// the app its session is gone. `first` are the bytes already read from the
/// app to tell what it is.
async fn bridge(app: UnixStream, session: p2pvm_channel::ChannelStream, first: [u8; 4]) {
    let id = session.id();
    let (mut ar, mut aw) = app.into_split();
    let (mut cr, mut cw) = session.into_split();
    let up = async {
        cw.write_all(&first).await?;
        let r = tokio::io::copy(&mut ar, &mut cw).await;
        let _ = cw.shutdown().await;
        r
    };
    // Towards the app the channel's chunks are written as they are, several
    // per vectored write, never re-copied through an intermediate buffer.
    let down = async {
        let mut n = 0u64;
        let mut batch = Vec::new();
        let r = loop {
            match cr.chunks(&mut batch, DOWN_BATCH).await {
                Ok(true) => match write_chunks(&mut aw, &mut batch).await {
                    Ok(w) => n += w as u64,
                    Err(e) => break Err(e),
                },
                Ok(false) => break Ok(n),
                Err(e) => break Err(e),
            }
        };
        let _ = aw.shutdown().await;
        r
    };
    let (u, d) = tokio::join!(up, down);
    match (u, d) {
        (Ok(a), Ok(b)) => debug!(session = id, up = a, down = b, "app session ended"),
        (u, d) => debug!(session = id, up = ?u.err(), down = ?d.err(), "app session aborted"),
    }
}

/// Bytes gathered into one vectored write towards an app.
const DOWN_BATCH: usize = 1 << 20;

/// A bulk attachment: asks the back-end for the ticket's bytes on `session`
/// and copies the bulk frames it answers with into a ring handed to the app.
/// The back-end is untrusted input here like everywhere: a malformed frame
/// fails the app's stream, nothing more.
async fn bulk(app: UnixStream, session: p2pvm_channel::ChannelStream, p: Preamble) {
    let (mut cr, mut cw) = session.into_split();
    let asked = async {
        cw.write_all(&p.encode()).await?;
        Reply::read(&mut cr).await
    };
    let reply = match asked.await {
        Ok(r) => r,
        Err(e) => Reply::refused(UNAVAILABLE, format!("the service side did not answer: {e}")),
    };
    if reply.code != 0 {
        attach::refuse(app, &reply).await;
        return;
    }
    let mut ring = match attach::offer_ring(app, u64::from(p.capacity)).await {
        Ok(r) => r,
        Err(e) => {
            debug!(error = %e, "could not hand a bulk ring over");
            return;
        }
    };
    let mut frames = Decoder::new();
    let mut batch = Vec::new();
    loop {
        // Everything already received at once: one wake per batch, not per buffer.
        let more = tokio::select! {
            c = cr.chunks(&mut batch, DOWN_BATCH) => c,
            gone = ring.reader_gone() => {
                // Dropping the session resets it: the back-end stops.
                debug!(reason = %gone, "bulk reader left before the end");
                return;
            }
        };
        match more {
            Ok(true) => {}
            Ok(false) => {
                return ring.fail(UNAVAILABLE, "the service side ended the stream early");
            }
            Err(e) => {
                return ring.fail(UNAVAILABLE, &format!("the service side went away: {e}"));
            }
        }
        for mut chunk in batch.drain(..) {
            loop {
                match frames.next(&mut chunk) {
                    Ok(None) => break,
                    Ok(Some(Frame::Data(b))) => {
                        if let Err(e) = ring.write_batched(&b).await {
                            debug!(error = %e, "bulk reader left before the end");
                            return;
                        }
                    }
                    Ok(Some(Frame::End)) => return ring.finish(),
                    Ok(Some(Frame::Error { code, message })) => {
                        return ring.fail(code, &message);
                    }
                    Err(e) => {
                        warn!(error = %e, "the service side broke a bulk stream");
                        return ring.fail(UNAVAILABLE, &e.to_string());
                    }
                }
            }
        }
        ring.announce();
    }
}

/// The code an app's bulk stream fails with when the service side goes away.
const UNAVAILABLE: u32 = p2pvm_proto::pb::ErrorCode::Unavailable as u32;

/// Writes all of `chunks` (emptying it) with vectored writes; returns the bytes.
async fn write_chunks(
    w: &mut (impl AsyncWrite + Unpin),
    chunks: &mut Vec<Bytes>,
) -> std::io::Result<usize> {
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut start = 0;
    while start < chunks.len() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks[start..]
            .iter()
            .take(64)
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let first = &mut chunks[start];
            if n >= first.len() {
                n -= first.len();
                start += 1;
            } else {
                first.advance(n);
                n = 0;
            }
        }
    }
    chunks.clear();
    Ok(total)
}

async fn log_link(mut state: tokio::sync::watch::Receiver<LinkState>) {
    while state.changed().await.is_ok() {
        match state.borrow_and_update().clone() {
            LinkState::Up { resets } => info!(resets, "channel attached: the service side is up"),
            LinkState::Down { reason, resets } => {
                warn!(%reason, resets, "channel down: app sessions were closed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_figures_are_prometheus_text_with_the_counts() {
        let c = p2pvm_channel::PumpCounts {
            doorbells: 3,
            wakeups: 4,
            sent: 10,
            received: 12,
            batches: 5,
            resets: 1,
            sessions: 2,
        };
        let text = super::figures_text(&c);
        for line in [
            "# TYPE p2pvm_frontend_channel_messages counter",
            "p2pvm_frontend_channel_messages_total{direction=\"in\"} 12",
            "p2pvm_frontend_channel_messages_total{direction=\"out\"} 10",
            "p2pvm_frontend_channel_doorbells_total 3",
            "p2pvm_frontend_channel_wakeups_total 4",
            "p2pvm_frontend_channel_receive_batches_total 5",
            "p2pvm_frontend_channel_resets_total 1",
            "p2pvm_frontend_channel_sessions 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
