//! `GET /metrics` over HTTP/1.1 on the address `[metrics] listen` names
//! (loopback or a private address; the config refuses others), and beside it
//! the operator's dashboard ([`crate::dashboard`]) unless the config turns
//! it off.
//!
//! The figures say what the node does, not what it holds, so they are served
//! without a token, as Kubo's and Firecracker's are: keeping the address off
//! the internet is the operator's (and the config's) job; the dashboard's
//! pages need the operator's login. What one client can hold is bounded all
//! the same (`p2pvm_httpd`): a few connections at once, request headers
//! within [`HEADER_READ_TIMEOUT`], a connection closed when idle for
//! [`STALL_TIMEOUT`] or after [`CONNECTION_LIFETIME`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Metrics;
use crate::report::chain;

/// Connections served at once: a Prometheus server or two, and a person
/// whose browser opens up to six.
const MAX_CONNECTIONS: usize = 16;
/// Time for a client to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that moves nothing for this long is closed (a browser's
/// idle keep-alive; the dashboard's pages ask every 2 s while shown).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a connection is kept (a scrape takes milliseconds; keep-alive
/// between scrapes a few seconds apart is welcome, an idle hold is not).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// The text format's content type (version 0.0.4, what Prometheus asks for
/// first and every scraper reads).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr`; the caller learns a bad address at start, not later.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "metrics listening (GET /metrics)");
    Ok(listener)
}

/// Serves `/metrics`, and `dashboard`'s pages when given, on `listener`
/// until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    dashboard: Option<Router>,
    shutdown: CancellationToken,
) {
    let mut app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    if let Some(d) = dashboard {
        app = app.merge(d);
    }
    let loopback = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(true);
    let limits = p2pvm_httpd::Limits {
        connections: MAX_CONNECTIONS,
        header_read: HEADER_READ_TIMEOUT,
        stall: STALL_TIMEOUT,
        lifetime: Some(CONNECTION_LIFETIME),
        // On the TAP in VM mode the host is one client and the scrapers
        // another; on loopback everyone is one address.
        per_client: if loopback {
            MAX_CONNECTIONS
        } else {
            MAX_CONNECTIONS / 2
        },
    };
    p2pvm_httpd::serve(listener, app, limits, "metrics", shutdown).await;
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    // The ledger's totals take its lock and walk its peers: off the runtime.
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => {
            warn!(error = %chain(&e), "metrics could not be encoded");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(e) => {
            warn!(error = %chain(&e), "metrics encoding panicked");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
