//! Interrupt moderation for one virtio-net queue: when used buffers are
//! signalled to the guest.
//!
//! Every interrupt costs the guest an injection, usually an exit or two and a
//! NAPI round; signalling each batch of a stream at once spends the guest's
//! CPU on that instead of on the data. So, like a NIC's adaptive interrupt
//! throttling, a queue under a steady stream holds its interrupt for a few
//! batches' time and signals them together. The hold is measured in the
//! stream's own pace — `GAPS` times the recent gap between batches, never
//! more than `MAX_HOLD` — so it adapts by itself from a hardware host
//! (batches microseconds apart) to nested emulation (a millisecond apart).
//!
//! What keeps it from costing latency or throughput:
//! - a batch that finds the queue quiet (no interrupt for a hold's time, or
//!   the first after a pause longer than `MAX_HOLD`) is signalled at once, so
//!   a lone request or reply never waits;
//! - a hold that caught only one batch helped nothing and delayed it: the
//!   next batches are signalled at once, for a stretch that doubles with each
//!   such miss (up to `MAX_BACKOFF`), so a ping-pong exchange settles into
//!   no holding at all;
//! - the device marks a batch urgent when the guest must act before more can
//!   flow (no receive buffers left; half the transmit ring waiting to be
//!   reclaimed): it goes at once, with whatever was held.
//!
//! On the transmit queue a hold also keeps the driver's kicks off: the
//! device looks at the ring when the hold ends, so a steady stream costs one
//! kick per hold instead of one per packet (`Net::transmit_all`).
//!
//! The policy is plain data with the time passed in ([`Policy`]), tested on
//! its own; [`Moderation`] adds the timer the device thread watches.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

/// The longest an interrupt is ever held.
pub const MAX_HOLD: Duration = Duration::from_millis(4);
/// The hold, in gaps between batches.
const GAPS: u32 = 3;
/// Longest stretch of batches signalled at once after unproductive holds.
const MAX_BACKOFF: u32 = 64;

/// What to do with a batch of used buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Interrupt the guest now.
    Signal,
    /// Hold it; the timer must fire at `until`.
    Hold { until: Instant },
    /// A hold is running already; this batch joins it.
    Joined,
}

/// The moderation policy of one queue: batches and time in, decisions out.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    last_signal: Option<Instant>,
    last_batch: Option<Instant>,
    /// Recent gap between batches (smoothed); `None` after a pause.
    mean_gap: Option<Duration>,
    /// Batches in the running hold (0: none running).
    held: u32,
    /// Batches still to be signalled at once, and the current stretch.
    backoff_left: u32,
    backoff_len: u32,
}

impl Policy {
    /// The hold a batch arriving now would get.
    pub fn hold(&self) -> Duration {
        self.mean_gap
            .map_or(Duration::ZERO, |g| (g * GAPS).min(MAX_HOLD))
    }

    /// A batch of used buffers at `now`; `urgent` when the guest must see
    /// it at once.
    pub fn batch(&mut self, now: Instant, urgent: bool) -> Decision {
        self.learn_gap(now);
        if self.held > 0 {
            if urgent {
                return self.signal(now);
            }
            self.held += 1;
            return Decision::Joined;
        }
        if urgent || self.backoff_left > 0 {
            self.backoff_left = self.backoff_left.saturating_sub(1);
            return self.signal(now);
        }
        let until = match self.last_signal {
            Some(last) => last + self.hold(),
            None => now,
        };
        if until <= now {
            return self.signal(now);
        }
        self.held = 1;
        Decision::Hold { until }
    }

    /// The hold's timer fired at `now`: whether to interrupt the guest.
    pub fn expired(&mut self, now: Instant) -> bool {
        match self.held {
            0 => false,
            1 => {
                // Only one batch waited: the hold bought nothing.
                self.backoff_len = (self.backoff_len * 2).clamp(1, MAX_BACKOFF);
                self.backoff_left = self.backoff_len;
                self.signal(now);
                true
            }
            _ => {
                self.backoff_len = 0;
                self.signal(now);
                true
            }
        }
    }

    /// Whether a hold is running.
    pub fn holding(&self) -> bool {
        self.held > 0
    }

    fn signal(&mut self, now: Instant) -> Decision {
        self.held = 0;
        self.last_signal = Some(now);
        Decision::Signal
    }

    fn learn_gap(&mut self, now: Instant) {
        let gap = self
            .last_batch
            .map(|last| now.saturating_duration_since(last));
        self.last_batch = Some(now);
        self.mean_gap = match (gap, self.mean_gap) {
            // A pause ends the stream: its pace is learnt afresh.
            (None, _) => None,
            (Some(g), _) if g >= MAX_HOLD => None,
            (Some(g), None) => Some(g),
            (Some(g), Some(m)) => Some((m * 3 + g) / 4),
        };
    }
}

/// A queue's policy with the timer that ends its holds.
#[derive(Debug)]
pub struct Moderation {
    policy: Policy,
    /// One-shot, non-blocking: a stale readiness never stalls the device thread.
    timer: OwnedFd,
}

impl Moderation {
    /// A policy with its timer.
    pub fn new() -> io::Result<Self> {
        let timer = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        Ok(Self {
            policy: Policy::default(),
            timer,
        })
    }

    /// The timer, for the event loop.
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The timer, borrowed.
    pub fn timer(&self) -> BorrowedFd<'_> {
        self.timer.as_fd()
    }

    /// A batch of used buffers: whether to interrupt the guest now.
    pub fn batch(&mut self, urgent: bool) -> bool {
        let now = Instant::now();
        let was_holding = self.policy.holding();
        match self.policy.batch(now, urgent) {
            Decision::Signal => {
                if was_holding {
                    // An urgent batch ended the hold early.
                    let _ = self.arm(Duration::ZERO);
                }
                true
            }
            Decision::Joined => false,
            Decision::Hold { until } => match self.arm(until - now) {
                Ok(()) => false,
                Err(e) => {
                    tracing::debug!(error = %e, "virtio-net: cannot arm the moderation timer");
                    self.policy.expired(now)
                }
            },
        }
    }

    /// The timer is readable: whether to interrupt the guest.
    pub fn expired(&mut self) -> bool {
        let mut ticks = [0u8; 8];
        // Nothing to read (a hold ended early): the policy has nothing held.
        let _ = rustix::io::read(&self.timer, &mut ticks);
        self.policy.expired(Instant::now())
    }

    /// Whether a hold runs (its timer armed).
    pub fn holding(&self) -> bool {
        self.policy.holding()
    }

    /// Forgets everything (device reset).
    pub fn clear(&mut self) {
        if self.policy.holding() {
            let _ = self.arm(Duration::ZERO);
        }
        self.policy = Policy::default();
    }

    /// Arms the timer to fire once after `after` (zero disarms it).
    fn arm(&self, after: Duration) -> io::Result<()> {
        let value = Timespec::try_from(after).map_err(|_| io::ErrorKind::InvalidInput)?;
        let spec = Itimerspec {
            it_interval: Timespec::default(),
            it_value: value,
        };
        rustix::time::timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_lone_batch_and_the_first_after_a_pause_go_at_once() {
        let t0 = Instant::now();
        let mut p = Policy::default();
        assert_eq!(p.batch(t0, false), Decision::Signal);
        // Long pause: the stream's pace is forgotten.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(p.batch(t1, false), Decision::Signal);
        assert_eq!(p.hold(), Duration::ZERO);
    }

    #[test]
    fn a_steady_stream_is_held_for_a_few_gaps_and_signalled_together() {
        let t0 = Instant::now();
        let mut p = Policy::default();
        assert_eq!(p.batch(t0, false), Decision::Signal);
        let t1 = t0 + 100 * US;
        // Gap 100 us: hold 300 us from the last interrupt.
        assert_eq!(
            p.batch(t1, false),
            Decision::Hold {
                until: t0 + 300 * US
            }
        );
        assert_eq!(p.batch(t0 + 200 * US, false), Decision::Joined);
        assert!(p.expired(t0 + 300 * US), "two batches held: signalled");
        // Productive: the next batch within the hold is held again.
        assert!(matches!(
            p.batch(t0 + 400 * US, false),
            Decision::Hold { .. }
        ));
    }

    #[test]
    fn the_hold_follows_the_pace_and_never_exceeds_the_cap() {
        let mut p = Policy::default();
        let mut t = Instant::now();
        for _ in 0..20 {
            p.batch(t, false);
            t += 2 * US;
        }
        assert!(p.hold() <= 6 * US + US, "hold {:?}", p.hold());
        let mut p = Policy::default();
        let mut t = Instant::now();
        for _ in 0..20 {
            p.batch(t, false);
            p.expired(t);
            t += MAX_HOLD - US;
        }
        assert_eq!(p.hold(), MAX_HOLD);
    }

    #[test]
    fn a_ping_pong_backs_off_until_it_is_never_held() {
        // One batch every 500 us, each answering the previous one: a hold
        // only ever catches one batch.
        let mut p = Policy::default();
        let mut t = Instant::now();
        let mut held = Vec::new();
        for _ in 0..400 {
            match p.batch(t, false) {
                Decision::Signal => held.push(false),
                Decision::Hold { until } => {
                    held.push(true);
                    // The reply comes only after the guest got this one.
                    assert!(p.expired(until));
                    t = until;
                }
                Decision::Joined => panic!("no second batch within a hold"),
            }
            t += 500 * US;
        }
        let late = held[200..].iter().filter(|h| **h).count();
        assert!(late <= 4, "{late} of the last 200 batches held");
        assert!(held[..10].iter().any(|h| *h), "it did try holding first");
    }

    #[test]
    fn an_urgent_batch_ends_a_hold_at_once() {
        let t0 = Instant::now();
        let mut p = Policy::default();
        p.batch(t0, false);
        assert!(matches!(
            p.batch(t0 + 100 * US, false),
            Decision::Hold { .. }
        ));
        assert_eq!(p.batch(t0 + 150 * US, true), Decision::Signal);
        assert!(!p.holding());
        assert!(!p.expired(t0 + 300 * US), "nothing left to signal");
    }

    #[test]
    fn the_timer_ends_a_hold_and_a_clear_disarms_it() {
        let mut m = Moderation::new().unwrap();
        let fd = m.timer().try_clone_to_owned().unwrap();
        assert!(m.batch(false));
        std::thread::sleep(Duration::from_millis(2));
        assert!(!m.batch(false), "2 ms apart: held");
        m.clear();
        assert!(!readable_within(&fd, 20), "cleared: no expiry");
        assert!(!m.expired(), "a stale wake-up signals nothing");
        assert!(m.batch(false), "after a clear the first batch goes at once");
        std::thread::sleep(Duration::from_millis(2));
        assert!(!m.batch(false));
        assert!(readable_within(&fd, 5_000), "the hold ends");
        assert!(m.expired());
    }

    fn readable_within(fd: &OwnedFd, ms: u16) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap() == 1
    }
}
