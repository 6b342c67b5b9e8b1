//! The back-end driver of the inter-VM channel: API sessions that arrive over
//! the shared-memory virtqueues are served by the very same [`ApiService`] as
//! the Unix socket's — there is no second implementation of any operation.
//!
//! ```text
//!  front-end ⇄ region (virtqueues) ⇄ device pump ─► ChannelStream ─► ApiService::serve
//! ```
//!
//! A misbehaving front-end only ever resets the channel (the pump logs why);
//! the node, its peers and the other API transports keep running.

use p2pvm_channel::{ChannelError, LinkState, Side, Source};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::ApiService;

/// Takes the channel from `source` (the supervisor's broker, or this VM's
/// channel device) and serves sessions until `shutdown`.
pub async fn serve(
    source: Source,
    svc: ApiService,
    shutdown: CancellationToken,
) -> Result<(), ChannelError> {
    let from = source.clone();
    let (region, events) =
        tokio::task::spawn_blocking(move || p2pvm_channel::connect(&from, Side::Device))
            .await
            .map_err(|e| ChannelError::Io(std::io::Error::other(e)))??;
    let (pump, mut acceptor) = p2pvm_channel::device(region, events);
    svc.metrics().set_channel(pump.stats());
    let pump_task = svc.spawn(pump.run(shutdown.clone()));
    svc.spawn(log_link(
        acceptor.state(),
        source.to_string(),
        shutdown.clone(),
    ));
    info!(channel = %source, "channel back-end started");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            s = acceptor.accept() => match s {
                Some(stream) => {
                    let session = svc.clone();
                    svc.spawn(async move { session.serve_channel(stream).await });
                }
                None => break,
            },
        }
    }
    // The pump marks the device absent on its way out, so the front-end
    // learns at once that the service side is gone.
    let _ = pump_task.await;
    Ok(())
}

async fn log_link(
    mut state: tokio::sync::watch::Receiver<LinkState>,
    source: String,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        match state.borrow_and_update().clone() {
            LinkState::Up { resets } => info!(resets, "channel attached to the front-end"),
            LinkState::Down { reason, resets } => {
                warn!(%reason, resets, channel = %source, "channel down")
            }
        }
    }
}
