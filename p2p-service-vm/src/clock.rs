//! The wall clock as p2pd records it: whole seconds since the Unix epoch, in
//! manifests, receipts, figures and pages. A clock set before 1970 reads 0.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
