//! Feeds the credit ledger what the node itself sees of peers' connections,
//! keeps banned peers out, and writes the ledger every second and at shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2pvm_security::{EventKind, Ledger, Standing};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::node::{Command, NodeEvent, NodeHandle};
use crate::report::chain;

/// How often observations are written to disk.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Runs until `shutdown`, then flushes a last time.
pub async fn run(ledger: Arc<Ledger>, node: NodeHandle, shutdown: CancellationToken) {
    let mut events = node.subscribe_events();
    let mut connected: HashMap<libp2p::PeerId, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                flush(&ledger).await;
                // Connections made before this task listened (a bootstrap dial at
                // start) are caught here.
                sweep_banned(&ledger, &node).await;
            }
            ev = events.recv() => match ev {
                Ok(NodeEvent::PeerConnected { peer_id, .. }) => {
                    if ledger.standing(&peer_id) == Standing::Banned {
                        // A banned peer (it sent malware) is not let back in.
                        let node = node.clone();
                        tokio::spawn(async move {
                            let _ = node.call(|r| Command::Disconnect(peer_id, r)).await;
                        });
                        continue;
                    }
                    connected.entry(peer_id).or_insert_with(Instant::now);
                }
                // Asking for more than the node's limits (a relay's
                // reservations or circuits, hole punches) is a failed request
                // on the asker's record: a flood of them costs it its
                // standing, as any other run of failures does.
                Ok(NodeEvent::OverLimits { peer_id }) => {
                    ledger.record(peer_id, EventKind::RequestFailed);
                }
                Ok(NodeEvent::PeerDisconnected { peer_id }) => {
                    if let Some(since) = connected.remove(&peer_id) {
                        let secs = since.elapsed().as_secs();
                        ledger.record(peer_id, EventKind::Seen { secs });
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                _ => {}
            },
        }
    }
    for (peer, since) in connected {
        ledger.record(
            peer,
            EventKind::Seen {
                secs: since.elapsed().as_secs(),
            },
        );
    }
    flush(&ledger).await;
}

async fn sweep_banned(ledger: &Ledger, node: &NodeHandle) {
    let Ok(peers) = node.call(Command::Peers).await else {
        return;
    };
    for p in peers {
        if ledger.standing(&p.peer_id) == Standing::Banned {
            let _ = node.call(|r| Command::Disconnect(p.peer_id, r)).await;
        }
    }
}

async fn flush(ledger: &Arc<Ledger>) {
    let l = ledger.clone();
    match tokio::task::spawn_blocking(move || l.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %chain(&e), "cannot write the credit ledger"),
        Err(e) => warn!(error = %chain(&e), "credit ledger flush panicked"),
    }
}
