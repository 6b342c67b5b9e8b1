//! What ends a VM run, and the timestamps of its boot.
//!
//! Any thread (a vCPU writing the ACPI sleep register, the device thread
//! losing its disk, a signal) may end the run; the first reason wins, the
//! main thread wakes in [`ExitSignal::wait`] and stops everything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::devices::bus::lock;

/// Why a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042, triple fault).
    Reset,
    /// The guest reported a panic (pvpanic).
    Panic,
    /// The host asked the VMM to stop (signal).
    Stopped,
    /// The VMM could not go on.
    Error(String),
}

/// The run's end, as any thread may request it.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    ended: Condvar,
}

impl ExitSignal {
    /// A signal nobody raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            ended: Condvar::new(),
        })
    }

    /// Ends the run for `reason` unless it already ends for another.
    pub fn request(&self, reason: ExitReason) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            tracing::debug!(?reason, "VM exit requested");
            *r = Some(reason);
            self.stopping.store(true, Ordering::Release);
            self.ended.notify_all();
        }
    }

    /// Whether the run is ending (vCPU loops check this before each entry).
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The reason, once requested.
    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    /// Waits up to `timeout` for the run to end; returns whether it has.
    pub fn wait(&self, timeout: Duration) -> bool {
        let guard = lock(&self.reason);
        let (guard, _) = self
            .ended
            .wait_timeout_while(guard, timeout, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        guard.is_some()
    }
}

/// Boot milestones, relative to the VMM's start.
#[derive(Debug)]
pub struct BootTimes {
    start: Instant,
    vcpus_started: OnceLock<Duration>,
    first_output: OnceLock<Duration>,
    init: OnceLock<Duration>,
}

impl BootTimes {
    /// Starts the clock (at VMM start, before any setup).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            vcpus_started: OnceLock::new(),
            first_output: OnceLock::new(),
            init: OnceLock::new(),
        }
    }

    /// The machine is built and its vCPUs are about to enter the guest.
    pub fn vcpus_started(&self) {
        let _ = self.vcpus_started.set(self.start.elapsed());
    }

    /// Milliseconds spent building the machine (VMM start to first vCPU entry).
    pub fn setup_ms(&self) -> Option<f64> {
        self.vcpus_started.get().map(|d| d.as_secs_f64() * 1e3)
    }

    /// The guest wrote its first byte to the console.
    pub fn first_output(&self) {
        if self.first_output.set(self.start.elapsed()).is_ok() {
            tracing::info!(ms = self.first_output_ms(), "guest's first console output");
        }
    }

    /// The guest's `/init` announced itself on the boot-marker port.
    pub fn init(&self) {
        if self.init.set(self.start.elapsed()).is_ok() {
            tracing::info!(ms = self.init_ms(), "guest reached /init");
        }
    }

    /// Milliseconds to the first console byte, if seen.
    pub fn first_output_ms(&self) -> Option<f64> {
        self.first_output.get().map(|d| d.as_secs_f64() * 1e3)
    }

    /// Milliseconds to `/init`, if seen.
    pub fn init_ms(&self) -> Option<f64> {
        self.init.get().map(|d| d.as_secs_f64() * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.stopping());
        assert!(!s.wait(Duration::from_millis(1)));
        s.request(ExitReason::PowerOff);
        s.request(ExitReason::Reset);
        assert!(s.stopping());
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
        assert!(s.wait(Duration::ZERO));
    }

    #[test]
    fn milestones_are_kept_once() {
        let t = BootTimes::new(Instant::now());
        assert_eq!(t.init_ms(), None);
        t.init();
        let first = t.init_ms().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.init();
        assert_eq!(t.init_ms(), Some(first));
    }
}
