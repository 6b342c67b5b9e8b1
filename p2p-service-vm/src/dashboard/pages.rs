//! The dashboard's pages, each rendered from the API's own operations (run
//! with the operator's rights) and the node's live state. `?live=1` answers
//! with the page's `<main>` alone, which `live.js` swaps in every 2 s.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use indicatif::{HumanBytes, HumanDuration};
use libp2p::PeerId;
use maud::{DOCTYPE, Markup, html};
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;
use serde::Deserialize;
use tracing::info;

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

/// Node, reachability, uptime, bandwidth, storage.
pub(super) async fn overview(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Query(view): Query<View>,
) -> Response {
    let info = match ask(&d, Op::NodeInfo(pb::NodeInfoRequest {})).await {
        Ok(R::NodeInfo(i)) => Ok(i),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    // The store's index, not ContentList: that re-verifies every manifest.
    let store = d.api.context().store.clone();
    let stored = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(PageError::from)
        .and_then(|r| r.map_err(PageError::from));
    let now = d.history.rates().last().copied().unwrap_or_default();
    let quota = d.api.context().config.content.quota_bytes;
    let main = html! {
        h1 { "Overview" }
        @match &info {
            Err(e) => (failed("Node info", e)),
            Ok(i) => {
                dl.facts {
                    dt { "Peer id" } dd #peer-id { code { (i.peer_id) } }
                    dt { "Version" } dd { (i.version) " (protocol " (i.protocol_version) ")" }
                    dt { "Uptime" } dd { (HumanDuration(d.started.elapsed())) }
                    dt { "Reachability" } dd #reachability { (i.reachability) }
                    dt { "Connected peers" } dd #connected { (i.connected_peers) }
                    dt { "Listening on" } dd { @for a in &i.listen_addrs { code { (a) } " " } }
                    dt { "Reachable at" } dd {
                        @for a in i.external_addrs.iter().chain(&i.relayed_addrs) { code { (a) } " " }
                        @if i.external_addrs.is_empty() && i.relayed_addrs.is_empty() { "no confirmed address" }
                    }
                    dt { "Content fast path" } dd {
                        @if i.content_fast_path_port == 0 { "off" } @else { "TCP port " (i.content_fast_path_port) }
                    }
                    dt { "Block memory" } dd {
                        (HumanBytes(i.content_memory_used_bytes)) " in use of " (HumanBytes(i.content_memory_budget_bytes))
                        " (peak " (HumanBytes(i.content_memory_peak_bytes)) ")"
                    }
                }
            }
        }
        h2 { "Bandwidth" }
        p #bandwidth-now { "Now: " (rate(now.received)) " in, " (rate(now.served)) " out (verified content)" }
        (d.history.chart())
        h2 { "Storage" }
        @match &stored {
            Err(e) => (failed("Stored items", e)),
            Ok(items) => {
                @let used: u64 = items.iter().map(|i| i.size).sum();
                p #storage {
                    (HumanBytes(used)) " in " (items.len()) " items; quota "
                    @if quota == 0 { "none" } @else { (HumanBytes(quota)) }
                }
                @if quota > 0 { meter min="0" max=(quota) value=(used.min(quota)) {} }
            }
        }
    };
    layout(&d, &op, Nav::Overview, &view, main)
}

async fn local_items(d: &Dashboard) -> Result<Vec<pb::ContentInfo>, PageError> {
    match ask(d, Op::ContentList(pb::ContentListRequest {})).await? {
        R::ContentList(l) => Ok(l.items),
        _ => Err(PageError::Unexpected),
    }
}

/// Items a table shows at most.
const ITEM_ROWS: usize = 100;

/// Rows the peers table shows at most (connected and banned peers always).
const PEER_ROWS: usize = 300;

/// One row of the peers table: a connected peer, a peer the ledger knows,
/// or both.
struct PeerRow {
    id: String,
    conn: Option<pb::PeerInfo>,
    credit: Option<p2pvm_security::PeerCredit>,
}

impl PeerRow {
    fn banned(&self) -> bool {
        self.credit
            .as_ref()
            .is_some_and(|c| c.standing == p2pvm_security::Standing::Banned)
    }
}

/// Connected peers first, then banned ones, then the rest by score, cut at
/// [`PEER_ROWS`] (never cutting a connected or banned one).
fn peer_rows(
    connected: &[pb::PeerInfo],
    credit: Vec<p2pvm_security::PeerCredit>,
) -> (Vec<PeerRow>, usize) {
    let mut rows: Vec<PeerRow> = connected
        .iter()
        .map(|p| PeerRow {
            id: p.peer_id.clone(),
            conn: Some(p.clone()),
            credit: None,
        })
        .collect();
    let index: std::collections::HashMap<String, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), i))
        .collect();
    for c in credit {
        let id = c.peer.to_string();
        match index.get(&id) {
            Some(&i) => rows[i].credit = Some(c),
            None => rows.push(PeerRow {
                id,
                conn: None,
                credit: Some(c),
            }),
        }
    }
    let known = rows.len();
    // Stable: the ledger's order (best score first) stays within each group.
    rows.sort_by_key(|r| (r.conn.is_none(), !r.banned()));
    let keep = rows
        .iter()
        .take_while(|r| r.conn.is_some() || r.banned())
        .count()
        .max(PEER_ROWS);
    rows.truncate(keep);
    (rows, known)
}

/// Connected and known peers with their credit; ban and unban.
pub(super) async fn peers(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Query(view): Query<View>,
) -> Response {
    let connected = match ask(&d, Op::Peers(pb::PeersRequest {})).await {
        Ok(R::Peers(l)) => Ok(l.peers),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    // The ledger's walk takes its lock and every peer: off the runtime.
    let ledger = d.api.context().ledger.clone();
    let credit = tokio::task::spawn_blocking(move || ledger.list())
        .await
        .unwrap_or_default();
    let (rows, known) = peer_rows(connected.as_deref().unwrap_or_default(), credit);
    let main = html! {
        h1 { "Peers" }
        @if let Err(e) = &connected { (failed("Connections", e)) }
        p { (rows.iter().filter(|r| r.conn.is_some()).count()) " connected; "
            (known) " known"
            @if rows.len() < known { " (the first " (rows.len()) " shown)" } "." }
        div.scroll {
            table #peers {
                thead { tr {
                    th { "Peer" } th { "Connection" } th { "Latency" } th { "Score" } th { "Standing" }
                    th { "Forecast" } th { "In" } th { "Out" } th { "Action" }
                } }
                tbody {
                    @for r in &rows { (peer_row(&op, r)) }
                }
            }
        }
    };
    layout(&d, &op, Nav::Peers, &view, main)
}

fn standing_name(s: p2pvm_security::Standing) -> &'static str {
    use p2pvm_security::Standing;
    match s {
        Standing::Good => "good",
        Standing::Throttled => "throttled",
        Standing::Refused => "refused",
        Standing::Banned => "banned",
    }
}

fn unban_form(op: &Operator, peer: &str) -> Markup {
    html! {
        form method="post" action="/peers/unban" {
            input type="hidden" name="csrf" value=(op.csrf);
            input type="hidden" name="peer" value=(peer);
            button.unban type="submit" { "Unban" }
        }
    }
}

fn peer_row(op: &Operator, r: &PeerRow) -> Markup {
    let standing = r
        .credit
        .as_ref()
        .map(|c| standing_name(c.standing))
        .unwrap_or("good");
    html! {
        tr id=(format!("peer-{}", r.id)) data-standing=(standing) data-connected=(r.conn.is_some()) {
            td { code title=(r.id) { (short(&r.id)) }
                 @if let Some(a) = r.conn.as_ref().map(|c| c.agent_version.as_str()).filter(|a| !a.is_empty()) { br; small { (a) } } }
            td {
                @match &r.conn {
                    None => "—",
                    Some(c) => {
                        @for k in &c.connections {
                            span.conn { (k.kind) " " (k.transport) " " (if k.outbound { "out" } else { "in" }) } " "
                        }
                    }
                }
            }
            td { @match r.conn.as_ref().map(|c| c.rtt_micros).filter(|t| *t > 0) {
                Some(t) => { (format!("{:.1} ms", t as f64 / 1000.0)) },
                None => "—",
            } }
            @match &r.credit {
                None => { td { "—" } td.standing { (standing) } td { "—" } td { "—" } td { "—" } }
                Some(c) => {
                    td { (c.score) }
                    td.standing {
                        (standing)
                        @if let Some(b) = &c.ban { br; small { (b.reason) } }
                    }
                    td { (rate(c.expected_bps)) ", " (format!("{:.0} %", c.reliability * 100.0)) " reliable" }
                    td { (HumanBytes(c.bytes_received)) }
                    td { (HumanBytes(c.bytes_served)) }
                }
            }
            td {
                @if r.banned() {
                    (unban_form(op, &r.id))
                } @else {
                    form.ban method="post" action="/peers/ban" {
                        input type="hidden" name="csrf" value=(op.csrf);
                        input type="hidden" name="peer" value=(r.id);
                        select name="hours" aria-label="for how long" {
                            option value="1" { "1 hour" }
                            option value="24" selected { "1 day" }
                            option value="0" { "for good" }
                        }
                        button.ban type="submit" { "Ban" }
                    }
                }
            }
        }
    }
}

/// Why an action on a peer was refused before it was taken.
enum Refused {
    Csrf(super::auth::StaleForm),
    NotAPeer,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Csrf(stale) => stale.into_response(),
            Refused::NotAPeer => (StatusCode::BAD_REQUEST, "not a peer id").into_response(),
        }
    }
}

/// The checks every action on a peer passes first: the session's CSRF
/// token, then a peer id.
fn peer_action(op: &Operator, csrf: &str, peer: &str) -> Result<PeerId, Refused> {
    op.check_csrf(csrf).map_err(Refused::Csrf)?;
    peer.parse().map_err(|_| Refused::NotAPeer)
}

/// The ban form's fields.
#[derive(Deserialize)]
pub(super) struct BanForm {
    csrf: String,
    peer: String,
    /// 0: for good (asked for, never assumed).
    hours: u64,
}

/// Bans a peer: written to the ledger at once, its connections closed.
pub(super) async fn ban(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Form(form): Form<BanForm>,
) -> Response {
    let peer = match peer_action(&op, &form.csrf, &form.peer) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    let until = match form.hours {
        0 => u64::MAX / 2,
        h => crate::clock::now_unix().saturating_add(h.min(24 * 365).saturating_mul(3600)),
    };
    match d
        .api
        .ban_peer(peer, until, "banned by the operator (dashboard)")
        .await
    {
        Ok(()) => {
            info!(%peer, hours = form.hours, "banned from the dashboard");
            Redirect::to("/peers").into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.message).into_response(),
    }
}

/// The unban form's fields.
#[derive(Deserialize)]
pub(super) struct UnbanForm {
    csrf: String,
    peer: String,
}

/// Lifts a peer's ban.
pub(super) async fn unban(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Form(form): Form<UnbanForm>,
) -> Response {
    let peer = match peer_action(&op, &form.csrf, &form.peer) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    match d.api.unban_peer(peer).await {
        Ok(_) => {
            info!(%peer, "unbanned from the dashboard");
            Redirect::to("/peers").into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.message).into_response(),
    }
}

fn items_table(id: &str, items: &[pb::ContentInfo]) -> Markup {
    html! {
        div.scroll { table id=(id) {
            thead { tr {
                th { "Name" } th { "Id" } th { "Size" } th { "Rights" } th { "Certification" } th { "Held" }
            } }
            tbody { @for i in items {
                tr data-id=(i.content_id) {
                    td { (i.name) }
                    td { code title=(i.content_id) { (short(&i.content_id)) } }
                    td { (HumanBytes(i.size)) }
                    td { @match &i.rights {
                        None => "—",
                        Some(r) => {
                            (if r.licence.is_empty() { "no licence" } else { r.licence.as_str() })
                            @if !r.redistribution_allowed { ", no redistribution" }
                            @if r.expires_unix > 0 { ", until " (when(r.expires_unix)) }
                            @if !r.allowed_groups.is_empty() { ", groups: " (r.allowed_groups.join(", ")) }
                        }
                    } }
                    td { (i.certification)
                        @if !i.certified_by.is_empty() { br; small { "by " (i.certified_by) } } }
                    td { @if i.local { (if i.pinned { "kept, pinned" } else { "kept" }) } @else { "—" } }
                }
            } }
        } }
    }
}

/// Kept items, transfers with their progress, and a search.
pub(super) async fn content(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Query(view): Query<View>,
) -> Response {
    let items = local_items(&d).await;
    let transfers = d.api.content().transfers();
    let query = view.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let found = match query {
        None => None,
        Some(q) => Some(
            match ask(
                &d,
                Op::ContentSearch(pb::ContentSearchRequest {
                    query: q.to_owned(),
                    limit: 50,
                }),
            )
            .await
            {
                Ok(R::ContentList(l)) => Ok(l.items),
                Ok(_) => Err(PageError::Unexpected),
                Err(e) => Err(e),
            },
        ),
    };
    let main = html! {
        h1 { "Content" }
        h2 { "Transfers" }
        @if transfers.is_empty() { p { "No download yet." } }
        ul #transfers { @for t in &transfers {
            @let pct = (u128::from(t.held_bytes) * 100).checked_div(u128::from(t.size)).unwrap_or(100);
            li data-id=(t.id.to_string()) data-state=(t.state) data-percent=(pct) {
                (t.name) " — " (HumanBytes(t.held_bytes)) " of " (HumanBytes(t.size))
                " (" span.percent { (pct) " %" } ", " (t.state) ")"
                br; progress max=(t.size.max(1)) value=(t.held_bytes) {}
            }
        } }
        h2 { "Search" }
        form.search method="get" action="/content" {
            input type="search" name="q" value=(query.unwrap_or_default()) placeholder="keywords" aria-label="keywords";
            button type="submit" { "Search" }
        }
        @match &found {
            None => {},
            Some(Err(e)) => (failed("Search", e)),
            Some(Ok(items)) => {
                p { (items.len()) " found." }
                (items_table("found", items))
            }
        }
        h2 { "Kept here" }
        @match &items {
            Err(e) => (failed("Stored items", e)),
            Ok(items) => {
                (items_table("items", &items[..items.len().min(ITEM_ROWS)]))
                @if items.len() > ITEM_ROWS { p { "…and " (items.len() - ITEM_ROWS) " more (p2pctl content list)." } }
            }
        }
    };
    layout(&d, &op, Nav::Content, &view, main)
}

/// Virus verdicts, DRM refusals, bans, trusted groups and their CRLs.
pub(super) async fn security(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Query(view): Query<View>,
) -> Response {
    let ctx = d.api.context();
    let scans = ctx.virus.stats();
    let detections = ctx.virus.detections();
    let drm = ctx.metrics.recent_drm_refusals();
    let groups = match ask(&d, Op::GroupList(pb::GroupListRequest {})).await {
        Ok(R::Groups(l)) => Ok(l.groups),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    let mut banned = ctx.ledger.banned();
    banned.sort_by(|a, b| b.1.until_unix.cmp(&a.1.until_unix).then(a.0.cmp(&b.0)));
    let main = html! {
        h1 { "Security" }
        h2 { "Virus filter" }
        p #scans {
            @if ctx.virus.enabled() { "clamd at " code { (ctx.virus.describe()) } ": " } @else { "Scanning is OFF. " }
            (scans.clean) " clean, " (scans.infected) " infected, " (scans.failed) " failed scans."
        }
        div.scroll { table #detections {
            thead { tr { th { "When" } th { "Signature" } } }
            tbody { @for v in &detections { tr { td { (when(v.at_unix)) } td.signature { (v.signature) } } } }
        } }
        @if detections.is_empty() { p { "No malware found yet." } }
        h2 { "DRM refusals" }
        div.scroll { table #drm {
            thead { tr { th { "When" } th { "Stage" } th { "Reason" } th { "Detail" } } }
            tbody { @for r in &drm { tr { td { (when(r.at_unix)) } td { (r.stage) } td { (r.reason) } td { (r.detail) } } } }
        } }
        @if drm.is_empty() { p { "None refused yet." } }
        h2 { "Banned peers" }
        ul #banned { @for (peer, ban) in &banned {
            @let id = peer.to_string();
            li data-peer=(id) { code title=(id) { (short(&id)) } ": " (ban.reason)
                @if ban.until_unix < u64::MAX / 4 { " (until " (when(ban.until_unix)) ")" }
                " " (unban_form(&op, &id)) } } }
        @if banned.is_empty() { p { "Nobody is banned." } }
        h2 { "Trusted groups" }
        @match &groups {
            Err(e) => (failed("Groups", e)),
            Ok(g) if g.is_empty() => p { "This node is in no group." },
            Ok(g) => div.scroll { table #groups {
                thead { tr { th { "Group" } th { "Role" } th { "Membership" } th { "CRL" } th { "Topic key" } } }
                tbody { @for g in g { tr {
                    td { (g.name) br; small { code { (short(&g.id)) } } }
                    td { (if g.owner { "owner (holds the CA key)" } else { "member" }) }
                    td { @if g.member { "until " (when(g.member_until_unix)) } @else { "not a member now" } }
                    td { @if g.crl_number == 0 { "none held" } @else { "number " (g.crl_number) }
                         @if g.relays_crl { ", relayed" } }
                    td { (if g.topic_key_held { "held" } else { "—" }) }
                } } }
            } },
        }
    };
    layout(&d, &op, Nav::Security, &view, main)
}

/// This node's offer, its jobs, receipts and balance.
pub(super) async fn compute(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Query(view): Query<View>,
) -> Response {
    let offer = d.api.compute().offer();
    let balance = match ask(&d, Op::ComputeBalance(pb::ComputeBalanceRequest {})).await {
        Ok(R::ComputeBalance(b)) => Ok(b),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    let jobs = match ask(
        &d,
        Op::ComputeStatus(pb::ComputeStatusRequest {
            job_id: String::new(),
        }),
    )
    .await
    {
        Ok(R::ComputeJobs(l)) => Ok(l.jobs),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    let receipts = match ask(
        &d,
        Op::ComputeReceipts(pb::ComputeReceiptsRequest { limit: 50 }),
    )
    .await
    {
        Ok(R::ComputeReceipts(l)) => Ok(l.receipts),
        Ok(_) => Err(PageError::Unexpected),
        Err(e) => Err(e),
    };
    let main = html! {
        h1 { "Compute" }
        h2 { "Balance" }
        @match &balance {
            Err(e) => (failed("Balance", e)),
            Ok(b) => p #balance {
                (b.balance) " credits (" (b.earned) " earned, " (b.spent) " spent over " (b.receipts)
                " receipts); " (b.available) " available for new jobs, " (b.reserved) " reserved."
            },
        }
        h2 { "Offer" }
        @match &offer {
            None => p #offer { "This node offers no compute." },
            Some(o) => p #offer {
                "Up to " (o.max_jobs) " jobs at once, each up to " (HumanBytes(o.max_memory_bytes)) " of memory, "
                (HumanDuration(Duration::from_millis(o.max_wall_ms))) " and " (o.max_fuel) " fuel; "
                (o.price_per_mfuel) " credits per million fuel."
            },
        }
        h2 { "Jobs" }
        @match &jobs {
            Err(e) => (failed("Jobs", e)),
            Ok(j) if j.is_empty() => p { "No job submitted." },
            Ok(j) => div.scroll { table #jobs {
                thead { tr { th { "Job" } th { "State" } th { "Budget" } th { "Spent" } th { "Runs" } th { "Submitted" } } }
                tbody { @for j in j.iter().take(ITEM_ROWS) { tr {
                    td { code { (short(&j.job_id)) } } td { (j.state) @if !j.error.is_empty() { br; small { (j.error) } } }
                    td { (j.budget) } td { (j.credits_spent) } td { (j.runs.len()) } td { (when(j.submitted_unix)) }
                } } }
            } },
        }
        h2 { "Receipts" }
        @match &receipts {
            Err(e) => (failed("Receipts", e)),
            Ok(r) if r.is_empty() => p { "No receipt yet." },
            Ok(r) => div.scroll { table #receipts {
                thead { tr { th { "Completed" } th { "Requester" } th { "Provider" } th { "Work" } th { "Credits" } } }
                tbody { @for r in r { tr {
                    td { (when(r.completed_unix)) } td { code { (short(&r.requester)) } } td { code { (short(&r.provider)) } }
                    td { (r.work_units) } td { (r.credits) }
                } } }
            } },
        }
    };
    layout(&d, &op, Nav::Compute, &view, main)
}

/// Both VMs as p2pvmm sees them (VM mode: `[metrics] vms_url`).
pub(super) async fn vms(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Query(view): Query<View>,
) -> Response {
    let url = d.api.context().config.metrics.vms_url.clone();
    let vms = match &url {
        None => Err(PageError::NotVmMode),
        Some(u) => super::vms::fetch(u).await.map_err(PageError::from),
    };
    let main = html! {
        h1 { "VMs" }
        @match &vms {
            Err(e) => (failed("p2pvmm", e)),
            Ok(vms) => div.scroll { table #vms {
                thead { tr {
                    th { "VM" } th { "State" } th { "Restarts" } th { "Boots" } th { "Up" } th { "Memory" }
                    th { "VMM overhead" } th { "vCPU exits" } th { "Devices: notifications / interrupts, bytes in / out" } th { "Console" }
                } }
                tbody { @for v in vms {
                    tr id=(format!("vm-{}", v.name)) data-state=(v.state) data-restarts=(v.restarts) {
                        td { (v.name) } td { (v.state) } td { (v.restarts) }
                        @match &v.figures {
                            None => { td { "—" } td { "—" } td { (v.memory_mib) " MiB" } td { "—" } td { "—" } td { "—" } }
                            Some(f) => {
                                td { (f.boots) }
                                td { (HumanDuration(Duration::from_secs(f.uptime_secs))) }
                                td { (v.memory_mib) " MiB" }
                                td { (HumanBytes(f.vmm_overhead_bytes)) }
                                td { @for (reason, n) in &f.exits { (reason) " " (n) br; } }
                                td { @for dev in &f.devices {
                                    (dev.device) ": " (dev.notifications) " / " (dev.interrupts) ", "
                                    (HumanBytes(dev.bytes_to_guest)) " / " (HumanBytes(dev.bytes_from_guest)) br;
                                } }
                            }
                        }
                        td { code { (v.console) } }
                    }
                } }
            } },
        }
        p { "From the host: " code { "p2pvmm console service" } " (the operator's console, " code { "p2pctl" }
            " with the admin capability) or " code { "p2pvmm console client" } "; see docs/vmm.md." }
    };
    layout(&d, &op, Nav::Vms, &view, main)
}

/// The stylesheet, compiled in.
pub(super) async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("assets/style.css"),
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
        include_str!("assets/live.js"),
    )
        .into_response()
}
