//! When to keep polling for an answer instead of sleeping on the event channel.
//!
//! A request sent over the channel is usually answered within a steady
//! turnaround (an API call: the other side's work plus its way back). If the
//! pump sleeps after sending, the answer costs a notification: the peer rings
//! a doorbell (in VM mode an exit from its VM) and this side is woken by an
//! interrupt (an injection, a halted vCPU entered again, its timer stopped and
//! started). If the pump instead keeps looking a little longer than the usual
//! turnaround, it is not armed, so the peer does not ring at all. This is
//! KVM's halt polling moved to where the turnaround is known: the window
//! follows the observed turnaround (an exponential average) and polling stops
//! while turnarounds are longer than [`MAX_WINDOW`] (a DHT lookup, a large
//! transfer waiting for credit), so slow answers cost no spinning.
//!
//! Plain data with time passed in, so the policy is tested on its own.

use std::time::{Duration, Instant};

/// Turnarounds longer than this are slept through: spinning that long would
/// cost more CPU than the notification it saves.
pub const MAX_WINDOW: Duration = Duration::from_millis(4);

/// The window is this many times the average turnaround, so an answer a
/// little late is still caught.
const SLACK: u32 = 2;

/// After a window that caught nothing, polling pauses for this many sends,
/// doubling with each further miss up to [`MAX_PAUSE`]; an answer inside
/// the window ends the pause. Irregular traffic then costs little spinning.
const FIRST_PAUSE: u32 = 1;
const MAX_PAUSE: u32 = 64;

/// Tracks turnarounds and says how long to poll after a send.
#[derive(Debug, Default, Clone)]
pub struct AnswerPoll {
    /// When this side last sent something.
    sent_at: Option<Instant>,
    /// Whether input arrived since then (the turnaround was measured).
    answered: bool,
    /// Average time from a send to the next input, weight 1/4.
    turnaround: Option<Duration>,
    /// Sends whose windows are skipped before polling resumes after a miss.
    pause: u32,
    /// The last send's window is skipped.
    skipping: bool,
    /// The pause the next miss starts (0: no miss since the last hit).
    backoff: u32,
}

impl AnswerPoll {
    /// A step that moved messages: `sent` and `received` counts, at `now`.
    pub fn step(&mut self, now: Instant, sent: usize, received: usize) {
        if received > 0
            && !self.answered
            && let Some(at) = self.sent_at
        {
            self.answered = true;
            let sample = now.saturating_duration_since(at);
            if self.turnaround.is_some_and(|t| sample <= t * SLACK) {
                // A window would have caught it.
                self.backoff = 0;
                self.pause = 0;
                self.skipping = false;
            }
            self.turnaround = Some(match self.turnaround {
                None => sample,
                Some(avg) => (avg * 3 + sample) / 4,
            });
        }
        if sent > 0 {
            self.sent_at = Some(now);
            self.answered = false;
            self.skipping = self.pause > 0;
            self.pause = self.pause.saturating_sub(1);
        }
    }

    /// A window ended without input: pause polling for a while.
    pub fn missed(&mut self) {
        self.backoff = (self.backoff * 2).clamp(FIRST_PAUSE, MAX_PAUSE);
        self.pause = self.backoff;
    }

    /// Until when to keep polling, if an answer is expected soon. The window
    /// stays open after the first input: an answer often comes in several
    /// messages (a frame written in two pieces), and sleeping between them
    /// would cost the notification the window is there to save.
    pub fn deadline(&self) -> Option<Instant> {
        if self.skipping {
            return None;
        }
        let at = self.sent_at?;
        let t = self.turnaround?;
        (t <= MAX_WINDOW).then(|| at + t * SLACK)
    }

    /// The current average turnaround.
    #[cfg(test)]
    pub fn turnaround(&self) -> Option<Duration> {
        self.turnaround
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_is_expected_before_a_turnaround_was_seen() {
        let t0 = Instant::now();
        let mut p = AnswerPoll::default();
        assert_eq!(p.deadline(), None);
        p.step(t0, 1, 0);
        assert_eq!(p.deadline(), None, "no turnaround measured yet");
    }

    #[test]
    fn after_a_send_it_polls_for_twice_the_usual_turnaround() {
        let t0 = Instant::now();
        let mut p = AnswerPoll::default();
        p.step(t0, 1, 0);
        p.step(t0 + MS, 0, 1);
        assert_eq!(p.turnaround(), Some(MS));
        assert_eq!(
            p.deadline(),
            Some(t0 + 2 * MS),
            "the rest of an answer may follow its first piece"
        );
        p.step(t0 + MS + MS / 2, 0, 1);
        assert_eq!(p.turnaround(), Some(MS), "only the first input is a sample");
        p.step(t0 + 10 * MS, 1, 0);
        assert_eq!(p.deadline(), Some(t0 + 12 * MS));
    }

    #[test]
    fn slow_answers_stop_the_polling_and_fast_ones_bring_it_back() {
        let t0 = Instant::now();
        let mut p = AnswerPoll::default();
        p.step(t0, 1, 0);
        p.step(t0 + 100 * MS, 0, 1);
        p.step(t0 + 200 * MS, 1, 0);
        assert_eq!(p.deadline(), None, "100 ms turnarounds are slept through");
        let mut now = t0 + 200 * MS;
        for _ in 0..20 {
            now += MS;
            p.step(now, 0, 1);
            p.step(now, 1, 0);
        }
        assert!(p.turnaround().unwrap() <= MAX_WINDOW);
        assert!(p.deadline().is_some());
    }

    #[test]
    fn misses_pause_polling_longer_each_time_and_a_hit_ends_the_pause() {
        let t0 = Instant::now();
        let mut p = AnswerPoll::default();
        p.step(t0, 1, 0);
        p.step(t0 + MS, 0, 1);
        let mut now = t0 + 10 * MS;
        // Answers stop coming in time: each miss skips more windows.
        let mut skipped = Vec::new();
        for _ in 0..8 {
            p.step(now, 1, 0);
            assert!(p.deadline().is_some(), "polling resumed after the pause");
            p.missed();
            let mut n = 0;
            loop {
                now += 10 * MS;
                p.step(now, 1, 0);
                if p.deadline().is_some() {
                    break;
                }
                n += 1;
            }
            skipped.push(n);
        }
        assert_eq!(skipped, [1, 2, 4, 8, 16, 32, 64, 64]);
        // An answer inside the usual turnaround ends the pause at once.
        p.missed();
        p.step(now + 20 * MS, 1, 0);
        assert_eq!(p.deadline(), None, "paused");
        p.step(now + 20 * MS + MS / 2, 0, 1);
        p.step(now + 30 * MS, 1, 0);
        assert!(p.deadline().is_some(), "the hit ended the pause");
        p.missed();
        p.step(now + 40 * MS, 1, 0);
        assert_eq!(p.deadline(), None, "the backoff restarts at one window");
        p.step(now + 50 * MS, 1, 0);
        assert!(p.deadline().is_some());
    }

    #[test]
    fn a_step_that_receives_and_sends_measures_then_waits_again() {
        let t0 = Instant::now();
        let mut p = AnswerPoll::default();
        p.step(t0, 1, 0);
        p.step(t0 + 2 * MS, 1, 1);
        assert_eq!(p.turnaround(), Some(2 * MS));
        assert_eq!(p.deadline(), Some(t0 + 6 * MS));
    }
}
