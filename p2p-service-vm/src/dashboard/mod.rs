//! The operator's dashboard: pages rendered by the node itself, served on
//! the `[metrics] listen` address beside `/metrics`, behind the admin token.
//!
//! ```text
//!  browser ─► GET/POST /login (admin token) ─► auth: session cookie
//!     │                                        (HttpOnly, SameSite=Strict)
//!     ├─► GET / /peers /content /security /compute ─► pages ─► ApiService::as_operator
//!     │   GET /vms (VM mode) ─► vms: p2pvmm's /vms.json on the TAP's host side
//!     │      ?live=1: the <main> alone; live.js asks for it every 2 s
//!     └─► POST /peers/ban /peers/unban /logout ─► auth: same origin + CSRF token
//!                                                 ─► ledger, node
//!  history: content bytes in/out sampled every 10 s for an hour (the chart)
//! ```
//!
//! Server-rendered HTML (maud escapes every value by construction) with one
//! small script and one stylesheet compiled into the binary: nothing to build
//! with a Node toolchain, nothing fetched from a third party, and pages that
//! still work with scripts off (they only stop updating by themselves).

mod auth;
mod history;
mod pages;
pub(crate) mod vms;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::routing::{get, post};

use crate::api::ApiService;

/// What the dashboard's handlers share.
pub struct Dashboard {
    api: ApiService,
    sessions: auth::Sessions,
    history: Arc<history::History>,
    started: Instant,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").finish_non_exhaustive()
    }
}

impl auth::AuthState for Arc<Dashboard> {
    fn sessions(&self) -> &auth::Sessions {
        &self.sessions
    }

    fn is_operator_token(&self, token: &str) -> bool {
        self.api.is_operator_token(token)
    }
}

impl Dashboard {
    /// The dashboard of the node `api` serves, on `port`; starts sampling
    /// its bandwidth (a task of the node's, ended by its shutdown).
    pub fn start(api: ApiService, port: u16) -> Arc<Self> {
        let history = Arc::new(history::History::default());
        let ctx = api.context();
        ctx.tasks.spawn(history::sample(
            history.clone(),
            ctx.ledger.clone(),
            ctx.shutdown.clone(),
        ));
        Arc::new(Self {
            api,
            sessions: auth::Sessions::new(port),
            history,
            started: Instant::now(),
        })
    }

    /// The dashboard's routes, with the headers every answer carries.
    pub fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/", get(pages::overview::overview))
            .route("/peers", get(pages::peers::peers))
            .route("/content", get(pages::content::content))
            .route("/security", get(pages::security::security))
            .route("/compute", get(pages::compute::compute))
            .route("/vms", get(pages::vms::vms))
            .route("/peers/ban", post(pages::peers::ban))
            .route("/peers/unban", post(pages::peers::unban))
            .route(
                "/login",
                get(auth::login_page).post(auth::login::<Arc<Dashboard>>),
            )
            .route("/logout", post(auth::logout::<Arc<Dashboard>>))
            .route("/assets/style.css", get(pages::style))
            .route("/assets/live.js", get(pages::script))
            .layer(axum::middleware::map_response(guard_headers))
            .with_state(self.clone())
    }
}

/// Scripts, styles and forms only from the node itself, no framing (so no
/// clickjacking of the ban button), nothing cached, no referrer sent to
/// another site. (`no-referrer` would also make the browser send
/// `Origin: null` on the dashboard's own forms, which the origin check
/// must refuse.)
async fn guard_headers(mut r: axum::response::Response) -> axum::response::Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}
