//! The host side of a VM's serial console: a Unix socket an operator
//! attaches to (`p2pvmm console NAME`), detaches from, and attaches to again
//! while the VM runs; a log file; and the client that attaches.
//!
//! ```text
//!  guest ttyS0 ─ 8250 (vCPU thread) ─► Console::write ─► backlog, log, attached client
//!  client socket ─► ConsoleServer (device thread) ─► 8250 receive FIFO ─► guest
//! ```
//!
//! Output never blocks a vCPU: bytes an attached client does not take at
//! once wait in a bounded buffer the device thread flushes. Input is read
//! only while the 8250's FIFO has room, so nothing typed is dropped, not
//! even by a client that leaves before a busy guest took its keystrokes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialDevice;
use crate::lifecycle::BootTimes;

/// Output kept for a client that attaches later (the prompt, recent boot
/// messages).
const BACKLOG_BYTES: usize = 16 << 10;
/// The console log stops growing here (a guest printing forever must not
/// fill the host's disk); later output still reaches attached clients.
const LOG_MAX_BYTES: u64 = 16 << 20;
/// Output waiting for a slow client; beyond it the oldest bytes are dropped
/// (a client that stops reading must not grow the VMM without bound).
const PENDING_MAX_BYTES: usize = 1 << 20;
/// Keystrokes a client sent before it left that the guest has not taken yet
/// are still typed, up to this much (`printf CMD | p2pvmm console` may end
/// before a busy guest reads its FIFO).
const LEFTOVER_INPUT_MAX_BYTES: usize = 64 << 10;

#[derive(Debug, Default)]
struct Inner {
    backlog: VecDeque<u8>,
    /// The attached client. Only the device thread drops it (after taking
    /// it out of its epoll set): an fd closed while registered would come
    /// back as the next client's fd and confuse the event loop.
    client: Option<UnixStream>,
    /// Writing to the client failed; it is dropped by the device thread.
    broken: bool,
    pending: VecDeque<u8>,
    log: Option<File>,
    /// Bytes written to the log so far.
    logged: u64,
    stdout: bool,
}

/// Where the guest's console output goes.
#[derive(Debug)]
pub struct Console {
    inner: Mutex<Inner>,
    /// Signalled when `pending` gained bytes, so the device thread waits for
    /// the client to become writable.
    pending_event: EventFd,
    /// The current boot's milestones (replaced at each reboot).
    boot: Mutex<Arc<BootTimes>>,
}

impl Console {
    /// A console that logs to `log` (if any) and copies to stdout if asked.
    pub fn new(log: Option<File>, stdout: bool, boot: Arc<BootTimes>) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                log,
                stdout,
                ..Default::default()
            }),
            pending_event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            boot: Mutex::new(boot),
        }))
    }

    /// Starts timing a new boot (after a guest reset).
    pub fn set_boot(&self, boot: Arc<BootTimes>) {
        *lock(&self.boot) = boot;
    }

    fn output(&self, bytes: &[u8]) {
        lock(&self.boot).first_output();
        let mut inner = lock(&self.inner);
        let i = &mut *inner;
        i.backlog.extend(bytes);
        let excess = i.backlog.len().saturating_sub(BACKLOG_BYTES);
        i.backlog.drain(..excess);
        if let Some(log) = &mut i.log {
            // A full disk must not stop the guest; the log is best effort.
            let room = LOG_MAX_BYTES.saturating_sub(i.logged);
            let n = (bytes.len() as u64).min(room) as usize;
            let _ = log.write_all(&bytes[..n]);
            i.logged += n as u64;
            if n < bytes.len() {
                let _ = log.write_all(
                    b"\n[p2pvmm: console log full; later output only on the console socket]\n",
                );
                i.log = None;
            }
        }
        if i.stdout {
            let _ = io::stdout().write_all(bytes);
            let _ = io::stdout().flush();
        }
        if i.client.is_none() || i.broken {
            return;
        }
        if i.pending.is_empty() {
            let written = match i.client.as_mut().map(|c| c.write(bytes)) {
                Some(Ok(n)) => n,
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => 0,
                _ => {
                    i.broken = true;
                    let _ = self.pending_event.write(1);
                    return;
                }
            };
            if written == bytes.len() {
                return;
            }
            i.pending.extend(&bytes[written..]);
        } else {
            i.pending.extend(bytes);
        }
        let excess = i.pending.len().saturating_sub(PENDING_MAX_BYTES);
        i.pending.drain(..excess);
        let _ = self.pending_event.write(1);
    }

    /// Attaches `client`, replaying the backlog first; refuses a second one.
    fn attach(&self, mut client: UnixStream) {
        let mut inner = lock(&self.inner);
        if inner.client.is_some() {
            let _ = client.write_all(b"\r\np2pvmm: the console is attached elsewhere\r\n");
            return;
        }
        if client.set_nonblocking(true).is_err() {
            return;
        }
        inner.pending = inner.backlog.clone();
        inner.client = Some(client);
        inner.broken = false;
        let _ = self.pending_event.write(1);
    }

    /// Drops the client; the caller took its fd out of the event loop first.
    fn detach(&self) {
        let mut inner = lock(&self.inner);
        inner.client = None;
        inner.broken = false;
        inner.pending.clear();
    }

    fn broken(&self) -> bool {
        lock(&self.inner).broken
    }

    /// Writes what is pending; `true` when everything went out.
    fn flush_pending(&self) -> bool {
        let mut inner = lock(&self.inner);
        let i = &mut *inner;
        let Some(client) = i.client.as_mut().filter(|_| !i.broken) else {
            i.pending.clear();
            return true;
        };
        while !i.pending.is_empty() {
            let (a, _) = i.pending.as_slices();
            match client.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    i.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    i.broken = true;
                    i.pending.clear();
                    return true;
                }
            }
        }
        i.pending.is_empty()
    }

    fn client_fd(&self) -> Option<i32> {
        lock(&self.inner).client.as_ref().map(|c| c.as_raw_fd())
    }
}

/// The writer the 8250 emulation prints through.
#[derive(Debug, Clone)]
pub struct ConsoleOut(pub Arc<Console>);

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.output(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The device-thread side: accepts clients and feeds their keystrokes to the
/// 8250.
#[derive(Debug)]
pub struct ConsoleServer {
    console: Arc<Console>,
    listener: UnixListener,
    serial: Arc<Mutex<SerialDevice>>,
    /// Signalled by the 8250 when the guest emptied its receive FIFO.
    input_room: EventFd,
    /// Keystrokes read but not yet taken by the FIFO.
    input: VecDeque<u8>,
    /// fd of the client whose events are registered.
    registered: Option<i32>,
}

impl ConsoleServer {
    /// Serves `console` on `listener` (already bound), typing into `serial`.
    pub fn new(
        console: Arc<Console>,
        listener: UnixListener,
        serial: Arc<Mutex<SerialDevice>>,
        input_room: EventFd,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            console,
            listener,
            serial,
            input_room,
            input: VecDeque::new(),
            registered: None,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            self.console.attach(stream);
        }
        self.sync_client(ops);
    }

    /// Registers the attached client (if it changed) for input and, while
    /// output is pending, for writability.
    fn sync_client(&mut self, ops: &mut EventOps) {
        let fd = self.console.client_fd();
        if fd != self.registered {
            if let Some(old) = self.registered.take() {
                let _ = ops.remove(Events::empty_raw(old));
            }
            if let Some(new) = fd {
                let _ = ops.add(Events::new_raw(new, self.client_interest()));
                self.registered = Some(new);
            }
        } else if let Some(fd) = fd {
            let _ = ops.modify(Events::new_raw(fd, self.client_interest()));
        }
    }

    /// Takes the client out of the event loop, then lets it go. What it
    /// typed and the guest has not taken yet is kept and still typed.
    fn drop_client(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.registered.take() {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        self.take_leftover_input();
        self.console.detach();
        self.feed_serial();
    }

    /// Reads what a leaving client's socket still holds into `input`.
    fn take_leftover_input(&mut self) {
        let mut inner = lock(&self.console.inner);
        let Some(client) = inner.client.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        while self.input.len() < LEFTOVER_INPUT_MAX_BYTES {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => self.input.extend(&buf[..n]),
            }
        }
        tracing::warn!(
            kept = self.input.len(),
            "console: a client left with more input queued than is kept; the rest is dropped"
        );
    }

    fn client_interest(&self) -> EventSet {
        // Not READ_HANG_UP: a client that half-closed while its keystrokes
        // wait for the guest would report it on every turn; its end is seen
        // by the read that returns 0 once the input is taken.
        let mut set = EventSet::HANG_UP;
        if self.input.is_empty() {
            set |= EventSet::IN;
        }
        if !lock(&self.console.inner).pending.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    fn read_client(&mut self) -> bool {
        let mut buf = [0u8; 256];
        let mut inner = lock(&self.console.inner);
        let Some(client) = inner.client.as_mut() else {
            return false;
        };
        match client.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                drop(inner);
                self.input.extend(&buf[..n]);
                self.feed_serial();
                true
            }
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        }
    }

    /// Moves keystrokes into the 8250's FIFO as far as it has room.
    fn feed_serial(&mut self) {
        while !self.input.is_empty() {
            let (a, _) = self.input.as_slices();
            let taken = lock(&self.serial).enqueue_input(a);
            if taken == 0 {
                break;
            }
            self.input.drain(..taken);
        }
    }
}

impl MutEventSubscriber for ConsoleServer {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            Events::new(&self.listener, EventSet::IN),
            Events::new(&self.input_room, EventSet::IN),
            Events::new(&self.console.pending_event, EventSet::IN),
        ];
        for e in fds {
            if let Err(err) = ops.add(e) {
                tracing::error!(error = ?err, "console: cannot watch its fds");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        if fd == self.input_room.as_raw_fd() {
            let _ = self.input_room.read();
            self.feed_serial();
        } else if fd == self.console.pending_event.as_raw_fd() {
            let _ = self.console.pending_event.read();
            self.console.flush_pending();
        } else if Some(fd) == self.registered {
            let set = events.event_set();
            let mut alive = true;
            if set.contains(EventSet::OUT) {
                self.console.flush_pending();
            }
            if set.contains(EventSet::IN) {
                alive = self.read_client();
            }
            if !alive || set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                self.drop_client(ops);
            }
        }
        if self.console.broken() {
            self.drop_client(ops);
        }
        self.sync_client(ops);
    }
}

/// Binds the console socket at `path`, replacing a stale one (a socket file
/// nobody listens on) but never a live one.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running VM", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

pub mod client;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::MutBusDevice;
    use event_manager::{EventManager, SubscriberOps};
    use std::time::{Duration, Instant};

    type Loop = EventManager<Arc<Mutex<ConsoleServer>>>;

    struct Rig {
        events: Loop,
        console: Arc<Console>,
        serial: Arc<Mutex<SerialDevice>>,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let boot = Arc::new(BootTimes::new(Instant::now()));
        let console = Console::new(None, false, boot).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            room.try_clone().unwrap(),
            Box::new(ConsoleOut(console.clone())),
        )));
        let server =
            ConsoleServer::new(console.clone(), bind(&path).unwrap(), serial.clone(), room)
                .unwrap();
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(server)));
        Rig {
            events,
            console,
            serial,
            path,
            _dir: dir,
        }
    }

    impl Rig {
        fn pump(&mut self) {
            for _ in 0..5 {
                self.events.run_with_timeout(10).unwrap();
            }
        }
        /// What the guest's UART has received so far.
        fn guest_reads(&mut self) -> Vec<u8> {
            let mut got = Vec::new();
            let mut s = lock(&self.serial);
            loop {
                let mut lsr = [0u8];
                s.read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    break;
                }
                let mut b = [0u8];
                s.read(0, &mut b);
                got.push(b[0]);
            }
            got
        }
        fn guest_prints(&mut self, text: &[u8]) {
            let mut s = lock(&self.serial);
            for b in text {
                s.write(0, &[*b]);
            }
        }
    }

    fn read_for(c: &mut UnixStream, rig: &mut Rig) -> Vec<u8> {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut out = Vec::new();
        for _ in 0..10 {
            rig.pump();
            let mut buf = [0u8; 4096];
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        out
    }

    #[test]
    fn attach_type_detach_attach_again() {
        let mut rig = rig();
        rig.guest_prints(b"login: ");
        // First client: sees the backlog, types, leaves.
        let mut c1 = UnixStream::connect(&rig.path).unwrap();
        assert_eq!(read_for(&mut c1, &mut rig), b"login: ");
        c1.write_all(b"root\n").unwrap();
        rig.pump();
        assert_eq!(rig.guest_reads(), b"root\n");
        drop(c1);
        rig.pump();
        // A second client is served the same way, and sees new output live.
        let mut c2 = UnixStream::connect(&rig.path).unwrap();
        let replay = read_for(&mut c2, &mut rig);
        assert!(replay.ends_with(b"login: "), "{replay:?}");
        c2.write_all(b"ls\n").unwrap();
        rig.pump();
        assert_eq!(rig.guest_reads(), b"ls\n");
        rig.guest_prints(b"bin dev\n");
        assert_eq!(read_for(&mut c2, &mut rig), b"bin dev\n");
        // A third connection while the second is attached is turned away.
        let mut c3 = UnixStream::connect(&rig.path).unwrap();
        let refused = read_for(&mut c3, &mut rig);
        assert!(String::from_utf8_lossy(&refused).contains("attached elsewhere"));
        c2.write_all(b"x").unwrap();
        rig.pump();
        assert_eq!(rig.guest_reads(), b"x", "the attached client still types");
    }

    #[test]
    fn the_log_stops_at_its_cap() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let boot = Arc::new(BootTimes::new(Instant::now()));
        let console = Console::new(Some(file.reopen().unwrap()), false, boot).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(LOG_MAX_BYTES >> 20) + 3 {
            console.output(&chunk);
        }
        let len = std::fs::metadata(file.path()).unwrap().len();
        assert!(len > LOG_MAX_BYTES && len < LOG_MAX_BYTES + 200, "{len}");
        let text = std::fs::read(file.path()).unwrap();
        assert!(String::from_utf8_lossy(&text[text.len() - 100..]).contains("console log full"));
    }

    #[test]
    fn typing_faster_than_the_guest_reads_loses_nothing() {
        let mut rig = rig();
        let mut c = UnixStream::connect(&rig.path).unwrap();
        let text: Vec<u8> = (0..1000).map(|i| b'a' + (i % 26) as u8).collect();
        c.write_all(&text).unwrap();
        let mut got = Vec::new();
        for _ in 0..200 {
            rig.pump();
            got.extend(rig.guest_reads());
            if got.len() == text.len() {
                break;
            }
        }
        assert_eq!(got, text);
        let _ = &rig.console;
    }

    #[test]
    fn what_a_client_typed_before_leaving_still_reaches_a_slow_guest() {
        let mut rig = rig();
        let mut c = UnixStream::connect(&rig.path).unwrap();
        rig.pump();
        // More than the FIFO holds, then gone before the guest read a byte.
        let text: Vec<u8> = (0..3000).map(|i| b'a' + (i % 26) as u8).collect();
        c.write_all(&text).unwrap();
        drop(c);
        rig.pump();
        let mut got = Vec::new();
        for _ in 0..400 {
            got.extend(rig.guest_reads());
            if got.len() >= text.len() {
                break;
            }
            rig.pump();
        }
        assert_eq!(got, text);
        // The next client is served as usual once the leftovers are typed.
        let mut c2 = UnixStream::connect(&rig.path).unwrap();
        c2.write_all(b"ls\n").unwrap();
        rig.pump();
        assert_eq!(rig.guest_reads(), b"ls\n");
    }
}
