//! The virus filter's verdict cache as the content engine uses it: async
//! (the cache and the signature directory are read on blocking threads), and
//! with the database fingerprint worked out at most every few seconds.
//!
//! When clamd cannot be asked for its version, the last answer stands
//! beside a fresh reading of the database directory: a cached clean item
//! stays usable while clamd restarts, and a changed signature file still
//! invalidates everything.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::report::chain;
use p2pvm_content::ContentId;
use p2pvm_security::{VerdictCache, VerdictCacheError, VirusFilter, verdicts};
use tracing::{debug, warn};

/// How long a worked-out fingerprint is used before the directory is read
/// again (a signature update is noticed within this).
const REFRESH: Duration = Duration::from_secs(2);

/// A database fingerprint.
pub(crate) type Fingerprint = [u8; 32];

#[derive(Debug, Default)]
struct Known {
    version: Option<String>,
    fingerprint: Option<(Instant, Fingerprint)>,
}

/// The cache and how to fingerprint the database.
#[derive(Debug)]
pub(crate) struct Verdicts {
    cache: Arc<VerdictCache>,
    database_dir: PathBuf,
    known: Mutex<Known>,
}

impl Verdicts {
    /// Opens the cache file (blocking; at start-up).
    pub(crate) fn open(
        path: &std::path::Path,
        database_dir: PathBuf,
    ) -> Result<Self, VerdictCacheError> {
        Ok(Self {
            cache: Arc::new(VerdictCache::open(path)?),
            database_dir,
            known: Mutex::default(),
        })
    }

    /// The current database's fingerprint, if it can be known.
    pub(crate) async fn fingerprint(&self, filter: &VirusFilter) -> Option<Fingerprint> {
        let last = {
            let k = self.known.lock().expect("lock");
            if let Some((at, fp)) = k.fingerprint
                && at.elapsed() < REFRESH
            {
                return Some(fp);
            }
            k.version.clone()
        };
        let version = match filter.version().await {
            Ok(Some(v)) => v,
            Ok(None) => return None,
            Err(e) => {
                debug!(error = %chain(&e), "clamd's version unknown; using the last one");
                last?
            }
        };
        let (dir, v) = (self.database_dir.clone(), version.clone());
        let fp = tokio::task::spawn_blocking(move || verdicts::fingerprint(&v, &dir)).await;
        let fp = match fp {
            Ok(Ok(fp)) => fp,
            Ok(Err(e)) => {
                debug!(error = %crate::report::chain(&e), "no signature fingerprint: verdicts are not cached");
                return None;
            }
            Err(_) => return None,
        };
        let mut k = self.known.lock().expect("lock");
        k.version = Some(version);
        k.fingerprint = Some((Instant::now(), fp));
        Some(fp)
    }

    /// Whether `id` was scanned clean by this database; the fingerprint, to
    /// record a clean scan under if it was not.
    pub(crate) async fn check(
        &self,
        filter: &VirusFilter,
        id: &ContentId,
    ) -> (bool, Option<Fingerprint>) {
        let Some(fp) = self.fingerprint(filter).await else {
            return (false, None);
        };
        let (cache, id) = (self.cache.clone(), id.0);
        let clean = tokio::task::spawn_blocking(move || cache.is_clean(&id, &fp)).await;
        match clean {
            Ok(Ok(clean)) => (clean, Some(fp)),
            Ok(Err(e)) => {
                warn!(error = %crate::report::chain(&e), "verdict cache unreadable; scanning");
                (false, Some(fp))
            }
            Err(_) => (false, Some(fp)),
        }
    }

    /// Records a clean scan of `id` by the database `fp` names — unless the
    /// database changed while it was scanned (which one found it clean is
    /// then not known).
    pub(crate) async fn remember_clean(
        &self,
        filter: &VirusFilter,
        id: &ContentId,
        fp: Fingerprint,
    ) {
        if self.fingerprint(filter).await != Some(fp) {
            debug!(%id, "signatures changed during the scan; its verdict is not cached");
            return;
        }
        let (cache, id) = (self.cache.clone(), id.0);
        match tokio::task::spawn_blocking(move || cache.record_clean(&id, &fp)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %crate::report::chain(&e), "cannot record a clean verdict")
            }
            Err(e) => warn!(error = %chain(&e), "cannot record a clean verdict"),
        }
    }
}
