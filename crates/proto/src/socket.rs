//! Binding the API's Unix socket, shared by everything that serves the API
//! locally: `p2pd` in host mode and the front-end in the client.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

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

/// Binds the API socket (non-blocking, ready for an async runtime), removing a
/// stale socket file only if nothing answers on it.
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
                std::fs::remove_file(path).map_err(io)?;
            }
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io)?;
    Ok(listener)
}
