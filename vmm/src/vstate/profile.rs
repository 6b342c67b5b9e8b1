//! A wall-clock sampler of where the guest's vCPUs are: boot analysis.
//!
//! The guest kernel's own timestamps cannot say where a nested boot's time
//! goes: until its clocksource switches over it keeps time in jiffies, and
//! ticks are lost while the emulated vCPU is busy. So the VMM looks from
//! outside instead. With `P2PVMM_GUEST_PROFILE=FILE`, the runner kicks each
//! vCPU every [`PERIOD`]. A kick that takes the vCPU out of `KVM_RUN`
//! samples the guest: its instruction pointer and privilege level. A kick
//! that finds the thread in the VMM, handling an exit, is counted as such,
//! so I/O-heavy phases are not under-counted. A halted vCPU is sampled too
//! (at its `hlt`), so time spent waiting shows as well as time computing.
//!
//! The samples are written to `FILE` at the end of each boot, as
//! `ms vcpu rip k|u|v` lines: milliseconds since the vCPUs started; kernel,
//! user, or VMM (`rip` 0). `{vm}` and `{boot}` in `FILE` become the VM's
//! name and the boot's number, so VMs under `p2pvmm up` and a guest's
//! reboots keep files of their own; without them a later boot overwrites
//! the file. Functions are named from the guest's `/proc/kallsyms`
//! (`testhost profile-boot`, tests/vm/README.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Where it was.
    pub mode: Mode,
}

/// Where a sampled vCPU was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Guest kernel code (CPL 0–2).
    Kernel,
    /// Guest user code (CPL 3).
    User,
    /// Out of `KVM_RUN`, in the VMM handling one of its exits.
    Vmm,
}

impl Mode {
    fn letter(self) -> char {
        match self {
            Mode::Kernel => 'k',
            Mode::User => 'u',
            Mode::Vmm => 'v',
        }
    }

    fn from_letter(s: &str) -> Option<Self> {
        match s {
            "k" => Some(Mode::Kernel),
            "u" => Some(Mode::User),
            "v" => Some(Mode::Vmm),
            _ => None,
        }
    }
}

impl Sample {
    /// The sample as a line of the samples file: `ms vcpu rip k|u|v`.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {:#x} {}",
            self.ms,
            self.vcpu,
            self.rip,
            self.mode.letter()
        )
    }

    /// A sample from the fields of such a line; `None` if they are not one.
    pub fn from_fields(fields: [&str; 4]) -> Option<Self> {
        let [ms, vcpu, rip, mode] = fields;
        Some(Sample {
            ms: ms.parse().ok()?,
            vcpu: vcpu.parse().ok()?,
            rip: u64::from_str_radix(rip.trim_start_matches("0x"), 16).ok()?,
            mode: Mode::from_letter(mode)?,
        })
    }
}

/// The samples of one run, shared by its vCPU threads.
#[derive(Debug)]
pub struct GuestProfile {
    path: PathBuf,
    started: Mutex<Instant>,
    samples: Mutex<Vec<Sample>>,
    dropped: AtomicU64,
}

impl GuestProfile {
    /// A profile of boot `boot` of VM `vm`, written to the file
    /// `P2PVMM_GUEST_PROFILE` names, if set.
    pub fn from_env(vm: &str, boot: u32) -> Option<Self> {
        Self::from_template(std::env::var(ENV).ok(), vm, boot)
    }

    /// [`Self::from_env`] given the variable's value.
    fn from_template(template: Option<String>, vm: &str, boot: u32) -> Option<Self> {
        let template = template.filter(|p| !p.is_empty())?;
        let path = template
            .replace("{vm}", vm)
            .replace("{boot}", &boot.to_string());
        Some(Self::new(PathBuf::from(path)))
    }

    /// A profile to be written to `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            started: Mutex::new(Instant::now()),
            samples: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Times samples from now (the vCPUs' start).
    pub fn start(&self) {
        *lock(&self.started) = Instant::now();
        lock(&self.samples).clear();
        self.dropped.store(0, Ordering::Relaxed);
    }

    /// Records where `vcpu` is.
    pub fn record(&self, vcpu: u8, rip: u64, mode: Mode) {
        let ms = lock(&self.started).elapsed().as_millis();
        let mut samples = lock(&self.samples);
        if samples.len() >= MAX_SAMPLES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        samples.push(Sample {
            ms: u32::try_from(ms).unwrap_or(u32::MAX),
            vcpu,
            rip,
            mode,
        });
    }

    /// How many samples are kept.
    pub fn len(&self) -> usize {
        lock(&self.samples).len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether no more will be kept (the runner then stops kicking).
    pub fn is_full(&self) -> bool {
        self.len() >= MAX_SAMPLES
    }

    /// Samples not kept because [`MAX_SAMPLES`] were.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).clone()
    }

    /// Where the samples go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the samples, one `ms vcpu rip k|u|v` line each.
    pub fn write(&self) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&self.path)?);
        for s in lock(&self.samples).iter() {
            writeln!(out, "{}", s.to_line())?;
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
    fn a_sample_line_reads_back_as_the_sample() {
        for mode in [Mode::Kernel, Mode::User, Mode::Vmm] {
            let s = Sample {
                ms: 1234,
                vcpu: 1,
                rip: 0xffff_ffff_8100_0abc,
                mode,
            };
            let line = s.to_line();
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(Sample::from_fields([f[0], f[1], f[2], f[3]]), Some(s));
        }
        assert_eq!(Sample::from_fields(["1", "0", "0x10", "x"]), None);
        assert_eq!(Sample::from_fields(["1", "300", "0x10", "k"]), None);
        assert_eq!(Sample::from_fields(["1", "0", "zz", "k"]), None);
    }

    #[test]
    fn samples_are_written_in_order_as_ms_vcpu_rip_mode_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = GuestProfile::new(dir.path().join("prof"));
        p.record(0, 0xffff_ffff_8100_0000, Mode::Kernel);
        std::thread::sleep(Duration::from_millis(5));
        p.record(1, 0x1234, Mode::User);
        p.record(1, 0, Mode::Vmm);
        p.write().unwrap();
        let text = std::fs::read_to_string(p.path()).unwrap();
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0][1..], ["0", "0xffffffff81000000", "k"]);
        assert_eq!(lines[1][1..], ["1", "0x1234", "u"]);
        assert_eq!(lines[2][1..], ["1", "0x0", "v"]);
        let t0: u32 = lines[0][0].parse().unwrap();
        let t1: u32 = lines[1][0].parse().unwrap();
        assert!(t1 >= t0 + 5, "{t0} then {t1}");
        // A new run starts from nothing.
        p.start();
        assert!(p.samples().is_empty());
    }

    #[test]
    fn the_file_name_may_carry_the_vm_and_the_boot() {
        let template = |t: &str| Some(t.to_string());
        let p = GuestProfile::from_template(template("/tmp/p-{vm}-{boot}.txt"), "service", 2);
        assert_eq!(p.unwrap().path(), Path::new("/tmp/p-service-2.txt"));
        let p = GuestProfile::from_template(template("/tmp/p.txt"), "service", 2);
        assert_eq!(p.unwrap().path(), Path::new("/tmp/p.txt"));
        assert!(GuestProfile::from_template(template(""), "service", 1).is_none());
        assert!(GuestProfile::from_template(None, "service", 1).is_none());
    }

    #[test]
    fn a_profile_left_on_stops_growing_at_its_cap() {
        let p = GuestProfile::new("/nonexistent/unused".into());
        for i in 0..MAX_SAMPLES as u64 {
            assert!(!p.is_full());
            p.record(0, i, Mode::Kernel);
        }
        assert!(p.is_full());
        for i in 0..10 {
            p.record(0, i, Mode::Kernel);
        }
        assert_eq!(p.len(), MAX_SAMPLES);
        assert_eq!(p.samples().last().unwrap().rip, MAX_SAMPLES as u64 - 1);
        assert_eq!(p.dropped(), 10);
    }
}
