//! The virus filter's verdict cache: content ids scanned clean, each with the
//! fingerprint of the signature database that scanned it. A clean item is not
//! scanned again (fetched again, streamed again) while the database is the
//! same; any change to the database — a new signature file, an update —
//! changes the fingerprint and so invalidates every entry at once.
//!
//! The fingerprint is clamd's `VERSION` answer (engine and, with official
//! databases, their version) together with the name, size and modification
//! time of every file in the database directory, which custom signature
//! files (`.ndb`, `.hdb`, ...) change without changing `VERSION`. Without a
//! readable database directory there is no fingerprint and no caching: a
//! signature update could not be seen.
//!
//! Only clean verdicts are kept (an infected item is never stored, and its
//! peers are banned). Persisted in redb, so restarts keep it.

use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition};

/// content id → fingerprint of the database that found it clean.
const CLEAN: TableDefinition<&[u8; 32], &[u8; 32]> = TableDefinition::new("clean");

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VerdictCacheError {
    /// The database file failed.
    #[error("Verdict cache database")]
    Db(#[source] Box<redb::Error>),
    /// The signature database directory could not be read.
    #[error("Signature database directory {path}")]
    DatabaseDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn db(e: impl Into<redb::Error>) -> VerdictCacheError {
    VerdictCacheError::Db(Box::new(e.into()))
}

/// The persisted cache. Its calls are blocking (database I/O).
#[derive(Debug)]
pub struct VerdictCache {
    db: Database,
}

impl VerdictCache {
    /// Opens (or creates) the cache file.
    pub fn open(path: &Path) -> Result<Self, VerdictCacheError> {
        let database = Database::create(path).map_err(db)?;
        let tx = database.begin_write().map_err(db)?;
        tx.open_table(CLEAN).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Self { db: database })
    }

    /// Whether `id` was scanned clean by the database `fingerprint` names.
    pub fn is_clean(
        &self,
        id: &[u8; 32],
        fingerprint: &[u8; 32],
    ) -> Result<bool, VerdictCacheError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(CLEAN).map_err(db)?;
        Ok(table
            .get(id)
            .map_err(db)?
            .is_some_and(|fp| fp.value() == fingerprint))
    }

    /// Records that `id` was scanned clean by the database `fingerprint` names.
    pub fn record_clean(
        &self,
        id: &[u8; 32],
        fingerprint: &[u8; 32],
    ) -> Result<(), VerdictCacheError> {
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(CLEAN)
            .map_err(db)?
            .insert(id, fingerprint)
            .map_err(db)?;
        tx.commit().map_err(db)
    }
}

/// The fingerprint of a signature database: clamd's `version` answer and
/// what is in `dir` (names, sizes, modification times). Blocking (reads the
/// directory).
pub fn fingerprint(version: &str, dir: &Path) -> Result<[u8; 32], VerdictCacheError> {
    let io = |source| VerdictCacheError::DatabaseDir {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let meta = entry.metadata().map_err(io)?;
        if !meta.is_file() {
            continue;
        }
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        files.push((entry.file_name(), meta.len(), mtime));
    }
    files.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"p2pvm/signature-db/v1\0");
    h.update(version.as_bytes());
    for (name, len, mtime) in files {
        h.update(b"\0");
        h.update(name.as_encoded_bytes());
        h.update(&len.to_le_bytes());
        h.update(&mtime.to_le_bytes());
    }
    Ok(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_verdict_lasts_until_the_database_changes_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let sigs = dir.path().join("db");
        std::fs::create_dir(&sigs).unwrap();
        std::fs::write(sigs.join("p2pvm.ndb"), "Sig1:0:*:414243\n").unwrap();
        let fp = fingerprint("ClamAV 1.4.6", &sigs).unwrap();
        let id = [9u8; 32];
        let cache = VerdictCache::open(&dir.path().join("verdicts.redb")).unwrap();
        assert!(!cache.is_clean(&id, &fp).unwrap());
        cache.record_clean(&id, &fp).unwrap();
        assert!(cache.is_clean(&id, &fp).unwrap());
        assert!(!cache.is_clean(&[8u8; 32], &fp).unwrap());
        drop(cache);
        let cache = VerdictCache::open(&dir.path().join("verdicts.redb")).unwrap();
        assert!(cache.is_clean(&id, &fp).unwrap(), "lost on reopening");
        // A new signature file, or another engine: another database.
        std::fs::write(
            sigs.join("more.hdb"),
            "44d88612fea8a8f36de82e1278abb02f:68:Eicar\n",
        )
        .unwrap();
        let fp2 = fingerprint("ClamAV 1.4.6", &sigs).unwrap();
        assert_ne!(fp, fp2);
        assert!(!cache.is_clean(&id, &fp2).unwrap());
        assert_ne!(fingerprint("ClamAV 1.4.7", &sigs).unwrap(), fp2);
        assert!(fingerprint("ClamAV 1.4.6", &dir.path().join("nope")).is_err());
    }
}
