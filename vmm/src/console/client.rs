//! `p2pvmm console NAME`: attaches the terminal to a VM's console socket.
//!
//! On a terminal: raw mode, keystrokes go to the guest as typed, `Ctrl-]`
//! detaches (the VM keeps running). With stdin from a pipe: what the pipe
//! holds is typed, and after its end the client keeps printing the guest's
//! output until the guest has been quiet for `linger`.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, SetArg, Termios};

/// The byte `Ctrl-]` sends: the detach key (telnet's and virsh's).
const DETACH: u8 = 0x1d;

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The operator detached (or the input ended and the guest went quiet).
    Detached,
    /// The VM closed the console (it stopped).
    Closed,
}

/// Restores the terminal's mode when dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> io::Result<Option<Self>> {
        let stdin = io::stdin();
        if !nix::unistd::isatty(stdin.as_fd()).unwrap_or(false) {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd()).map_err(io::Error::from)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).map_err(io::Error::from)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Attaches to the console socket at `path` until detached or closed.
pub fn attach(path: &Path, linger: Duration) -> io::Result<Ended> {
    let mut sock = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach the console at {} ({e}); is the VM running?",
                path.display()
            ),
        )
    })?;
    let raw = RawMode::enter()?;
    if raw.is_some() {
        eprint!("p2pvmm: attached; Ctrl-] detaches\r\n");
    }
    let mut stdin = io::stdin();
    let mut stdout = io::stdout();
    let mut stdin_open = true;
    let mut quiet_since = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let timeout = if stdin_open {
            PollTimeout::NONE
        } else {
            let left = linger.saturating_sub(quiet_since.elapsed());
            if left.is_zero() {
                return Ok(Ended::Detached);
            }
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX)
        };
        let stdin_fd = stdin.as_fd();
        let mut fds = vec![PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin_fd, PollFlags::POLLIN));
        }
        poll(&mut fds, timeout).map_err(io::Error::from)?;
        let sock_ready = fds[0].any().unwrap_or(false);
        let stdin_ready = stdin_open && fds.get(1).and_then(|f| f.any()).unwrap_or(false);
        drop(fds);
        if sock_ready {
            let n = sock.read(&mut buf)?;
            if n == 0 {
                drop(raw);
                eprintln!("\np2pvmm: the VM closed its console");
                return Ok(Ended::Closed);
            }
            stdout.write_all(&buf[..n])?;
            stdout.flush()?;
            quiet_since = Instant::now();
        }
        if stdin_ready {
            let n = stdin.read(&mut buf)?;
            if n == 0 {
                stdin_open = false;
                quiet_since = Instant::now();
                continue;
            }
            let typed = &buf[..n];
            if raw.is_some()
                && let Some(at) = typed.iter().position(|b| *b == DETACH)
            {
                sock.write_all(&typed[..at])?;
                drop(raw);
                eprintln!("\np2pvmm: detached (the VM keeps running)");
                return Ok(Ended::Detached);
            }
            sock.write_all(typed)?;
        }
    }
}
