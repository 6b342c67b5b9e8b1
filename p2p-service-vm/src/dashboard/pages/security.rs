//! The virus filter, DRM refusals, bans and the trusted groups.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::peers::unban_form;
use super::{Nav, PageError, View, ask, failed, layout, short, when};
use crate::dashboard::Dashboard;
use crate::dashboard::auth::Operator;

/// Virus verdicts, DRM refusals, bans, trusted groups and their CRLs.
pub(in crate::dashboard) async fn security(
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
