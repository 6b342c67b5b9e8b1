//! Stored items, downloads running and ended, and a search of the network.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use indicatif::HumanBytes;
use maud::{Markup, html};
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::{Nav, PageError, View, ask, failed, layout, short, when};
use crate::dashboard::Dashboard;
use crate::dashboard::auth::Operator;

async fn local_items(d: &Dashboard) -> Result<Vec<pb::ContentInfo>, PageError> {
    match ask(d, Op::ContentList(pb::ContentListRequest {})).await? {
        R::ContentList(l) => Ok(l.items),
        _ => Err(PageError::Unexpected),
    }
}

/// Items a table shows at most.
pub(super) const ITEM_ROWS: usize = 100;

pub(super) fn items_table(id: &str, items: &[pb::ContentInfo]) -> Markup {
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
pub(in crate::dashboard) async fn content(
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
