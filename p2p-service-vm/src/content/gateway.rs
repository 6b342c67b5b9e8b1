//! The local HTTP gateway: `GET /content/<id>` streams verified bytes to any
//! media player or browser, with single-range `Range` requests for seeking.
//! Off by default; bound to loopback only (the config refuses anything else).
//!
//! Any local process can connect, so what a client can hold is bounded: at
//! most [`MAX_CONNECTIONS`] at once (more are closed on accept), request
//! headers within [`HEADER_READ_TIMEOUT`] (slowloris), and a connection that
//! moves no byte either way for [`STALL_TIMEOUT`] (silent, idle, or not
//! reading its response) is closed.

use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use p2pvm_content::ContentId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{ContentService, ContentServiceError};

/// Connections served at once. A media player opens one or two; each
/// streaming response reads ahead a few MiB, so this also bounds the
/// gateway's memory.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Time for a client to send a request's headers, from when the gateway
/// starts waiting for them.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that moves no byte for this long is closed: one that never
/// sends a request, an idle keep-alive, or a client that stopped reading
/// (a paused player reconnects with a `Range` when it resumes, as it would
/// with nginx's `send_timeout`).
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves the gateway on `addr` until `shutdown`.
pub async fn serve(
    svc: ContentService,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "HTTP gateway listening");
    serve_on(listener, svc, Limits::default(), shutdown).await
}

/// The gateway's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub connections: usize,
    pub header_read: Duration,
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: MAX_CONNECTIONS,
            header_read: HEADER_READ_TIMEOUT,
            stall: STALL_TIMEOUT,
        }
    }
}

/// Accepts connections on `listener` and serves each within `limits`.
pub(crate) async fn serve_on(
    listener: tokio::net::TcpListener,
    svc: ContentService,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/content/{id}", get(content).head(content))
        .with_state(svc);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "gateway at its connection cap; closing a new connection");
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let progress = Progress::new();
            let io = hyper_util::rt::TokioIo::new(Watched {
                inner: stream,
                progress: progress.clone(),
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .serve_connection(io, service);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(%peer, error = %e, "gateway connection ended");
                },
                _ = progress.stalled(limits.stall) => {
                    debug!(%peer, "gateway connection moved nothing for {:?}; closed", limits.stall);
                }
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

/// Parses a single `bytes=` range against an item of `size` bytes.
/// `Ok(None)`: no usable Range header (serve everything). `Err`: unsatisfiable.
fn parse_range(value: &str, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multipart ranges are rare for media; answer with the whole item.
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        size.saturating_sub(n)..size
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .saturating_add(1)
                .min(size)
        };
        start..end
    };
    if range.start >= range.end || range.start >= size {
        return Err(());
    }
    Ok(Some(range))
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, msg).into_response()
}

async fn content(
    State(svc): State<ContentService>,
    Path(id): Path<String>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    let Ok(id) = id.parse::<ContentId>() else {
        return error(StatusCode::BAD_REQUEST, "not a content id\n".into());
    };
    let info = match svc.stat(&id).await {
        Ok(i) => i,
        Err(ContentServiceError::NotFound(_)) => {
            return error(StatusCode::NOT_FOUND, format!("no content {id}\n"));
        }
        Err(e) => return error(StatusCode::BAD_GATEWAY, format!("{e}\n")),
    };
    let size = info.manifest.manifest.size;
    let mime = info.manifest.manifest.mime_type.clone();
    let requested = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, size))
        .unwrap_or(Ok(None));
    let range = match requested {
        Ok(r) => r,
        Err(()) => {
            let mut resp = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range not satisfiable\n".into(),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
    };
    let partial = range.is_some();
    let range = range.unwrap_or(0..size);
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, mime)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, range.end - range.start)
        .header(header::ETAG, format!("\"{id}\""));
    builder = if partial {
        builder.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!(
                "bytes {}-{}/{size}",
                range.start,
                range.end.saturating_sub(1)
            ),
        )
    } else {
        builder.status(StatusCode::OK)
    };
    if method == axum::http::Method::HEAD || range.is_empty() {
        return builder.body(Body::empty()).unwrap_or_default();
    }
    // A browser seeking a film asks for ranges; only a whole-item request keeps it.
    match svc.fetch(&id, Some(range), false).await {
        Ok((_, _, stream)) => builder.body(Body::from_stream(stream)).unwrap_or_default(),
        Err(e) => {
            warn!(%id, error = %e, "gateway fetch failed");
            error(StatusCode::BAD_GATEWAY, format!("{e}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Progress, parse_range};
    use std::time::{Duration, Instant};

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

    #[test]
    fn ranges_parse_like_rfc_9110() {
        assert_eq!(parse_range("bytes=0-99", 1000), Ok(Some(0..100)));
        assert_eq!(parse_range("bytes=900-", 1000), Ok(Some(900..1000)));
        assert_eq!(parse_range("bytes=-100", 1000), Ok(Some(900..1000)));
        assert_eq!(parse_range("bytes=990-5000", 1000), Ok(Some(990..1000)));
        assert_eq!(parse_range("bytes=1000-", 1000), Err(()));
        assert_eq!(parse_range("bytes=5-2", 1000), Err(()));
        assert_eq!(parse_range("bytes=a-b", 1000), Err(()));
        assert_eq!(parse_range("items=0-1", 1000), Ok(None));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Ok(None));
    }
}
