//! Rate limits for log lines a guest can cause at will (a write to a port,
//! a refused feature): one line per call site per interval, with the count
//! of those held back, so a guest cannot fill the host's disk through the
//! VMM's log.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one line per call site in this interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One call site's limit.
#[derive(Debug)]
pub struct RateLimit {
    /// When the last line went out (ms since the first check), +1; 0 = never.
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    /// A limit that lets the first line through.
    pub const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may go out now.
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms() + 1)
    }

    /// [`RateLimit::check`] at `now` (ms, never 0).
    fn check_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last + INTERVAL.as_millis() as u64 {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// `tracing::warn!` at most once per [`INTERVAL`] from this call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(held_back) = LIMIT.check() {
            tracing::warn!(held_back, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval() {
        let l = RateLimit::new();
        let interval = INTERVAL.as_millis() as u64;
        assert_eq!(l.check_at(5), Some(0));
        for t in 6..1006 {
            assert_eq!(l.check_at(t), None);
        }
        assert_eq!(l.check_at(5 + interval - 1), None);
        assert_eq!(
            l.check_at(5 + interval),
            Some(1001),
            "with the count held back"
        );
        assert_eq!(l.check_at(6 + interval), None);
    }
}
