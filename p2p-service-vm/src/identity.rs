//! The node's persistent Ed25519 identity, kept in `<data_dir>/identity.key`
//! (protobuf-encoded libp2p keypair, file mode 0600) so the peer id survives
//! restarts.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use libp2p::identity::Keypair;

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("Identity file {path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but holds no valid key.
    #[error("Identity file {path} is corrupt")]
    Corrupt {
        /// The file.
        path: String,
    },
    /// The file is readable by others; refusing to use a leaked key silently.
    #[error("Identity file {path} has mode {mode:o}; it must not be accessible to group or others")]
    Permissions {
        /// The file.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
}

/// The file name inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Loads the keypair from `dir`, creating a new one on first start.
pub fn load_or_create(dir: &Path) -> Result<Keypair, IdentityError> {
    let path = dir.join(IDENTITY_FILE);
    let display = path.display().to_string();
    let io = |source| IdentityError::Io {
        path: display.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Permissions {
                    path: display,
                    mode,
                });
            }
            Keypair::from_protobuf_encoding(&bytes).map_err(|_| IdentityError::Corrupt {
                path: display.clone(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .expect("ed25519 keys always encode");
            // Atomic, so a crash never leaves a half-written key that would
            // change the peer id on the next start.
            crate::fsutil::write_private_atomic(&path, &bytes).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_and_leaky_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        std::fs::write(&path, b"not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Permissions { .. })
        ));
    }
}
