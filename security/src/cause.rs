//! The source of one of this crate's errors when a library failed: kept
//! whole, so callers can walk the chain, instead of flattened into text.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// A library's error under one of ours. Shared, because this crate's errors
/// are cloned (one verdict answers several waiters); equal when their messages
/// are, because they are compared (tests, cached verdicts).
#[derive(Clone)]
pub struct Cause(Arc<dyn Error + Send + Sync>);

impl Cause {
    /// Keeps `e`.
    pub fn new(e: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self(Arc::from(e.into()))
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Cause {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the block")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_goes_on_below_a_cause() {
        let e = Cause::new(Outer(std::io::Error::other("disk on fire")));
        assert_eq!(e.to_string(), "cannot read the block");
        assert_eq!(e.source().unwrap().to_string(), "disk on fire");
        assert_eq!(e.clone(), e);
        assert_eq!(e, Cause::new("cannot read the block"));
        assert_ne!(e, Cause::new("another"));
    }
}
