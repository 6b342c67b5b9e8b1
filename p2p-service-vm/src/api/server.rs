//! The Unix-socket transport of the API (host mode, and the front-end's local
//! socket later). It only accepts connections and hands each to
//! [`ApiService::serve`]; nothing here knows the protocol.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ApiService;

/// Mode of the socket file: owner and group may connect. Access is still
/// gated per app by tokens; the mode keeps other users from even trying.
pub const SOCKET_MODE: u32 = 0o660;

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A live daemon already serves this socket.
    #[error("Another daemon is serving {0}; choose another api_socket or data_dir")]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path; we never delete it.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding or setting the mode failed.
    #[error("Cannot bind {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the API socket, removing a stale socket file only if no daemon answers on it.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_owned()));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_owned())),
            Err(_) => {
                warn!(path = %path.display(), "removing stale API socket");
                std::fs::remove_file(path).map_err(io)?;
            }
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io)?;
    Ok(listener)
}

/// Accepts sessions until `shutdown`; each runs in its own task.
pub async fn serve(listener: UnixListener, svc: ApiService, shutdown: CancellationToken) {
    info!("API socket accepting sessions");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let svc = svc.clone();
                    tokio::spawn(async move { svc.serve(stream).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}
