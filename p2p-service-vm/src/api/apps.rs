//! Per-app credentials issued by the node (after Arti's RPC capability sessions).
//!
//! The admin token lives in `<data_dir>/admin.token` (mode 0600): whoever can read
//! that file is the operator. App tokens are issued by an admin session, shown once,
//! and stored only as BLAKE3 hashes in `<data_dir>/apps.toml`, so reading that file
//! does not let anyone impersonate an app.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::RngCore;

/// The app name that admin sessions get.
pub const ADMIN_APP: &str = "admin";
/// Admin token file name in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
const APPS_FILE: &str = "apps.toml";
const TOKEN_PREFIX: &str = "p2pvm1.";

/// Why a credential operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    /// Reading or writing a credential file failed.
    #[error("Credential file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `apps.toml` is not valid.
    #[error("Credential file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The app name is not allowed.
    #[error("Invalid app name {0:?}: use 1-64 of a-z, 0-9, '-', '_', '.'; 'admin' is reserved")]
    BadName(String),
    /// No such app.
    #[error("No app named {0:?}")]
    Unknown(String),
}

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// App name.
    pub app: String,
    /// Holds the admin capability.
    pub admin: bool,
}

impl Principal {
    /// Refuses callers without the admin capability.
    pub(crate) fn require_admin(&self) -> Result<(), super::ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(super::ApiError::new(
                p2pvm_proto::pb::ErrorCode::PermissionDenied,
                "this operation needs the admin capability",
            ))
        }
    }
}

/// The credential store.
#[derive(Debug)]
pub struct AppRegistry {
    dir: PathBuf,
    admin_hash: blake3::Hash,
    /// app name → hex BLAKE3 hash of its token.
    apps: BTreeMap<String, String>,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct AppsFile {
    #[serde(default)]
    apps: BTreeMap<String, String>,
}

fn new_token() -> String {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    format!("{TOKEN_PREFIX}{}", hex::encode(secret))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), AppsError> {
    crate::fsutil::write_private_atomic(path, data).map_err(|source| AppsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Checks an app name.
pub fn validate_app_name(name: &str) -> Result<(), AppsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != ADMIN_APP
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AppsError::BadName(name.into()))
    }
}

impl AppRegistry {
    /// Opens the store in `dir`, creating the admin token on first start.
    pub fn open(dir: &Path) -> Result<Self, AppsError> {
        let admin_path = dir.join(ADMIN_TOKEN_FILE);
        let admin = match std::fs::read_to_string(&admin_path) {
            Ok(t) => t.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let t = new_token();
                write_private(&admin_path, format!("{t}\n").as_bytes())?;
                t
            }
            Err(source) => {
                return Err(AppsError::Io {
                    path: admin_path,
                    source,
                });
            }
        };
        let apps_path = dir.join(APPS_FILE);
        let apps = match std::fs::read_to_string(&apps_path) {
            Ok(text) => {
                toml::from_str::<AppsFile>(&text)
                    .map_err(|e| AppsError::Corrupt {
                        path: apps_path.clone(),
                        reason: e.to_string(),
                    })?
                    .apps
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(AppsError::Io {
                    path: apps_path,
                    source,
                });
            }
        };
        Ok(Self {
            dir: dir.to_owned(),
            admin_hash: blake3::hash(admin.as_bytes()),
            apps,
        })
    }

    /// Who holds `token`, if anyone.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let hash = blake3::hash(token.trim().as_bytes());
        // blake3::Hash compares in constant time.
        if hash == self.admin_hash {
            return Some(Principal {
                app: ADMIN_APP.into(),
                admin: true,
            });
        }
        let hex = hash.to_hex();
        self.apps
            .iter()
            .find(|(_, h)| h.as_str() == hex.as_str())
            .map(|(app, _)| Principal {
                app: app.clone(),
                admin: false,
            })
    }

    /// Issues (or rotates) the token of `app` and returns it; the old one stops
    /// working. Writes the file on the calling thread.
    pub fn issue(&mut self, app: &str) -> Result<String, AppsError> {
        let (token, next) = self.with_issued(app)?;
        next.save()?;
        self.apply(next);
        Ok(token)
    }

    /// Removes an app's token. Writes the file on the calling thread.
    pub fn revoke(&mut self, app: &str) -> Result<(), AppsError> {
        let next = self.with_revoked(app)?;
        next.save()?;
        self.apply(next);
        Ok(())
    }

    /// The credentials with a new token for `app`, and the token; nothing
    /// changes until the change is saved and applied. (So the file can be
    /// written off the async threads, with no lock held that a handshake
    /// would wait on.)
    pub fn with_issued(&self, app: &str) -> Result<(String, AppsChange), AppsError> {
        validate_app_name(app)?;
        let token = new_token();
        let mut apps = self.apps.clone();
        apps.insert(
            app.into(),
            blake3::hash(token.as_bytes()).to_hex().to_string(),
        );
        Ok((token, self.change(apps)))
    }

    /// The credentials without `app`'s token.
    pub fn with_revoked(&self, app: &str) -> Result<AppsChange, AppsError> {
        let mut apps = self.apps.clone();
        if apps.remove(app).is_none() {
            return Err(AppsError::Unknown(app.into()));
        }
        Ok(self.change(apps))
    }

    fn change(&self, apps: BTreeMap<String, String>) -> AppsChange {
        AppsChange {
            path: self.dir.join(APPS_FILE),
            apps,
        }
    }

    /// Makes a saved change current.
    pub fn apply(&mut self, change: AppsChange) {
        self.apps = change.apps;
    }

    /// Names of apps holding tokens.
    pub fn list(&self) -> Vec<String> {
        self.apps.keys().cloned().collect()
    }
}

/// A change to the app credentials, to be saved (blocking I/O) and then
/// applied.
#[derive(Debug, Clone)]
pub struct AppsChange {
    path: PathBuf,
    apps: BTreeMap<String, String>,
}

impl AppsChange {
    /// Writes `apps.toml` atomically (mode 0600).
    pub fn save(&self) -> Result<(), AppsError> {
        let text = toml::to_string(&AppsFile {
            apps: self.apps.clone(),
        })
        .expect("a map of strings always serialises");
        write_private(&self.path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_authenticate_rotate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = AppRegistry::open(dir.path()).unwrap();
        let admin = std::fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        assert!(reg.authenticate(&admin).unwrap().admin);

        let t1 = reg.issue("chat").unwrap();
        assert_eq!(reg.authenticate(&t1).unwrap().app, "chat");
        // The registry reloads from disk with the same answers.
        let reg2 = AppRegistry::open(dir.path()).unwrap();
        assert_eq!(reg2.authenticate(&t1).unwrap().app, "chat");
        assert!(
            !std::fs::read_to_string(dir.path().join(APPS_FILE))
                .unwrap()
                .contains(&t1)
        );

        let t2 = reg.issue("chat").unwrap();
        assert!(reg.authenticate(&t1).is_none());
        assert!(reg.authenticate(&t2).is_some());
        reg.revoke("chat").unwrap();
        assert!(reg.authenticate(&t2).is_none());
        assert!(matches!(reg.revoke("chat"), Err(AppsError::Unknown(_))));
        assert!(reg.authenticate("p2pvm1.guess").is_none());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "admin", "Chat", "a/b", &"x".repeat(65)] {
            assert!(validate_app_name(bad).is_err(), "{bad:?}");
        }
        validate_app_name("video-2.beta_1").unwrap();
    }
}
