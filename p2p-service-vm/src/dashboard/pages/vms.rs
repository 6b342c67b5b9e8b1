//! Both VMs as p2pvmm sees them (VM mode: `[metrics] vms_url`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::Response;
use indicatif::{HumanBytes, HumanDuration};
use maud::html;

use super::{Nav, PageError, View, failed, layout};
use crate::dashboard::Dashboard;
use crate::dashboard::auth::Operator;

/// Both VMs as p2pvmm sees them (VM mode: `[metrics] vms_url`).
pub(in crate::dashboard) async fn vms(
    State(d): State<Arc<Dashboard>>,
    op: Operator,
    Query(view): Query<View>,
) -> Response {
    let url = d.api.context().config.metrics.vms_url.clone();
    let vms = match &url {
        None => Err(PageError::NotVmMode),
        Some(u) => crate::dashboard::vms::fetch(u)
            .await
            .map_err(PageError::from),
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
