//! The delay line: latency and loss on a host's line, where the kernel has
//! no `netem`.
//!
//! A host with a delayed line is wired through the lab's *wire* namespace
//! instead of straight to the bridge: its `eth0` pairs with `h<i>` in the
//! wire namespace, and a second veth pair joins `d<i>` (wire namespace) to
//! `b<i>` on the bridge. One thread per line moves Ethernet frames between
//! `h<i>` and `d<i>` through packet sockets, holding each for the line's
//! one-way delay and dropping it with the line's loss probability. The wire
//! namespace has no addresses, so its kernel neither answers ARP for the hub
//! nor routes anything: every frame a host sends or receives crosses the
//! delay line.
//!
//! Two kernel details make a userspace forwarder correct on veths:
//! - A locally sent TCP or UDP segment leaves with its checksum left to the
//!   device (`CHECKSUM_PARTIAL`), and a packet socket hands it over that way;
//!   re-sent, it would reach the receiver with a wrong checksum and be
//!   dropped. The line recomputes IPv4 TCP/UDP checksums of every frame.
//! - Segmentation offload would hand the socket 64 KiB frames that cannot be
//!   sent again; the lab's veths on a delayed line carry one segment per
//!   frame (`gso_max_segs 1`), and a larger frame is counted and dropped.
//!
//! Frames a line cannot queue (the shaper's buffer on the far side is full)
//! are dropped as a router would, and counted apart from the modelled loss.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt,
    socket, sockopt,
};
use rand::{Rng, SeedableRng};

use crate::{LabError, Result};

/// The largest frame a line forwards: an Ethernet header and a 1500-byte MTU.
const MAX_FRAME: usize = 14 + 1500;
/// How long the forwarder sleeps at most, so that a stopped line notices.
const MAX_WAIT: Duration = Duration::from_millis(20);
/// Frames read from one side per turn before the other side gets its turn.
const BATCH: usize = 64;
/// Receive buffer of each packet socket: a second of a fast line's frames, so
/// that a busy machine does not add loss of its own.
const SOCKET_BUFFER: usize = 4 << 20;

/// What a line did with the frames it was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Frames delivered to the other side after the delay.
    pub forwarded: u64,
    /// Frames dropped by the modelled loss.
    pub lost: u64,
    /// Frames the other side had no room for (shaper queue full).
    pub overflowed: u64,
    /// Frames too large to forward (segmentation offload left on).
    pub oversize: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    lost: AtomicU64,
    overflowed: AtomicU64,
    oversize: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> LineStats {
        LineStats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
            oversize: self.oversize.load(Ordering::Relaxed),
        }
    }
}

/// A running delay line; stops (and joins its thread) when dropped.
pub(crate) struct DelayLine {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DelayLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayLine")
            .field("stats", &self.counters.snapshot())
            .finish()
    }
}

impl DelayLine {
    /// Starts forwarding between the interfaces `host_side` and `lab_side`
    /// of the namespace `netns`, each frame held for `delay` and dropped with
    /// probability `loss_ppm` / 1,000,000, in either direction.
    pub(crate) fn start(
        netns: &str,
        host_side: &str,
        lab_side: &str,
        delay: Duration,
        loss_ppm: u32,
        seed: u64,
    ) -> Result<Self> {
        let (host_fd, lab_fd) = open_in(netns, host_side, lab_side)?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let forwarder = Forwarder {
            sides: [Side::new(host_fd), Side::new(lab_fd)],
            delay,
            loss_ppm,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            counters: counters.clone(),
            scratch: vec![0; 1 << 16],
        };
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("delay-{host_side}"))
            .spawn(move || forwarder.run(&stop_flag))
            .map_err(|source| LabError::Spawn {
                command: format!("delay line thread for {host_side}"),
                source,
            })?;
        Ok(Self {
            stop,
            counters,
            thread: Some(thread),
        })
    }

    pub(crate) fn stats(&self) -> LineStats {
        self.counters.snapshot()
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens a packet socket on each interface, on a thread that entered
/// `netns` (a socket stays in the namespace it was made in, so the
/// forwarder itself can run anywhere).
fn open_in(netns: &str, host_side: &str, lab_side: &str) -> Result<(OwnedFd, OwnedFd)> {
    let path = format!("/run/netns/{netns}");
    let ns = std::fs::File::open(&path).map_err(|source| LabError::Spawn {
        command: format!("open {path}"),
        source,
    })?;
    let (a, b) = (host_side.to_owned(), lab_side.to_owned());
    std::thread::spawn(move || -> Result<(OwnedFd, OwnedFd)> {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| sys_error(format!("setns into {path}"), e))?;
        Ok((packet_socket(&a)?, packet_socket(&b)?))
    })
    .join()
    .unwrap_or_else(|_| {
        Err(LabError::Parse {
            command: "delay line set-up".into(),
            output: "the set-up thread panicked".into(),
        })
    })
}

/// A non-blocking packet socket that sends and receives whole frames on
/// `interface` only.
fn packet_socket(interface: &str) -> Result<OwnedFd> {
    let what = || format!("packet socket on {interface}");
    let link = link_addr(interface)?;
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .map_err(|e| sys_error(what(), e))?;
    nix::sys::socket::bind(fd.as_raw_fd(), &link).map_err(|e| sys_error(what(), e))?;
    setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER).map_err(|e| sys_error(what(), e))?;
    setsockopt(&fd, sockopt::SndBufForce, &SOCKET_BUFFER).map_err(|e| sys_error(what(), e))?;
    // Until the bind the socket heard every interface of the namespace
    // (other lines' frames): those must not cross this line.
    let mut junk = [0u8; MAX_FRAME];
    while recv(fd.as_raw_fd(), &mut junk, MsgFlags::MSG_DONTWAIT).is_ok() {}
    Ok(fd)
}

/// The link-layer address of `interface` in this thread's namespace: what a
/// packet socket binds to (its index; protocol 0 keeps the socket's).
fn link_addr(interface: &str) -> Result<LinkAddr> {
    nix::ifaddrs::getifaddrs()
        .map_err(|e| sys_error("getifaddrs".into(), e))?
        .filter(|a| a.interface_name == interface)
        .find_map(|a| a.address.and_then(|s| s.as_link_addr().copied()))
        .ok_or_else(|| LabError::Parse {
            command: "getifaddrs".into(),
            output: format!("no link address for {interface}"),
        })
}

fn sys_error(command: String, e: Errno) -> LabError {
    LabError::Spawn {
        command,
        source: std::io::Error::from(e),
    }
}

/// One side of the line: its socket and the frames waiting to go out of it.
struct Side {
    fd: OwnedFd,
    /// Frames with the time they may leave, oldest first: the delay is the
    /// same for every frame, so arrival order is departure order.
    queue: VecDeque<(Instant, Vec<u8>)>,
}

impl Side {
    fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            queue: VecDeque::new(),
        }
    }
}

struct Forwarder {
    /// `[host side, lab side]`: a frame read on one leaves by the other.
    sides: [Side; 2],
    delay: Duration,
    loss_ppm: u32,
    rng: rand::rngs::StdRng,
    counters: Arc<Counters>,
    scratch: Vec<u8>,
}

impl Forwarder {
    fn run(mut self, stop: &AtomicBool) {
        let mut spare: Vec<Vec<u8>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            for side in &mut self.sides {
                if !side.flush(now, &self.counters, &mut spare) {
                    return; // the interface is gone: the lab is being taken down
                }
            }
            let wait = self
                .sides
                .iter()
                .filter_map(|s| {
                    s.queue
                        .front()
                        .map(|(due, _)| due.saturating_duration_since(now))
                })
                .min()
                .unwrap_or(MAX_WAIT)
                .min(MAX_WAIT);
            // Round up: waking early would spin until the frame is due.
            let ms = wait.as_micros().div_ceil(1000) as u16;
            let readable = {
                let mut fds = [
                    PollFd::new(self.sides[0].fd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.sides[1].fd.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(_) => fds.map(|f| f.any().unwrap_or(false)),
                    Err(Errno::EINTR) => [false, false],
                    Err(_) => return,
                }
            };
            for (from, ready) in readable.into_iter().enumerate() {
                if ready && !self.take(from, &mut spare) {
                    return;
                }
            }
        }
    }

    /// Reads up to [`BATCH`] frames from side `from` into the other side's
    /// queue; false if the socket failed for good.
    fn take(&mut self, from: usize, spare: &mut Vec<Vec<u8>>) -> bool {
        for _ in 0..BATCH {
            let n = match recv(
                self.sides[from].fd.as_raw_fd(),
                &mut self.scratch,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return true,
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            };
            if n > MAX_FRAME {
                self.counters.oversize.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if self.loss_ppm > 0 && self.rng.gen_range(0..1_000_000) < self.loss_ppm {
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut frame = spare.pop().unwrap_or_default();
            frame.clear();
            frame.extend_from_slice(&self.scratch[..n]);
            fix_l4_checksum(&mut frame);
            let due = Instant::now() + self.delay;
            self.sides[1 - from].queue.push_back((due, frame));
        }
        true
    }
}

impl Side {
    /// Sends every frame that is due; false if the socket failed for good.
    fn flush(&mut self, now: Instant, counters: &Counters, spare: &mut Vec<Vec<u8>>) -> bool {
        while self.queue.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, frame)) = self.queue.pop_front() else {
                break;
            };
            match send(self.fd.as_raw_fd(), &frame, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => counters.forwarded.fetch_add(1, Ordering::Relaxed),
                // The shaper's queue behind this side is full: a router drops.
                Err(Errno::EAGAIN | Errno::ENOBUFS) => {
                    counters.overflowed.fetch_add(1, Ordering::Relaxed)
                }
                Err(Errno::ENETDOWN | Errno::ENXIO | Errno::ENODEV) => return false,
                Err(_) => counters.overflowed.fetch_add(1, Ordering::Relaxed),
            };
            spare.push(frame);
        }
        true
    }
}

/// Recomputes the TCP or UDP checksum of an unfragmented IPv4 frame (left
/// partial by the sender's offload); other frames are left alone.
pub(crate) fn fix_l4_checksum(frame: &mut [u8]) {
    const ETH: usize = 14;
    if frame.len() < ETH + 20 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ip = &frame[ETH..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() || fragmented {
        return;
    }
    let (proto, field) = match ip[9] {
        6 => (6u8, 16),
        17 => (17u8, 6),
        _ => return,
    };
    let l4_len = total - ihl;
    if l4_len < field + 2 {
        return;
    }
    let (src, dst) = (
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    );
    let l4 = &mut frame[ETH + ihl..ETH + total];
    l4[field] = 0;
    l4[field + 1] = 0;
    let mut sum: u64 = 0;
    for pair in [src, dst].iter().flat_map(|a| a.chunks(2)) {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum += u64::from(proto) + l4_len as u64;
    let mut chunks = l4.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut checksum = !(sum as u16);
    if proto == 17 && checksum == 0 {
        checksum = 0xffff; // zero means "no checksum" in UDP
    }
    l4[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame: Ethernet, IPv4 from 198.18.0.2 to 198.18.0.3, and `l4`.
    fn frame(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + l4.len()) as u16;
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0]);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[198, 18, 0, 2, 198, 18, 0, 3]);
        f.extend_from_slice(l4);
        f
    }

    /// The one's complement sum over pseudo-header and segment: 0xffff when
    /// the checksum in it is right (RFC 1071).
    fn verify(f: &[u8]) -> u16 {
        let ip = &f[14..];
        let l4 = &ip[20..];
        let mut sum: u64 = 0;
        for c in ip[12..20].chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        sum += u64::from(ip[9]) + l4.len() as u64;
        let mut it = l4.chunks_exact(2);
        for c in &mut it {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [b] = it.remainder() {
            sum += u64::from(*b) << 8;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn a_partial_tcp_checksum_is_completed() {
        let mut tcp = vec![0u8; 20];
        tcp[12] = 0x50;
        tcp.extend_from_slice(b"hello, odd length");
        // What an offloading sender leaves: the pseudo-header sum only.
        tcp[16..18].copy_from_slice(&[0x12, 0x34]);
        let mut f = frame(6, &tcp);
        assert_ne!(verify(&f), 0xffff);
        fix_l4_checksum(&mut f);
        assert_eq!(verify(&f), 0xffff);
        // Idempotent: a right checksum stays right.
        let before = f.clone();
        fix_l4_checksum(&mut f);
        assert_eq!(f, before);
    }

    #[test]
    fn udp_checksums_are_completed_and_never_zero() {
        let mut udp = vec![0u8; 8];
        udp[4..6].copy_from_slice(&12u16.to_be_bytes());
        udp.extend_from_slice(b"quic");
        let mut f = frame(17, &udp);
        fix_l4_checksum(&mut f);
        assert_eq!(verify(&f), 0xffff);
        assert_ne!(&f[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
    }

    #[test]
    fn other_frames_are_left_alone() {
        let arp = {
            let mut f = vec![0u8; 42];
            f[12..14].copy_from_slice(&[0x08, 0x06]);
            f
        };
        let mut g = arp.clone();
        fix_l4_checksum(&mut g);
        assert_eq!(g, arp);
        // A fragment's checksum covers bytes this frame does not hold.
        let mut frag = frame(6, &[0u8; 24]);
        frag[14 + 6] = 0x20; // more fragments
        let before = frag.clone();
        fix_l4_checksum(&mut frag);
        assert_eq!(frag, before);
        // A header claiming more bytes than the frame has.
        let mut short = frame(17, &[0u8; 8]);
        short[16..18].copy_from_slice(&500u16.to_be_bytes());
        let before = short.clone();
        fix_l4_checksum(&mut short);
        assert_eq!(short, before);
    }
}
