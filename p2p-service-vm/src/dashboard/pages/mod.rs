//! The dashboard's pages, each rendered from the API's own operations (run
//! with the operator's rights) and the node's live state. `?live=1` answers
//! with the page's `<main>` alone, which `live.js` swaps in every 2 s.

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use indicatif::HumanBytes;
use maud::{DOCTYPE, Markup, html};
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;
use serde::Deserialize;

pub(super) mod compute;
pub(super) mod content;
pub(super) mod overview;
pub(super) mod peers;
pub(super) mod security;
pub(super) mod vms;

use super::Dashboard;
use super::auth::Operator;
use crate::api::ApiError;

/// The pages, in the order the navigation lists them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Overview,
    Peers,
    Content,
    Security,
    Compute,
    Vms,
}

const NAV: [(Nav, &str, &str); 6] = [
    (Nav::Overview, "/", "Overview"),
    (Nav::Peers, "/peers", "Peers"),
    (Nav::Content, "/content", "Content"),
    (Nav::Security, "/security", "Security"),
    (Nav::Compute, "/compute", "Compute"),
    (Nav::Vms, "/vms", "VMs"),
];

/// A page's query: `live=1` for the `<main>` alone; `q` a content search.
#[derive(Debug, Default, Deserialize)]
pub(super) struct View {
    #[serde(default)]
    live: Option<u8>,
    #[serde(default)]
    q: Option<String>,
}

/// Wraps a page's `<main>` in the layout, or answers with it alone.
fn layout(d: &Dashboard, op: &Operator, nav: Nav, view: &View, main: Markup) -> Response {
    // The VMs page only where p2pvmm can be asked (VM mode).
    let vm_mode = d.api.context().config.metrics.vms_url.is_some();
    let (_, _, title) = NAV
        .iter()
        .find(|(n, _, _)| *n == nav)
        .copied()
        .unwrap_or(NAV[0]);
    let inner = html! {
        (main)
        p.updated { "Updated " (when(crate::clock::now_unix())) }
    };
    if view.live == Some(1) {
        return Html(inner.into_string()).into_response();
    }
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { "p2pvm — " (title) }
                    link rel="stylesheet" href="/assets/style.css";
                    script src="/assets/live.js" defer {}
                }
                body {
                    header {
                        strong { "p2pvm" }
                        nav {
                            @for (n, href, label) in NAV {
                                @if n == Nav::Vms && !vm_mode {
                                } @else if n == nav {
                                    a href=(href) aria-current="page" { (label) }
                                } @else {
                                    a href=(href) { (label) }
                                }
                            }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(op.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                    main data-page=(title.to_lowercase()) { (inner) }
                }
            }
        }
        .into_string(),
    )
    .into_response()
}

/// Why a part of a page is missing; the page says it where the part would
/// be.
#[derive(Debug, thiserror::Error)]
pub(super) enum PageError {
    /// The operation failed.
    #[error("{}", .0.message)]
    Api(#[from] ApiError),
    /// The node answered an operation with another's result.
    #[error("unexpected answer")]
    Unexpected,
    /// A blocking lookup did not finish.
    #[error("the lookup did not finish")]
    Task(#[from] tokio::task::JoinError),
    /// The store's index could not be read.
    #[error(transparent)]
    Store(#[from] p2pvm_content::StoreError),
    /// The VMs page outside VM mode.
    #[error("this node does not run in VM mode ([metrics] vms_url is not set)")]
    NotVmMode,
    /// p2pvmm did not give both VMs' states.
    #[error(transparent)]
    Vms(#[from] super::vms::VmsError),
}

/// Runs an operation as the operator.
async fn ask(d: &Dashboard, op: Op) -> Result<R, PageError> {
    Ok(d.api.as_operator(op).await?)
}

fn failed(what: &str, why: &PageError) -> Markup {
    html! { p.error { (what) ": " (crate::report::chain(why)) } }
}

/// `bytes` per second, for a person.
pub(super) fn rate(bytes_per_sec: f64) -> String {
    format!("{}/s", HumanBytes(bytes_per_sec.max(0.0) as u64))
}

fn when(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn short(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 16 {
        id.to_owned()
    } else {
        let head: String = chars[..8].iter().collect();
        let tail: String = chars[chars.len() - 6..].iter().collect();
        format!("{head}…{tail}")
    }
}

/// The stylesheet, compiled in.
pub(super) async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../assets/style.css"),
    )
        .into_response()
}

/// The live-update script, compiled in.
pub(super) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../assets/live.js"),
    )
        .into_response()
}
