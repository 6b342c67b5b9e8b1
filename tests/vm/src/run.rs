//! Running a test host and watching its console.
//!
//! * [`RunnerKind::Nested`] boots L1 under QEMU's emulator with emulated AMD SVM
//!   (`-machine q35 -accel tcg -cpu qemu64,+svm,+npt`); its serial console is QEMU's stdout.
//! * [`RunnerKind::Direct`] runs the same L1 script with `sh` on this host, when the host has
//!   hardware KVM (`/dev/kvm`, a `vmx`/`svm` CPU flag, and not the PVM software hypervisor).
//!
//! Both are supervised the same way: stdout and stderr are read line by line on two threads,
//! cleaned, logged as they arrive (tracing target `p2pvm_testhost::console`) and parsed; a
//! watchdog kills the run when the total time limit passes or no line came for the silence
//! limit, and reports a [`WatchdogError`] with the last console lines.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::console::{Outcome, Transcript, clean_line};

/// Environment variable forcing a runner: `nested`, `direct` or `auto` (the default).
pub const RUNNER_ENV: &str = "P2PVM_TESTHOST_RUNNER";
/// Added to the test host kernel's command line (nested runner).
pub const CMDLINE_ENV: &str = "P2PVM_TESTHOST_CMDLINE";
/// Where the nested runner opens QEMU's monitor socket, if set.
pub const MONITOR_ENV: &str = "P2PVM_TESTHOST_MONITOR";
/// Overrides the nested runner's `-accel` options (default `tcg`).
pub const ACCEL_ENV: &str = "P2PVM_TESTHOST_ACCEL";
/// Overrides the test host's CPU count (the scenario's `smp`), for
/// measuring what the emulator does with more or fewer CPUs.
pub const SMP_ENV: &str = "P2PVM_TESTHOST_SMP";
/// Overrides the nested runner's emulated CPU model (`-cpu`, default
/// `qemu64,+svm,+npt`).
pub const CPU_ENV: &str = "P2PVM_TESTHOST_CPU";

/// How a scenario's L1 script is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerKind {
    /// Inside an L1 Linux booted by QEMU TCG with emulated SVM (works on any host).
    Nested,
    /// Directly on this host, which has hardware virtualization.
    Direct,
}

impl fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nested => "nested",
            Self::Direct => "direct",
        })
    }
}

impl RunnerKind {
    /// Chooses the runner (honouring `P2PVM_TESTHOST_RUNNER`) and says why.
    pub fn detect() -> Result<(Self, String)> {
        let forced = std::env::var(RUNNER_ENV).unwrap_or_default();
        match forced.trim() {
            "nested" => return Ok((Self::Nested, format!("{RUNNER_ENV}=nested"))),
            "direct" => return Ok((Self::Direct, format!("{RUNNER_ENV}=direct"))),
            "" | "auto" => {}
            other => bail!("{RUNNER_ENV}={other}: expected nested, direct or auto"),
        }
        Ok(match hardware_kvm() {
            Ok(why) => (Self::Direct, why),
            Err(why) => (Self::Nested, why),
        })
    }
}

/// `Ok(description)` when this host's `/dev/kvm` is hardware KVM, else `Err(reason)`.
fn hardware_kvm() -> std::result::Result<String, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("this host has no /dev/kvm".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "/dev/kvm here is the PVM software hypervisor (kvm_pvm), which cannot run Linux guests"
                .into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    match flags
        .split_whitespace()
        .find(|f| *f == "vmx" || *f == "svm")
    {
        Some(flag) => Ok(format!(
            "this host has hardware KVM (/dev/kvm, CPU flag {flag})"
        )),
        None => Err("the CPU shows neither vmx nor svm".into()),
    }
}

/// The watchdog's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest whole run.
    pub total: Duration,
    /// Longest time without a console line.
    pub silence: Duration,
}

/// Which watchdog limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The total time limit.
    Total,
    /// The silence limit (no console line).
    Silence,
    /// The test host's own kernel reported a CPU stall: under QEMU's
    /// emulator one of its CPUs stopped and does not come back.
    HostStall,
}

/// Whether `line` is the test host's kernel (not a guest's, whose console
/// lines carry a `[name]` prefix) reporting an RCU stall: a CPU of the test
/// host itself stopped. Processes cannot cause that; its emulator can.
pub fn is_host_stall(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let Some((stamp, msg)) = rest.split_once("] ") else {
        return false;
    };
    stamp.trim().parse::<f64>().is_ok()
        && msg.starts_with("rcu: INFO: rcu_")
        && msg.contains("detected stalls")
}

/// The run was killed by the watchdog.
#[derive(Debug, Clone)]
pub struct WatchdogError {
    /// The scenario's name.
    pub scenario: String,
    /// The limit hit.
    pub limit: Limit,
    /// Its value.
    pub limit_value: Duration,
    /// Time since the start when the run was killed.
    pub elapsed: Duration,
    /// The last console lines.
    pub tail: String,
}

impl fmt::Display for WatchdogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.limit {
            Limit::Total => format!(
                "total time limit of {} s reached",
                self.limit_value.as_secs_f64()
            ),
            Limit::Silence => format!(
                "silence limit hit: no console line for {} s",
                self.limit_value.as_secs_f64()
            ),
            Limit::HostStall => "the test host's kernel reported a CPU stall".to_string(),
        };
        write!(
            f,
            "watchdog: scenario `{}`: {what}; killed after {:.1} s. Last console lines:\n{}",
            self.scenario,
            self.elapsed.as_secs_f64(),
            self.tail
        )
    }
}

impl std::error::Error for WatchdogError {}

/// The test host stopped without reporting its script's exit status: its
/// kernel panicked, it crashed or reset (under QEMU's emulator, a silent
/// reset of the whole test host has been seen), or the script ended early.
#[derive(Debug, Clone)]
pub struct HostDied {
    /// The scenario's name.
    pub scenario: String,
    /// How the test host's process ended.
    pub status: String,
    /// Time since the start.
    pub elapsed: Duration,
    /// The last console lines.
    pub tail: String,
}

impl fmt::Display for HostDied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scenario `{}`: the test host ended ({}) after {:.1} s without reporting the L1 \
             script's exit status (no P2PVM-EXIT line: kernel panic, crash or early exit?). \
             Last console lines:\n{}",
            self.scenario,
            self.status,
            self.elapsed.as_secs_f64(),
            self.tail
        )
    }
}

impl std::error::Error for HostDied {}

/// The test host kernel's command line; `P2PVM_TESTHOST_CMDLINE` adds to it
/// (e.g. `kvm.tdp_mmu=0` or `kvm_amd.npt=0`, which reach KVM's modules when
/// the test host loads them).
fn l1_cmdline() -> String {
    let mut line = "console=ttyS0 panic=-1 quiet".to_owned();
    if let Ok(extra) = std::env::var(CMDLINE_ENV) {
        line.push(' ');
        line.push_str(&extra);
    }
    line
}

/// The L1 QEMU command line (`-smp` and `-m` from the scenario).
pub(crate) fn nested_command(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    smp: u32,
    mem_mib: u32,
) -> Command {
    // `P2PVM_TESTHOST_ACCEL` replaces the accelerator's options, e.g.
    // `tcg,thread=single` to run the test host's CPUs on one emulator
    // thread (for chasing emulator faults).
    let accel = std::env::var(ACCEL_ENV).unwrap_or_else(|_| "tcg".to_owned());
    let cpu = std::env::var(CPU_ENV).unwrap_or_else(|_| "qemu64,+svm,+npt".to_owned());
    let smp = std::env::var(SMP_ENV)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(smp);
    let mut cmd = Command::new(qemu);
    cmd.args(["-machine", "q35", "-accel", &accel, "-cpu", &cpu])
        .args(["-m", &mem_mib.to_string(), "-smp", &smp.to_string()])
        .args([
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(l1_cmdline());
    // `P2PVM_TESTHOST_MONITOR=PATH` opens QEMU's human monitor on a Unix
    // socket there, to look at a test host that froze (`info lapic`,
    // `info registers`) while it is still frozen.
    if let Ok(path) = std::env::var(MONITOR_ENV) {
        cmd.arg("-monitor")
            .arg(format!("unix:{path},server=on,wait=off"));
    }
    cmd
}

enum Event {
    Line(Vec<u8>, bool),
    Eof,
}

/// Kills the child (or its whole process group) unless it was reaped.
struct ChildGuard {
    child: Child,
    group: bool,
    reaped: bool,
}

impl ChildGuard {
    fn kill(&mut self) {
        self.kill_group();
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    fn wait(&mut self) -> Result<ExitStatus> {
        let status = self.child.wait()?;
        self.reaped = true;
        // Leftovers of a script (background jobs) go with it.
        self.kill_group();
        Ok(status)
    }

    fn kill_group(&self) {
        use nix::sys::signal::{Signal, killpg};
        if self.group
            && let Ok(pid) = i32::try_from(self.child.id())
        {
            let _ = killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
        }
    }
}

fn read_lines(stream: impl Read + Send + 'static, stderr: bool, tx: mpsc::SyncSender<Event>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    if tx.send(Event::Line(buf.clone(), stderr)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Event::Eof);
    });
}

/// Runs `cmd` under the watchdog and turns its console into an [`Outcome`].
/// `new_group` puts the child in its own process group, killed as a whole.
pub(crate) fn supervise(
    mut cmd: Command,
    new_group: bool,
    runner: RunnerKind,
    name: &str,
    limits: Limits,
) -> Result<Outcome> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if new_group {
        cmd.process_group(0);
    }
    tracing::debug!("{name}: running {cmd:?}");
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let mut guard = ChildGuard {
        child,
        group: new_group,
        reaped: false,
    };
    // Bounded: a chatty child waits for the watchdog to read its lines.
    let (tx, rx) = mpsc::sync_channel(4096);
    read_lines(
        guard.child.stdout.take().context("no stdout")?,
        false,
        tx.clone(),
    );
    read_lines(guard.child.stderr.take().context("no stderr")?, true, tx);

    let mut transcript = Transcript::default();
    let mut open = 2;
    let mut last_line = started;
    while open > 0 {
        let now = Instant::now();
        let total_end = started + limits.total;
        let silence_end = last_line + limits.silence;
        let fired = if now >= total_end {
            Some((Limit::Total, limits.total))
        } else if now >= silence_end {
            Some((Limit::Silence, limits.silence))
        } else {
            None
        };
        if let Some((limit, limit_value)) = fired {
            guard.kill();
            return Err(WatchdogError {
                scenario: name.to_string(),
                limit,
                limit_value,
                elapsed: started.elapsed(),
                tail: transcript.tail_text(),
            }
            .into());
        }
        match rx.recv_timeout(total_end.min(silence_end) - now) {
            Ok(Event::Line(raw, stderr)) => {
                last_line = Instant::now();
                let line = clean_line(&raw);
                if stderr {
                    tracing::info!(target: "p2pvm_testhost::console", "{name}! {line}");
                } else {
                    tracing::info!(target: "p2pvm_testhost::console", "{name}| {line}");
                }
                transcript.push(&line, stderr);
                if !stderr && is_host_stall(&line) {
                    guard.kill();
                    return Err(WatchdogError {
                        scenario: name.to_string(),
                        limit: Limit::HostStall,
                        limit_value: Duration::ZERO,
                        elapsed: started.elapsed(),
                        tail: transcript.tail_text(),
                    }
                    .into());
                }
            }
            Ok(Event::Eof) => open -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = guard.wait()?;
    let wall = started.elapsed();
    let Some(exit_status) = transcript.exit_status else {
        return Err(HostDied {
            scenario: name.to_string(),
            status: status.to_string(),
            elapsed: wall,
            tail: transcript.tail_text(),
        }
        .into());
    };
    if runner == RunnerKind::Nested && !status.success() {
        tracing::warn!("{name}: QEMU exited with {status}");
    }
    Ok(Outcome {
        runner,
        exit_status,
        results: transcript.results,
        l1_ready: transcript.l1_ready,
        warnings: transcript.warnings,
        console: transcript.console,
        wall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    const LIMITS: Limits = Limits {
        total: Duration::from_secs(20),
        silence: Duration::from_secs(10),
    };

    #[test]
    fn collects_results_and_exit() {
        let out = supervise(
            sh("printf 'P2PVM-L1-READY kvm=no\\r\\nP2PVM-RESULT a=1\\n'; echo oops >&2; echo 'P2PVM-EXIT status=4'"),
            true,
            RunnerKind::Direct,
            "t",
            LIMITS,
        )
        .unwrap();
        assert_eq!(out.exit_status, 4);
        assert_eq!(out.result("a"), Some("1"));
        assert!(!out.l1_ready.unwrap().kvm);
        assert!(out.console.contains("[stderr] oops"));
    }

    #[test]
    fn missing_exit_line_is_an_error() {
        let err = supervise(
            sh("echo booting; exit 0"),
            false,
            RunnerKind::Nested,
            "t",
            LIMITS,
        )
        .unwrap_err();
        assert!(err.to_string().contains("booting"), "{err}");
    }

    #[test]
    fn only_the_test_hosts_own_rcu_stalls_count() {
        assert!(is_host_stall(
            "[  156.270639] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"
        ));
        assert!(is_host_stall(
            "[5.1] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:"
        ));
        // A guest's stall is the platform's business: the test judges it.
        assert!(!is_host_stall(
            "[client] [  12.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"
        ));
        assert!(!is_host_stall("[  156.27] rcu: 	0-...0: (4 ticks this GP)"));
        assert!(!is_host_stall("rcu: INFO: rcu_preempt detected stalls"));
    }

    #[test]
    fn a_host_stall_line_stops_the_run_at_once() {
        let limits = Limits {
            total: Duration::from_secs(30),
            silence: Duration::from_secs(30),
        };
        let started = Instant::now();
        let err = supervise(
            sh("echo '[  9.5] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:'; sleep 30"),
            true,
            RunnerKind::Direct,
            "stalled",
            limits,
        )
        .unwrap_err();
        let wd = err.downcast_ref::<WatchdogError>().expect("watchdog error");
        assert_eq!(wd.limit, Limit::HostStall);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn silence_and_total_limits() {
        let limits = Limits {
            total: Duration::from_secs(30),
            silence: Duration::from_millis(300),
        };
        let started = Instant::now();
        let err = supervise(
            sh("echo one; sleep 30"),
            true,
            RunnerKind::Direct,
            "quiet",
            limits,
        )
        .unwrap_err();
        let wd = err.downcast_ref::<WatchdogError>().expect("watchdog error");
        assert_eq!(wd.limit, Limit::Silence);
        assert_eq!(wd.tail, "one");
        assert!(started.elapsed() < Duration::from_secs(5));

        let limits = Limits {
            total: Duration::from_millis(500),
            silence: Duration::from_secs(30),
        };
        let err = supervise(
            sh("while :; do echo tick; sleep 0.05; done"),
            true,
            RunnerKind::Direct,
            "chatty",
            limits,
        )
        .unwrap_err();
        let wd = err.downcast_ref::<WatchdogError>().expect("watchdog error");
        assert_eq!(wd.limit, Limit::Total);
        assert!(err.to_string().contains("total time limit"));
    }
}
