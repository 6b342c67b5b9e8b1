//! Connected and known peers with their credit; ban and unban.

use std::sync::Arc;

use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use indicatif::HumanBytes;
use libp2p::PeerId;
use maud::{Markup, html};
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;
use serde::Deserialize;
use tracing::info;

use super::{Nav, PageError, View, ask, failed, layout, rate, short};
use crate::dashboard::Dashboard;
use crate::dashboard::auth::Operator;

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
pub(in crate::dashboard) async fn peers(
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

pub(super) fn unban_form(op: &Operator, peer: &str) -> Markup {
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
    Csrf(crate::dashboard::auth::StaleForm),
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
pub(in crate::dashboard) struct BanForm {
    csrf: String,
    peer: String,
    /// 0: for good (asked for, never assumed).
    hours: u64,
}

/// Bans a peer: written to the ledger at once, its connections closed.
pub(in crate::dashboard) async fn ban(
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
pub(in crate::dashboard) struct UnbanForm {
    csrf: String,
    peer: String,
}

/// Lifts a peer's ban.
pub(in crate::dashboard) async fn unban(
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
