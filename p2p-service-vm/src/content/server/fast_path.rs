//! The fast path's accepting side: TCP connections, bounded in number and
//! per address, whose TLS handshake proves a peer (or a group member), then
//! the content protocol served on the sealed stream as on a libp2p stream.
//! The TLS policy and the dialling side are `content/fastpath.rs`'s.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use p2pvm_security::Standing;
use p2pvm_security::peer_tls;
use p2pvm_security::sealed::{self, Side};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::content::ContentService;
use crate::content::fastpath::HANDSHAKE_TIMEOUT;
use crate::report::chain;

/// Fast-path connections served at once, and from one IP address (peer ids
/// cost nothing, addresses something).
const MAX_CONNECTIONS: usize = 256;
const MAX_PER_IP: usize = 16;

/// Counts a connection against its address while it lives.
struct IpSlot {
    ip: IpAddr,
    counts: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
}

impl IpSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
        ip: IpAddr,
    ) -> Option<Self> {
        let mut c = counts.lock().expect("lock");
        let n = c.entry(ip).or_insert(0);
        if *n >= MAX_PER_IP {
            return None;
        }
        *n += 1;
        Some(Self {
            ip,
            counts: counts.clone(),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("lock");
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// Accepts fast-path connections on `listener` and serves the content
/// protocol on each, as for a libp2p stream from the same peer.
pub(crate) fn spawn(svc: ContentService, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_ip = Arc::default();
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "content fast path listening");
    }
    let tasks = svc.clone();
    tasks.spawn(async move {
        let shutdown = svc.inner.ctx.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, from) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %chain(&e), "fast-path accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%from, "fast-path connection refused: too many");
                continue;
            };
            let Some(ip_slot) = IpSlot::take(&per_ip, from.ip()) else {
                debug!(%from, "fast-path connection refused: too many from that address");
                continue;
            };
            let conn = svc.clone();
            svc.spawn(async move {
                let svc = conn;
                let _slots = (slot, ip_slot);
                let _ = tcp.set_nodelay(true);
                let Some(fast) = svc.inner.fast_path.as_ref() else {
                    return;
                };
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, fast.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        debug!(%from, error = %chain(&e), "fast-path handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let (tls, group) = tls;
                let certs = tls.get_ref().1.peer_certificates();
                let peer = match group {
                    None => peer_tls::session_peer(certs),
                    // A group session: the member certificate verified in
                    // the handshake is kept, and checked again (the CRL, its
                    // validity) at every request of the session.
                    Some(g) => {
                        p2pvm_security::group_tls::session_peer(certs).and_then(|(p, cert)| {
                            svc.drm_session_member(&p, g, &cert).ok().map(|()| p)
                        })
                    }
                };
                let Some(peer) = peer else { return };
                if svc.standing(&peer) >= Standing::Refused {
                    debug!(%peer, "fast-path connection refused: credit policy");
                    return;
                }
                let (tcp, session) = tls.into_inner();
                let sealed = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    sealed::establish(tcp, &session, Side::Server),
                );
                let (rd, wr) = match sealed.await {
                    Ok(Ok(halves)) => halves,
                    Ok(Err(e)) => {
                        debug!(%from, error = %chain(&e), "fast-path connection failed");
                        return;
                    }
                    Err(_) => return,
                };
                super::serve_stream(svc, peer, group, rd, wr).await;
            });
        }
    });
}
