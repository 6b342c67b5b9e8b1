//! Running a built machine: a thread per vCPU, one device thread for the
//! event loop, and the calling thread waiting for the run to end, then
//! stopping everything it started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use crate::builder::Machine;
use crate::lifecycle::ExitReason;
use crate::vstate::vcpu::kick_signal;

/// Set by the VMM's SIGTERM/SIGINT handler.
pub static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Event-loop turns after the run ended (accept, attach, flush).
const FINAL_TURNS: usize = 4;

/// How often the device thread looks at the exit flag while idle.
const DEVICE_POLL_MS: i32 = 50;

/// What a run gives back.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Why it ended.
    pub reason: ExitReason,
    /// How long it ran.
    pub ran: Duration,
    /// Largest resident memory of this process beyond guest RAM seen during
    /// the run, in KiB (VmRSS minus the shared memory that is guest RAM).
    pub max_overhead_kib: u64,
}

/// This process's resident memory beyond guest RAM, in KiB: the resident
/// set of every mapping but the guest RAM memfd's. (Not `VmRSS - RssShmem`:
/// where the binary itself lives on tmpfs, as in an initramfs, its pages are
/// shared memory too.)
pub fn rss_overhead_kib() -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut total = 0u64;
    let mut guest = false;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            if !guest {
                total += kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        } else if line.split_whitespace().next().is_some_and(|w| {
            w.contains('-') && w.chars().next().is_some_and(|c| c.is_ascii_hexdigit())
        }) {
            // A mapping's header line: "start-end perms offset dev inode [path]".
            guest = line.contains(crate::vstate::memory::MEMFD_NAME);
        }
    }
    Some(total)
}

/// An error with its causes, for a one-line report.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// How often the resident memory is sampled while a VM runs.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(500);

use crate::metrics::{FigureSink, Figures};

// The per-thread confinement hook lives with the filters it installs.
pub use crate::seccomp::{NoSetup, ThreadSetup};

/// Runs `machine` until the guest powers off, resets, panics, the host asks
/// it to stop, or something fails.
/// `layout_report` gets the memory slots' layout when it changes;
/// `figures`, the VM's figures every half second (`crate::metrics`).
pub fn run(
    machine: Machine,
    setup: std::sync::Arc<dyn ThreadSetup>,
    layout_report: Option<&std::path::Path>,
    figures: Option<&FigureSink>,
) -> std::io::Result<RunOutcome> {
    let started = Instant::now();
    let Machine {
        vm,
        ram,
        vcpus,
        mut events,
        exit,
        counts,
        devices,
        boot,
        profile,
        ..
    } = machine;
    boot.vcpus_started();
    if let Some(p) = &profile {
        p.start();
    }

    let mut vcpu_threads: Vec<JoinHandle<()>> = Vec::new();
    for vcpu in vcpus {
        let setup = setup.clone();
        let exit = exit.clone();
        let name = format!("vcpu{}", vcpu.id());
        vcpu_threads.push(std::thread::Builder::new().name(name).spawn(move || {
            if let Err(e) = setup.vcpu() {
                exit.request(ExitReason::Error(format!(
                    "vCPU thread setup: {}",
                    chain(&e)
                )));
                return;
            }
            vcpu.run();
        })?);
    }
    let dev_exit = exit.clone();
    let dev_setup = setup.clone();
    let device_thread = std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            if let Err(e) = dev_setup.device() {
                dev_exit.request(ExitReason::Error(format!(
                    "device thread setup: {}",
                    chain(&e)
                )));
                return;
            }
            while !dev_exit.stopping() {
                if let Err(e) = events.run_with_timeout(DEVICE_POLL_MS) {
                    dev_exit.request(ExitReason::Error(format!("device event loop: {e:?}")));
                }
            }
            // A last few turns without waiting: a console client that
            // connected just before the end is accepted and gets the guest's
            // last words.
            for _ in 0..FINAL_TURNS {
                let _ = events.run_with_timeout(0);
            }
        })?;

    // Wait for the end: a request from any thread, or a signal.
    let mut max_overhead_kib = 0;
    let mut sampled = Instant::now() - RSS_SAMPLE_EVERY;
    let mut reported = Vec::new();
    while !exit.stopping() {
        if sampled.elapsed() >= RSS_SAMPLE_EVERY {
            max_overhead_kib = max_overhead_kib.max(rss_overhead_kib().unwrap_or(0));
            sampled = Instant::now();
            if let Some(sink) = figures {
                let f = Figures {
                    boots: sink.boots,
                    exits: counts
                        .by_reason()
                        .iter()
                        .map(|(r, n)| (r.to_string(), *n))
                        .collect(),
                    devices: devices.iter().map(|(name, d)| d.figures(name)).collect(),
                    guest_memory_bytes: sink.guest_memory_bytes,
                    vmm_overhead_bytes: max_overhead_kib * 1024,
                    uptime_secs: started.elapsed().as_secs(),
                };
                if let Err(e) = f.write(&sink.path) {
                    crate::warn_limited!("writing {}: {e}", sink.path.display());
                }
            }
            if let Some(path) = layout_report {
                // Slots change when the guest moves a BAR: report each layout.
                let slots = vm.memory_slots();
                if slots != reported {
                    if let Err(e) = crate::vstate::slots::write(&slots, path) {
                        tracing::warn!("writing {}: {e}", path.display());
                    }
                    reported = slots;
                }
            }
        }
        if STOP_REQUESTED.load(Ordering::Relaxed) {
            exit.request(ExitReason::Stopped);
            break;
        }
        let period = match profile {
            Some(_) => crate::vstate::profile::PERIOD,
            None => Duration::from_millis(100),
        };
        exit.wait(period);
        // Each vCPU samples itself as the kick takes it out of KVM_RUN. A
        // full profile keeps no more, so it costs no more exits either.
        if let Some(p) = &profile
            && !p.is_full()
        {
            for t in &vcpu_threads {
                let _ = t.kill(kick_signal());
            }
        }
    }

    max_overhead_kib = max_overhead_kib.max(rss_overhead_kib().unwrap_or(0));
    // Kick vCPUs out of KVM_RUN until each has left.
    for t in &vcpu_threads {
        while !t.is_finished() {
            let _ = t.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for t in vcpu_threads {
        let _ = t.join();
    }
    let _ = device_thread.join();
    if let Some(p) = &profile {
        match p.write() {
            Ok(()) => tracing::info!(
                samples = p.len(),
                dropped = p.dropped(),
                file = %p.path().display(),
                "guest profile written"
            ),
            Err(e) => tracing::warn!("writing the guest profile {}: {e}", p.path().display()),
        }
    }
    // The VM fd goes before the memory it maps.
    drop(vm);
    drop(ram);
    Ok(RunOutcome {
        reason: exit.reason().unwrap_or(ExitReason::Stopped),
        ran: started.elapsed(),
        max_overhead_kib,
    })
}
