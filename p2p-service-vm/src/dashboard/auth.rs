//! Who may see the dashboard: whoever presents the node's admin token once,
//! at `/login`, and then holds the session cookie it was given.
//!
//! - The cookie is 32 random bytes, `HttpOnly` (scripts cannot read it) and
//!   `SameSite=Strict` (no other site's page sends it); the node keeps only
//!   its hash, so a session cannot be forged without the cookie itself.
//!   Browsers share cookies between the ports of one host, so its name
//!   carries the dashboard's port, and every cookie of that name is tried
//!   (another page on the host could set a decoy to shadow the real one).
//! - Every POST must come from the dashboard's own origin (`Origin` and
//!   `Sec-Fetch-Site`, when the browser sends them) and carry the session's
//!   CSRF token, which only the dashboard's own pages hold. A page request
//!   another site's page made (`Sec-Fetch-Site: cross-site` or
//!   `same-site`: another port of the host) is refused too: pages can start
//!   work (a search).
//! - Wrong tokens are answered slowly and at most [`FAILED_LOGINS_PER_SEC`]
//!   a second node-wide.
//! - Sessions last [`SESSION_TTL`]; at most [`MAX_SESSIONS`] are kept (the
//!   oldest go first); all are in memory, so a restart logs everyone out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Form, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, html};
use rand::RngCore;
use serde::Deserialize;
use tracing::{info, warn};

/// The session cookie's name, before the dashboard's port.
const COOKIE: &str = "p2pvm_dashboard";
/// How long a login lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once.
const MAX_SESSIONS: usize = 32;
/// What a wrong token costs its sender (a 256-bit token cannot be guessed;
/// this keeps a script from trying at line rate all the same).
const FAILED_LOGIN_DELAY: Duration = Duration::from_millis(300);
/// Wrong tokens checked per second, node-wide; more are refused unchecked.
const FAILED_LOGINS_PER_SEC: u32 = 5;

/// The logged-in sessions, by the hash of their cookie.
pub(super) struct Sessions {
    /// `p2pvm_dashboard_<port>`.
    cookie_name: String,
    live: Mutex<HashMap<[u8; 32], Session>>,
    failures: governor::DefaultDirectRateLimiter,
}

struct Session {
    csrf: String,
    since: Instant,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn key(cookie: &str) -> [u8; 32] {
    *blake3::hash(cookie.as_bytes()).as_bytes()
}

impl Sessions {
    /// The sessions of the dashboard on `port`.
    pub(super) fn new(port: u16) -> Self {
        Self {
            cookie_name: format!("{COOKIE}_{port}"),
            live: Mutex::default(),
            failures: governor::RateLimiter::direct(governor::Quota::per_second(
                std::num::NonZeroU32::new(FAILED_LOGINS_PER_SEC).expect("nonzero"),
            )),
        }
    }

    /// A new session: its cookie value.
    fn create(&self) -> String {
        let cookie = random_hex();
        let mut live = self.live.lock().expect("lock");
        live.retain(|_, s| s.since.elapsed() < SESSION_TTL);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live.iter().min_by_key(|(_, s)| s.since).map(|(k, _)| *k)
        {
            live.remove(&oldest);
        }
        live.insert(
            key(&cookie),
            Session {
                csrf: random_hex(),
                since: Instant::now(),
            },
        );
        cookie
    }

    /// The CSRF token of the live session `cookie` names.
    fn csrf_of(&self, cookie: &str) -> Option<String> {
        let live = self.live.lock().expect("lock");
        live.get(&key(cookie))
            .filter(|s| s.since.elapsed() < SESSION_TTL)
            .map(|s| s.csrf.clone())
    }

    fn end(&self, cookie: &str) {
        self.live.lock().expect("lock").remove(&key(cookie));
    }
}

/// A request from a logged-in operator.
pub(super) struct Operator {
    /// The session's CSRF token, for the page's forms.
    pub csrf: String,
    cookie: String,
}

impl Operator {
    /// Checks a submitted form's CSRF token against the session's; the
    /// refusal to answer with when it does not match.
    pub fn check_csrf(&self, submitted: &str) -> Result<(), StaleForm> {
        // blake3 hashes compare in constant time.
        if blake3::hash(submitted.as_bytes()) == blake3::hash(self.csrf.as_bytes()) {
            Ok(())
        } else {
            warn!("dashboard action refused: wrong CSRF token");
            Err(StaleForm)
        }
    }
}

/// A form whose CSRF token is not the session's.
#[derive(Debug)]
pub(super) struct StaleForm;

impl IntoResponse for StaleForm {
    fn into_response(self) -> Response {
        refused("This form is stale or came from elsewhere; reload the page.")
    }
}

/// Every value the request carries for a cookie called `name`.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(move |(n, _)| *n == name)
        .map(|(_, value)| value)
}

/// Whether another site's page made this request (not a person typing the
/// address, following a bookmark, or the dashboard's own pages).
fn from_another_site(headers: &HeaderMap) -> bool {
    match headers.get("sec-fetch-site") {
        None => false,
        Some(v) => !matches!(v.to_str(), Ok("same-origin" | "none")),
    }
}

/// Whether a state-changing request came from the dashboard's own pages.
/// Browsers say where a request came from in `Sec-Fetch-Site` and `Origin`;
/// a client that sends neither is not a browser a page could steer.
fn same_origin(headers: &HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site.is_some_and(|s| s != "same-origin") {
        return false;
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
            host.is_some_and(|h| origin == format!("http://{h}"))
        }
    }
}

fn refused(why: &str) -> Response {
    (StatusCode::FORBIDDEN, why.to_owned()).into_response()
}

/// What the login and the operator's check need of the state they run in
/// (the dashboard's): a trait, so that this module needs nothing else of it.
pub(super) trait AuthState: Clone + Send + Sync + 'static {
    /// The operator's sessions.
    fn sessions(&self) -> &Sessions;
    /// Whether `token` is the node's admin token.
    fn is_operator_token(&self, token: &str) -> bool;
}

impl<S: AuthState> FromRequestParts<S> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let sessions = state.sessions();
        if from_another_site(&parts.headers) {
            warn!("dashboard request refused: another site's page made it");
            return Err(refused("Open the dashboard from its own address."));
        }
        let found = cookies(&parts.headers, &sessions.cookie_name)
            .find_map(|c| sessions.csrf_of(c).map(|csrf| (c.to_owned(), csrf)));
        let Some((cookie, csrf)) = found else {
            // A page asked for without a session goes to the login; anything
            // else is simply refused.
            return Err(if parts.method == Method::GET {
                Redirect::to("/login").into_response()
            } else {
                (StatusCode::UNAUTHORIZED, "log in first").into_response()
            });
        };
        if parts.method != Method::GET && !same_origin(&parts.headers) {
            warn!("dashboard action refused: it came from another site");
            return Err(refused(
                "Actions are taken only from the dashboard's own pages.",
            ));
        }
        Ok(Operator { csrf, cookie })
    }
}

/// The login form's fields.
#[derive(Deserialize)]
pub(super) struct Login {
    token: String,
}

/// The login page.
pub(super) async fn login_page() -> Response {
    page(None).into_response()
}

fn page(error: Option<&str>) -> maud::Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "p2pvm — log in" }
                link rel="stylesheet" href="/assets/style.css";
            }
            body.login {
                main {
                    h1 { "p2pvm node" }
                    p { "Log in with the node's admin token (" code { "<data_dir>/admin.token" } ")." }
                    @if let Some(e) = error { p.error role="alert" { (e) } }
                    form method="post" action="/login" {
                        label for="token" { "Admin token" }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

/// Checks the token; on success, starts a session and sends the operator
/// to the overview.
pub(super) async fn login<S: AuthState>(
    State(state): State<S>,
    headers: HeaderMap,
    Form(form): Form<Login>,
) -> Response {
    if !same_origin(&headers) {
        warn!("dashboard login refused: it came from another site");
        return refused("Log in from the dashboard's own page.");
    }
    let sessions = state.sessions();
    if sessions.failures.check().is_err() {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many wrong tokens; wait a moment",
        )
            .into_response();
    }
    if !state.is_operator_token(&form.token) {
        warn!("dashboard login refused: not the admin token");
        tokio::time::sleep(FAILED_LOGIN_DELAY).await;
        return (
            StatusCode::UNAUTHORIZED,
            page(Some("That is not this node's admin token.")),
        )
            .into_response();
    }
    let cookie = sessions.create();
    info!("dashboard login");
    let set = format!(
        "{}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        sessions.cookie_name,
        SESSION_TTL.as_secs()
    );
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&set) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// A form that carries only its CSRF token.
#[derive(Deserialize)]
pub(super) struct Plain {
    csrf: String,
}

/// Ends the session.
pub(super) async fn logout<S: AuthState>(
    State(state): State<S>,
    op: Operator,
    Form(form): Form<Plain>,
) -> Response {
    if let Err(r) = op.check_csrf(&form.csrf) {
        return r.into_response();
    }
    let sessions = state.sessions();
    sessions.end(&op.cookie);
    let mut r = Redirect::to("/login").into_response();
    let gone = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        sessions.cookie_name
    );
    if let Ok(v) = HeaderValue::from_str(&gone) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_the_dashboards_own_origin_may_post() {
        let host = ("host", "127.0.0.1:9100");
        assert!(same_origin(&headers(&[host])), "curl sends neither");
        assert!(same_origin(&headers(&[
            host,
            ("origin", "http://127.0.0.1:9100"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(!same_origin(&headers(&[
            host,
            ("origin", "http://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            host,
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(!same_origin(&headers(&[
            host,
            ("sec-fetch-site", "same-site")
        ])));
        assert!(!same_origin(&headers(&[(
            "origin",
            "http://127.0.0.1:9100"
        )])));
        assert!(!same_origin(&headers(&[host, ("origin", "null")])));
        assert!(!same_origin(&headers(&[host, ("sec-fetch-site", "none")])));
    }

    #[test]
    fn pages_refuse_only_what_another_sites_page_asked_for() {
        assert!(!from_another_site(&headers(&[])));
        assert!(!from_another_site(&headers(&[("sec-fetch-site", "none")])));
        assert!(!from_another_site(&headers(&[(
            "sec-fetch-site",
            "same-origin"
        )])));
        assert!(from_another_site(&headers(&[(
            "sec-fetch-site",
            "same-site"
        )])));
        assert!(from_another_site(&headers(&[(
            "sec-fetch-site",
            "cross-site"
        )])));
    }

    #[test]
    fn a_session_is_found_by_its_cookie_only_and_ends() {
        let s = Sessions::new(9100);
        let c = s.create();
        let csrf = s.csrf_of(&c).expect("live");
        assert_ne!(csrf, c);
        assert!(s.csrf_of(&random_hex()).is_none(), "a forged cookie");
        // A decoy of the same name (set by another page on the host) first:
        // the real one is still found.
        let h = headers(&[(
            "cookie",
            &format!("p2pvm_dashboard_9100=decoy; a=b; p2pvm_dashboard_9100={c}; x=y"),
        )]);
        let found: Vec<&str> = cookies(&h, &s.cookie_name).collect();
        assert_eq!(found, ["decoy", c.as_str()]);
        assert_eq!(found.iter().find_map(|v| s.csrf_of(v)), Some(csrf));
        s.end(&c);
        assert!(s.csrf_of(&c).is_none());
    }

    #[test]
    fn the_oldest_session_makes_room() {
        let s = Sessions::new(9100);
        let first = s.create();
        let rest: Vec<String> = (1..MAX_SESSIONS).map(|_| s.create()).collect();
        assert!(s.csrf_of(&first).is_some());
        let _newest = s.create();
        assert!(s.csrf_of(&first).is_none());
        assert!(rest.iter().all(|c| s.csrf_of(c).is_some()));
    }
}
