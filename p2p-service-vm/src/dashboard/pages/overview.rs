//! The overview: the node, its reachability, uptime, bandwidth and storage.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use indicatif::{HumanBytes, HumanDuration};
use maud::html;
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::{Nav, PageError, View, ask, failed, layout, rate};
use crate::dashboard::Dashboard;
use crate::dashboard::auth::Operator;

/// Node, reachability, uptime, bandwidth, storage.
pub(in crate::dashboard) async fn overview(
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
