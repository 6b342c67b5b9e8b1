//! A wall-clock sampler of where the guest's vCPUs are: boot analysis.
//!
//! The guest kernel's own timestamps cannot say where a nested boot's time
//! goes: until its clocksource switches over it keeps time in jiffies, and
//! ticks are lost while the emulated vCPU is busy. So the VMM looks from
//! outside instead. With `P2PVMM_GUEST_PROFILE=FILE`, the runner kicks each
//! vCPU out of `KVM_RUN` every [`PERIOD`]; the vCPU reads its instruction
//! pointer and privilege level before going back in, and the samples are
//! written to `FILE` as `ms vcpu rip k|u` lines (milliseconds since the
//! vCPUs started; kernel or user mode). A halted vCPU
//! is sampled too (at its `hlt`), so time spent waiting shows as well as
//! time spent computing. Symbols come from the kernel's `System.map`
//! (`tests/vm/README.md` says how).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The environment variable naming the samples file.
pub const ENV: &str = "P2PVMM_GUEST_PROFILE";

/// How often each vCPU is sampled (250 Hz: a 3 s boot gives ~750 samples,
/// and each costs only one extra exit).
pub const PERIOD: Duration = Duration::from_millis(4);

/// Samples kept at most: ten minutes of one vCPU (a profile is for a boot;
/// one left on by mistake must not grow without bound).
pub const MAX_SAMPLES: usize = 150_000;

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Milliseconds since the profile started.
    pub ms: u32,
    /// Which vCPU.
    pub vcpu: u8,
    /// Its instruction pointer.
    pub rip: u64,
    /// Whether it ran user code (CPL 3).
    pub user: bool,
}

/// The samples of one run, shared by its vCPU threads.
#[derive(Debug)]
pub struct GuestProfile {
    path: PathBuf,
    started: Mutex<Instant>,
    samples: Mutex<Vec<Sample>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl GuestProfile {
    /// A profile written to the file `P2PVMM_GUEST_PROFILE` names, if set.
    pub fn from_env() -> Option<Self> {
        std::env::var_os(ENV)
            .filter(|p| !p.is_empty())
            .map(|p| Self::new(PathBuf::from(p)))
    }

    /// A profile to be written to `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            started: Mutex::new(Instant::now()),
            samples: Mutex::new(Vec::new()),
            dropped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Times samples from now (the vCPUs' start).
    pub fn start(&self) {
        *lock(&self.started) = Instant::now();
        lock(&self.samples).clear();
        self.dropped.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records where `vcpu` is.
    pub fn record(&self, vcpu: u8, rip: u64, user: bool) {
        let ms = lock(&self.started).elapsed().as_millis();
        let mut samples = lock(&self.samples);
        if samples.len() >= MAX_SAMPLES {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        samples.push(Sample {
            ms: u32::try_from(ms).unwrap_or(u32::MAX),
            vcpu,
            rip,
            user,
        });
    }

    /// Samples not kept because [`MAX_SAMPLES`] were.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).clone()
    }

    /// Where the samples go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the samples, one `ms vcpu rip k|u` line each.
    pub fn write(&self) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&self.path)?);
        for s in lock(&self.samples).iter() {
            let mode = if s.user { 'u' } else { 'k' };
            writeln!(out, "{} {} {:#x} {mode}", s.ms, s.vcpu, s.rip)?;
        }
        out.flush()
    }
}

/// A poisoned lock here only means a vCPU thread panicked mid-push; the
/// samples are still worth having.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_in_order_as_ms_vcpu_rip_mode_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = GuestProfile::new(dir.path().join("prof"));
        p.record(0, 0xffff_ffff_8100_0000, false);
        std::thread::sleep(Duration::from_millis(5));
        p.record(1, 0x1234, true);
        p.write().unwrap();
        let text = std::fs::read_to_string(p.path()).unwrap();
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0][1..], ["0", "0xffffffff81000000", "k"]);
        assert_eq!(lines[1][1..], ["1", "0x1234", "u"]);
        let t0: u32 = lines[0][0].parse().unwrap();
        let t1: u32 = lines[1][0].parse().unwrap();
        assert!(t1 >= t0 + 5, "{t0} then {t1}");
        // A new run starts from nothing.
        p.start();
        assert!(p.samples().is_empty());
    }

    #[test]
    fn a_profile_left_on_stops_growing_at_its_cap() {
        let p = GuestProfile::new("/nonexistent/unused".into());
        for i in 0..MAX_SAMPLES as u64 + 10 {
            p.record(0, i, false);
        }
        assert_eq!(p.samples().len(), MAX_SAMPLES);
        assert_eq!(p.samples().last().unwrap().rip, MAX_SAMPLES as u64 - 1);
        assert_eq!(p.dropped(), 10);
    }
}
