//! The content fast path's port on a home router that maps ports (UPnP
//! IGD), as libp2p-upnp maps libp2p's own: without it a node behind such a
//! router is dialled directly for libp2p but its fast path is not, and
//! every download from it falls back to a libp2p stream.
//!
//! The mapping keeps the port's number outside (peers learn the fast path's
//! port in a content header and dial it at the address they reach the node
//! at), is renewed at half its lease, and is removed when the node stops. A
//! router that refuses it (the port taken outside, no IGD at all) costs
//! nothing: the fast path then serves only peers that reach it anyway.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use igd_next::PortMappingProtocol;
use igd_next::aio::tokio::search_gateway;
use tracing::{debug, info, warn};

use super::ContentService;
use crate::report::chain;

/// How long the router keeps a mapping we do not renew.
const LEASE: Duration = Duration::from_secs(3600);
/// Longest a removal at shutdown may hold the node's stop.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);
const DESCRIPTION: &str = "p2pvm content fast path";

/// Maps `bound` (the fast path's listening address) on the gateway, if the
/// LAN has one, for as long as the node runs.
pub(super) fn spawn(svc: &ContentService, bound: SocketAddr) {
    let shutdown = svc.inner.ctx.shutdown.clone();
    svc.spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = keep_mapped(bound, shutdown.clone()) => {}
        }
    });
}

async fn keep_mapped(bound: SocketAddr, shutdown: tokio_util::sync::CancellationToken) {
    let gateway = match search_gateway(igd_next::SearchOptions::default()).await {
        Ok(g) => g,
        Err(e) => {
            debug!(error = %chain(&e), "no UPnP gateway: the fast path's port is not mapped");
            return;
        }
    };
    let Some(local) = local_addr_towards(bound, gateway.addr) else {
        return;
    };
    let port = bound.port();
    loop {
        let lease = LEASE.as_secs() as u32;
        match gateway
            .add_port(PortMappingProtocol::TCP, port, local, lease, DESCRIPTION)
            .await
        {
            Ok(()) => {
                info!(port, gateway = %gateway.addr, "router mapped the fast path's port (UPnP)")
            }
            Err(e) => {
                warn!(port, error = %chain(&e), "the router refused to map the fast path's port");
                return;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(LEASE / 2) => {}
        }
    }
    let removed = tokio::time::timeout(
        REMOVE_TIMEOUT,
        gateway.remove_port(PortMappingProtocol::TCP, port),
    )
    .await;
    debug!(port, ?removed, "fast path port mapping removed");
}

/// The address the router should forward to: the bound one, or where a
/// socket bound to "any" meets the gateway.
fn local_addr_towards(bound: SocketAddr, gateway: SocketAddr) -> Option<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return Some(bound);
    }
    let probe = std::net::UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), 0)).ok()?;
    probe.connect(gateway).ok()?;
    Some(SocketAddr::new(probe.local_addr().ok()?.ip(), bound.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_address_is_mapped_as_it_is_and_any_meets_the_gateway() {
        let bound: SocketAddr = "10.1.0.2:4100".parse().expect("addr");
        let gw: SocketAddr = "10.1.0.1:5000".parse().expect("addr");
        assert_eq!(local_addr_towards(bound, gw), Some(bound));
        let any: SocketAddr = "0.0.0.0:4100".parse().expect("addr");
        let local = local_addr_towards(any, "127.0.0.1:1900".parse().expect("addr"));
        assert_eq!(local, Some("127.0.0.1:4100".parse().expect("addr")));
    }
}
