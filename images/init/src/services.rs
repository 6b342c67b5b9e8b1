//! The supervised programs of a guest: started in order (a program can wait
//! for another's socket), restarted with backoff when they die, their output
//! kept in `/var/log/NAME.log` (rotated at [`LOG_ROTATE_BYTES`]) and, with
//! `p2pvm.log=console`, copied to the console line by line. The console
//! shell is one of them, on the serial line instead of a log.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::say;

/// A log is moved to `NAME.log.1` when it reaches this size.
pub const LOG_ROTATE_BYTES: u64 = 4 << 20;
/// A program that ran this long before dying starts again without delay.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// The longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where a program's standard streams go.
#[derive(Debug, Clone)]
pub enum Io {
    /// To `/var/log/NAME.log` (and the console with `p2pvm.log=console`).
    Logged,
    /// To and from a terminal, which becomes its controlling terminal.
    Terminal(PathBuf),
}

/// One supervised program.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name, for logs.
    pub name: &'static str,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// A socket whose appearance means "ready".
    pub ready: Option<PathBuf>,
    /// Start only once this program is ready, or after the given wait.
    pub after: Option<(&'static str, Duration)>,
    /// Standard streams.
    pub io: Io,
}

/// The delay before restart number `failures` (1, 2, 4, ... seconds, at most 30).
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(5);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// The failure count after an exit of a program that ran for `ran`.
pub fn failures_after_exit(failures: u32, ran: Duration) -> u32 {
    if ran >= HEALTHY_RUN {
        1
    } else {
        failures.saturating_add(1)
    }
}

#[derive(Debug)]
enum State {
    /// Not started yet (waiting for a dependency).
    Pending {
        since: Instant,
    },
    Running {
        pid: Pid,
        started: Instant,
    },
    Backoff {
        until: Instant,
    },
    Stopped,
}

struct Log {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    partial: Vec<u8>,
}

struct Service {
    spec: Spec,
    state: State,
    failures: u32,
    ready_said: bool,
    output: Option<OwnedFd>,
    log: Log,
}

/// All supervised programs of this guest.
pub struct Supervisor {
    services: Vec<Service>,
    to_console: bool,
}

impl Supervisor {
    /// Programs in start order.
    pub fn new(specs: Vec<Spec>, to_console: bool) -> Self {
        let now = Instant::now();
        let services = specs
            .into_iter()
            .map(|spec| Service {
                log: Log {
                    path: PathBuf::from(format!("/var/log/{}.log", spec.name)),
                    file: None,
                    written: 0,
                    partial: Vec::new(),
                },
                spec,
                state: State::Pending { since: now },
                failures: 0,
                ready_said: false,
                output: None,
            })
            .collect();
        Self {
            services,
            to_console,
        }
    }

    fn is_ready(&self, name: &str) -> bool {
        self.services.iter().any(|s| {
            s.spec.name == name
                && matches!(s.state, State::Running { .. })
                && s.spec.ready.as_ref().is_none_or(|p| p.exists())
        })
    }

    /// Starts what is due, and reports programs that became ready.
    pub fn tick(&mut self, now: Instant) {
        for i in 0..self.services.len() {
            let due = match self.services[i].state {
                State::Pending { since } => match self.services[i].spec.after {
                    None => true,
                    Some((dep, wait)) => {
                        let ready = self.is_ready(dep);
                        if !ready && now >= since + wait {
                            say!(
                                "{} did not get ready in {} s: starting {} anyway",
                                dep,
                                wait.as_secs(),
                                self.services[i].spec.name
                            );
                        }
                        ready || now >= since + wait
                    }
                },
                State::Backoff { until } => now >= until,
                _ => false,
            };
            let svc = &mut self.services[i];
            if due {
                svc.start(now);
            }
            if let (State::Running { started, .. }, Some(sock), false) =
                (&svc.state, &svc.spec.ready, svc.ready_said)
                && sock.exists()
            {
                svc.ready_said = true;
                say!(
                    "{} is up ({}) after {:.1} s, {:.2} s since boot",
                    svc.spec.name,
                    sock.display(),
                    started.elapsed().as_secs_f64(),
                    crate::system::uptime()
                );
            }
        }
    }

    /// Handles the end of a child; `false` if it is none of ours.
    pub fn exited(&mut self, pid: Pid, how: &str, now: Instant) -> bool {
        let Some(svc) = self
            .services
            .iter_mut()
            .find(|s| matches!(s.state, State::Running { pid: p, .. } if p == pid))
        else {
            return false;
        };
        let State::Running { started, .. } = svc.state else {
            unreachable!()
        };
        svc.drain(self.to_console);
        svc.output = None;
        svc.failures = failures_after_exit(svc.failures, now - started);
        let delay = match svc.spec.io {
            // The operator's shell comes back at once after an `exit`; one
            // that cannot start backs off like the rest.
            Io::Terminal(_) if now - started > Duration::from_secs(2) => Duration::from_millis(200),
            _ => backoff(svc.failures),
        };
        if matches!(svc.spec.io, Io::Logged) {
            say!(
                "{} {how}: restarting in {} s",
                svc.spec.name,
                delay.as_secs_f64()
            );
        }
        svc.ready_said = false;
        if let Some(sock) = &svc.spec.ready {
            // A stale socket must not look like readiness.
            let _ = std::fs::remove_file(sock);
        }
        svc.state = State::Backoff { until: now + delay };
        true
    }

    /// File descriptors carrying the programs' output, with their indexes.
    pub fn output_fds(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        self.services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.output.as_ref()?.as_fd())))
            .collect()
    }

    /// Reads what program `index` wrote.
    pub fn drain(&mut self, index: usize) {
        let to_console = self.to_console;
        if let Some(s) = self.services.get_mut(index) {
            s.drain(to_console);
        }
    }

    /// Stops every program (`SIGTERM` in reverse start order, `SIGKILL`
    /// after `grace`), reaping them.
    pub fn stop_all(&mut self, grace: Duration) {
        let mut running: Vec<Pid> = Vec::new();
        for s in self.services.iter_mut().rev() {
            if let State::Running { pid, .. } = s.state {
                let _ = kill(pid, Signal::SIGTERM);
                running.push(pid);
            }
            s.state = State::Stopped;
        }
        let deadline = Instant::now() + grace;
        while !running.is_empty() && Instant::now() < deadline {
            for i in 0..self.services.len() {
                self.drain(i);
            }
            running.retain(|pid| {
                !matches!(
                    nix::sys::wait::waitpid(*pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
                    Ok(nix::sys::wait::WaitStatus::Exited(..)
                        | nix::sys::wait::WaitStatus::Signaled(..))
                        | Err(_)
                )
            });
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in running {
            say!("pid {pid} did not stop in {} s: killed", grace.as_secs());
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

impl Service {
    fn start(&mut self, now: Instant) {
        if let Some(sock) = &self.spec.ready {
            // A socket left on the store by the last boot must not look like
            // readiness.
            let _ = std::fs::remove_file(sock);
        }
        let mut cmd = Command::new(&self.spec.argv[0]);
        cmd.args(&self.spec.argv[1..])
            .envs(self.spec.env.iter().cloned());
        let output = match &self.spec.io {
            Io::Terminal(tty) => {
                match File::options().read(true).write(true).open(tty) {
                    Ok(t) => {
                        let (a, b) = (t.try_clone(), t.try_clone());
                        match (a, b) {
                            (Ok(a), Ok(b)) => {
                                cmd.stdin(t).stdout(a).stderr(b);
                            }
                            _ => return self.failed_to_start(now, "cannot duplicate the terminal"),
                        }
                    }
                    Err(e) => {
                        return self
                            .failed_to_start(now, &format!("cannot open {}: {e}", tty.display()));
                    }
                }
                None
            }
            Io::Logged => match nix::unistd::pipe() {
                Ok((read, write)) => {
                    let _ = fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
                    let Ok(write2) = write.try_clone() else {
                        return self.failed_to_start(now, "cannot duplicate a pipe");
                    };
                    cmd.stdin(Stdio::null()).stdout(write).stderr(write2);
                    Some(read)
                }
                Err(e) => return self.failed_to_start(now, &format!("pipe: {e}")),
            },
        };
        match cmd.spawn() {
            Ok(child) => {
                let pid = Pid::from_raw(child.id() as i32);
                // Reaped by init's SIGCHLD loop, not through `child`.
                drop(child);
                self.output = output;
                self.state = State::Running { pid, started: now };
            }
            Err(e) => {
                self.failed_to_start(now, &format!("cannot start {}: {e}", self.spec.argv[0]))
            }
        }
    }

    fn failed_to_start(&mut self, now: Instant, why: &str) {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff(self.failures);
        say!(
            "{}: {why}; trying again in {} s",
            self.spec.name,
            delay.as_secs()
        );
        self.state = State::Backoff { until: now + delay };
    }

    fn drain(&mut self, to_console: bool) {
        let Some(fd) = &self.output else {
            return;
        };
        let mut buf = [0u8; 16 << 10];
        loop {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.log.write(&buf[..n]);
                    if to_console {
                        self.log.partial.extend_from_slice(&buf[..n]);
                        while let Some(end) = self.log.partial.iter().position(|&b| b == b'\n') {
                            // One write per line: the console is shared with
                            // the operator's shell, and a line written in pieces
                            // lets its output land inside ours.
                            let mut line = format!("[{}] ", self.spec.name).into_bytes();
                            line.extend(self.log.partial.drain(..=end));
                            let _ = std::io::stderr().lock().write_all(&line);
                        }
                        if self.log.partial.len() > 4096 {
                            self.log.partial.clear();
                        }
                    }
                }
            }
        }
    }
}

impl Log {
    fn write(&mut self, bytes: &[u8]) {
        if self.written >= LOG_ROTATE_BYTES {
            self.file = None;
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            self.written = 0;
        }
        if self.file.is_none() {
            self.file = File::options()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        if let Some(f) = &mut self.file
            && f.write_all(bytes).is_ok()
        {
            self.written += bytes.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_healthy_run_resets_the_count() {
        assert_eq!(failures_after_exit(5, Duration::from_secs(3)), 6);
        assert_eq!(failures_after_exit(5, Duration::from_secs(61)), 1);
    }

    #[test]
    fn rotation_keeps_one_old_log() {
        let dir = std::env::temp_dir().join(format!("p2pvm-init-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = Log {
            path: dir.join("x.log"),
            file: None,
            written: 0,
            partial: Vec::new(),
        };
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..5 {
            log.write(&chunk);
        }
        log.write(b"tail");
        assert_eq!(
            std::fs::metadata(dir.join("x.log.1")).unwrap().len(),
            4 << 20
        );
        assert_eq!(
            std::fs::metadata(dir.join("x.log")).unwrap().len(),
            (1 << 20) + 4
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
