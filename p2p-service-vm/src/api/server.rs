//! The Unix-socket transport of the API in host mode. It only accepts
//! connections and hands each to [`ApiService::serve_unix`] (an API session,
//! or a bulk attachment); nothing here knows the protocol.

use std::path::Path;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ApiService;
use crate::report::chain;

pub use p2pvm_proto::socket::{BindError, SOCKET_MODE};

/// Binds the API socket (see [`p2pvm_proto::socket::bind`]) for tokio.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let std = p2pvm_proto::socket::bind(path)?;
    UnixListener::from_std(std).map_err(|source| BindError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Accepts sessions until `shutdown`; each runs in its own task.
pub async fn serve(listener: UnixListener, svc: ApiService, shutdown: CancellationToken) {
    info!("API socket accepting sessions");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let session = svc.clone();
                    svc.spawn(async move { session.serve_unix(stream).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %chain(&e), "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}
