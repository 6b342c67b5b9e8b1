//! The credit score: a Beta reputation over exponentially decayed evidence.
//!
//! Each observation adds weighted evidence to `good` or `bad`, and all evidence
//! halves every `half_life` (BOINC's recent-average credit, with a configurable
//! horizon). The score is the expected probability that the next interaction
//! is good under a Beta(good + 1, bad + 1) posterior:
//!
//! ```text
//!   trust = (good + 1) / (good + bad + 2)        score = round(100 · trust)
//! ```
//!
//! A stranger scores 50. Good evidence is bytes that verified (1 per MiB) and
//! requests answered; bad evidence is weighted so cheap good behaviour cannot
//! hide harm: one corrupt block outweighs 16 MiB of good data, a malware
//! delivery 1000 MiB. Only this node's own observations count (no gossip of
//! scores, so colluding identities cannot vouch for each other).

/// Evidence weights.
#[derive(Debug, Clone, Copy)]
pub struct Weights {
    /// Per MiB of data that verified.
    pub good_per_mib: f64,
    /// Per request the peer answered.
    pub good_per_request: f64,
    /// Per request the peer failed (refused, vanished, broke off).
    pub bad_per_failed_request: f64,
    /// Per request the peer took and sent nothing back for while its
    /// connection lived: a silent or hung peer holds a downloader's slot for
    /// the whole answer timeout (15 s), which an honest one does not (its
    /// server answers `Busy` within 5 s when overloaded). One such episode
    /// refuses a stranger, so the downloader charges it only once the
    /// stream has stayed silent well past the timeout (an answer that comes
    /// late is a failed request).
    pub bad_per_unanswered: f64,
    /// Per block that failed verification.
    pub bad_per_corrupt_block: f64,
    /// Per protocol violation.
    pub bad_per_violation: f64,
    /// Per malware detection.
    pub bad_per_malware: f64,
    /// Per failed DRM check.
    pub bad_per_drm_failure: f64,
    /// Per compute job whose result agreed with the majority.
    pub good_per_compute_job: f64,
    /// Per compute job whose result (or claimed work) disagreed: as bad as a
    /// corrupt block, since both are a false answer to a request.
    pub bad_per_wrong_result: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            good_per_mib: 1.0,
            good_per_request: 0.05,
            bad_per_failed_request: 0.5,
            bad_per_unanswered: 8.0,
            bad_per_corrupt_block: 16.0,
            bad_per_violation: 16.0,
            bad_per_malware: 1000.0,
            bad_per_drm_failure: 16.0,
            good_per_compute_job: 1.0,
            bad_per_wrong_result: 16.0,
        }
    }
}

/// What the node does with a peer, by score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// Served and used normally.
    Good,
    /// Served slowly and used only when nobody better has the data.
    Throttled,
    /// Not served and not used.
    Refused,
    /// Banned (malware): disconnected and refused until the ban ends.
    Banned,
}

/// Score thresholds.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Below this score a peer is throttled.
    pub throttle_below: u8,
    /// Below this score a peer is refused.
    pub refuse_below: u8,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            throttle_below: 30,
            refuse_below: 15,
        }
    }
}

impl Policy {
    /// The standing of a peer with this score.
    pub fn standing(&self, score: u8) -> Standing {
        if score < self.refuse_below {
            Standing::Refused
        } else if score < self.throttle_below {
            Standing::Throttled
        } else {
            Standing::Good
        }
    }
}

/// `trust` of the Beta posterior.
pub(crate) fn trust(good: f64, bad: f64) -> f64 {
    (good.max(0.0) + 1.0) / (good.max(0.0) + bad.max(0.0) + 2.0)
}

/// Evidence decayed over `dt_secs` with the given half-life.
pub(crate) fn decay(value: f64, dt_secs: f64, half_life_secs: f64) -> f64 {
    if dt_secs <= 0.0 || half_life_secs <= 0.0 {
        return value;
    }
    value * 0.5f64.powf(dt_secs / half_life_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_are_neutral_and_evidence_moves_the_score() {
        assert_eq!((trust(0.0, 0.0) * 100.0).round(), 50.0);
        assert!(trust(100.0, 0.0) > 0.95);
        // One corrupt block (16) against 16 MiB of good data is a coin toss.
        assert!((trust(16.0, 16.0) - 0.5).abs() < 1e-9);
        assert!(trust(0.0, 16.0) < 0.1);
        // One unanswered request refuses a stranger; a peer that served
        // 64 MiB survives one.
        let w = Weights::default();
        let p = Policy::default();
        assert_eq!(
            p.standing((trust(0.0, w.bad_per_unanswered) * 100.0).round() as u8),
            Standing::Refused
        );
        assert_eq!(
            p.standing((trust(64.0, w.bad_per_unanswered) * 100.0).round() as u8),
            Standing::Good
        );
    }

    #[test]
    fn evidence_halves_each_half_life() {
        assert!((decay(8.0, 3600.0, 3600.0) - 4.0).abs() < 1e-9);
        assert_eq!(decay(8.0, 0.0, 3600.0), 8.0);
    }

    #[test]
    fn policy_bands() {
        let p = Policy::default();
        assert_eq!(p.standing(50), Standing::Good);
        assert_eq!(p.standing(20), Standing::Throttled);
        assert_eq!(p.standing(5), Standing::Refused);
    }
}
