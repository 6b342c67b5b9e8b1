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
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use p2pvm_content::ContentId;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ContentService, ContentServiceError};
use crate::report::chain;

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
    serve_on(listener, svc, limits(), shutdown).await
}

/// The gateway's bounds.
pub(crate) fn limits() -> p2pvm_httpd::Limits {
    p2pvm_httpd::Limits {
        connections: MAX_CONNECTIONS,
        header_read: HEADER_READ_TIMEOUT,
        stall: STALL_TIMEOUT,
        lifetime: None,
        // Loopback only: every client is one address.
        per_client: MAX_CONNECTIONS,
    }
}

/// Accepts connections on `listener` and serves each within `limits`.
pub(crate) async fn serve_on(
    listener: tokio::net::TcpListener,
    svc: ContentService,
    limits: p2pvm_httpd::Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/content/{id}", get(content).head(content))
        .with_state(svc);
    p2pvm_httpd::serve(listener, app, limits, "gateway", shutdown).await;
    Ok(())
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
        .header(header::ETAG, format!("\"{id}\""))
        // A peer's bytes shown as a page run no script and share no origin
        // with anything on this host (the dashboard's cookies live here).
        .header(header::CONTENT_SECURITY_POLICY, "sandbox")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
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
            warn!(%id, error = %chain(&e), "gateway fetch failed");
            error(StatusCode::BAD_GATEWAY, format!("{e}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

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
