//! The accept loop of every p2pvm HTTP endpoint: the content gateway, the
//! node's `/metrics` and dashboard, `p2pvmm up --metrics`.
//!
//! ```text
//!  TcpListener ─► accept ─► slot free? ─no─► closed at once
//!                               │yes
//!                               ▼
//!            hyper HTTP/1.1 (header deadline) ◄─ axum Router
//!                               │
//!             closed when it moves no byte for `stall`, when it has
//!             lived `lifetime`, or at shutdown
//! ```
//!
//! `axum::serve` has no connection cap, no deadline for a request's headers
//! and no idle timeout: any client could hold a connection (or a thousand)
//! open forever. Every endpoint here is local or host-only, but its clients
//! are not all trusted (any local process; the service VM for `p2pvmm`'s),
//! so each is served within [`Limits`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Whether the internet cannot reach `ip` (loopback, RFC 1918, link-local,
/// IPv6 unique local): where these endpoints may listen, and whom the
/// dashboard may ask, since none of them carries a token of its own.
pub fn is_private(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unique_local() || v6.is_unicast_link_local()
        }
    }
}

/// What one endpoint lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed on accept.
    pub connections: usize,
    /// Time for a client to send a request's headers (slowloris).
    pub header_read: Duration,
    /// A connection that moves no byte either way for this long is closed
    /// (silent, idle keep-alive, or not reading its response).
    pub stall: Duration,
    /// Longest a connection lives, whatever it does (`None`: no bound).
    pub lifetime: Option<Duration>,
    /// Connections one client address may hold at once, so one client
    /// cannot take every place (on loopback every client is one address:
    /// set it to `connections` there).
    pub per_client: usize,
}

/// Connections each client address holds now.
#[derive(Default)]
struct PerClient(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PerClient {
    /// A place for `ip`, if it has fewer than `max`.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<ClientPlace> {
        let mut held = self.0.lock().expect("lock");
        let n = held.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientPlace(self.clone(), ip))
    }
}

/// One connection's place in its client's share; given back when dropped.
struct ClientPlace(Arc<PerClient>, std::net::IpAddr);

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut held = self.0.0.lock().expect("lock");
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown`; `name`
/// says which endpoint in logs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    name: &'static str,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let clients = Arc::new(PerClient::default());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    warn!(error = %e, "{name}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Some(place) = clients.take(peer.ip(), limits.per_client) else {
            debug!(%peer, "{name}: this client holds its share of connections; closing a new one");
            drop(stream);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "{name}: at its connection cap; closing a new connection");
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = (slot, place);
            let progress = Progress::new();
            let io = hyper_util::rt::TokioIo::new(Watched {
                inner: stream,
                progress: progress.clone(),
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .serve_connection(io, service);
            let lifetime = async {
                match limits.lifetime {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(%peer, error = %e, "{name}: connection ended");
                },
                _ = progress.stalled(limits.stall) => {
                    debug!(%peer, "{name}: connection moved nothing for {:?}; closed", limits.stall);
                }
                _ = lifetime => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// When a connection last moved a byte, shared by the stream and its
/// watchdog.
#[derive(Clone)]
struct Progress {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn moved(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`.
    async fn stalled(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = self.start.elapsed().saturating_sub(last);
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// A stream that notes every byte it moves in its [`Progress`].
struct Watched<S> {
    inner: S,
    progress: Progress,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress.moved();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.moved();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_means_unreachable_from_the_internet() {
        for ok in [
            "127.0.0.1",
            "10.99.0.1",
            "192.168.1.2",
            "172.16.0.1",
            "169.254.1.1",
            "::1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(is_private(ok.parse().unwrap()), "{ok}");
        }
        for bad in ["0.0.0.0", "8.8.8.8", "100.64.0.1", "::", "2001:db8::1"] {
            assert!(!is_private(bad.parse().unwrap()), "{bad}");
        }
    }
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = Router::new().route("/", get(|| async { "hi" }));
        tokio::spawn(serve(l, app, limits, "test", stop.clone()));
        (addr, stop)
    }

    async fn closed(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 64];
        loop {
            match tokio::time::timeout(within, s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn a_connection_is_stalled_only_after_a_quiet_stretch() {
        let limit = Duration::from_millis(300);
        // Quiet from the start: stalled after the limit, not before.
        let p = Progress::new();
        let t = Instant::now();
        p.stalled(limit).await;
        assert!(t.elapsed() >= limit);
        // Moving every 50 ms keeps it alive through several limits.
        let p = Progress::new();
        let mover = p.clone();
        let moving = tokio::spawn(async move {
            for _ in 0..20 {
                mover.moved();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let t = Instant::now();
        p.stalled(limit).await;
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "stalled after {:?} while bytes moved",
            t.elapsed()
        );
        moving.await.unwrap();
    }

    #[tokio::test]
    async fn past_the_cap_a_connection_is_closed_and_a_silent_one_lasts_until_its_deadline() {
        let limits = Limits {
            connections: 2,
            header_read: Duration::from_millis(300),
            stall: Duration::from_secs(30),
            lifetime: None,
            per_client: 2,
        };
        let (addr, stop) = start(limits).await;
        let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Give the server time to take both.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut c, Duration::from_millis(200)).await,
            "a third got in"
        );
        assert!(
            closed(&mut a, Duration::from_secs(2)).await,
            "a silent one outlived the header deadline"
        );
        assert!(closed(&mut b, Duration::from_secs(2)).await);
        // Room again: a request is answered.
        let mut d = tokio::net::TcpStream::connect(addr).await.unwrap();
        d.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        d.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("hi"),
            "{out}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn one_client_cannot_take_every_place() {
        let limits = Limits {
            connections: 4,
            header_read: Duration::from_secs(5),
            stall: Duration::from_secs(30),
            lifetime: None,
            per_client: 2,
        };
        let (addr, stop) = start(limits).await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut c, Duration::from_millis(300)).await,
            "a third from one client got in"
        );
        // The cap is per client, and a place comes back when its
        // connection ends.
        drop(_a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut d = tokio::net::TcpStream::connect(addr).await.unwrap();
        d.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        d.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        stop.cancel();
    }

    #[tokio::test]
    async fn an_idle_keep_alive_is_closed_after_its_stall_and_lifetime_bounds_a_busy_one() {
        let limits = Limits {
            connections: 4,
            header_read: Duration::from_secs(5),
            stall: Duration::from_millis(300),
            lifetime: Some(Duration::from_millis(900)),
            per_client: 4,
        };
        let (addr, stop) = start(limits).await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(
            closed(&mut idle, Duration::from_secs(2)).await,
            "idle keep-alive kept"
        );
        // A client that asks every 100 ms never stalls, but its life ends.
        let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 256];
        let ended = loop {
            if busy
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                break started.elapsed();
            }
            match tokio::time::timeout(Duration::from_millis(500), busy.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "lifetime not enforced"
            );
        };
        assert!(
            ended >= Duration::from_millis(800),
            "closed early: {ended:?}"
        );
        stop.cancel();
    }
}
