//! virtio-net on a TAP device: one receive and one transmit queue,
//! mergeable receive buffers, checksum and TSO offloads passed through.
//!
//! Transmit writes each packet from guest memory with one `writev`.
//! Receive reads a large packet (while packets are large) with one `readv`
//! straight into enough guest buffers, otherwise into one host buffer that
//! is then spread over as many guest buffers as it needs (`num_buffers`).
//! When the guest has posted no receive buffers the TAP is not polled, so a
//! full guest stalls nothing. Interrupts (and, while a transmit hold runs,
//! the driver's kicks) are moderated under load: [`moderation`].
//!
//! The host end may be any fd with one packet per read and write (a TAP in
//! production, a `SOCK_SEQPACKET` pair in tests).

pub mod moderation;
pub mod tap;

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use event_manager::EventSet;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use self::moderation::Moderation;
use self::tap::VNET_HDR_LEN;
use super::iov::{Bufs, Chain};
use super::{DeviceError, QueueMask, VirtioBackend, has_feature, pop_chain, queue_error};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: 64 KiB of GSO payload plus headers.
const MAX_PACKET: usize = VNET_HDR_LEN + 65_550;
/// Packets moved per wakeup before yielding to other devices.
const BATCH: usize = 128;
/// A packet at least this long makes the next one go straight from the TAP
/// into guest buffers (see [`Net::receive_direct`]).
const DIRECT_FROM: usize = 16 << 10;

/// Feature bits (virtio 1.2 §5.1.3).
const VIRTIO_NET_F_CSUM: u32 = 0;
const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
const VIRTIO_NET_F_HOST_ECN: u32 = 13;
const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;

/// Packet counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Packets given to the guest.
    pub rx_packets: u64,
    /// Packets sent to the host.
    pub tx_packets: u64,
    /// Host packets dropped (no fitting guest buffer).
    pub rx_dropped: u64,
    /// Guest packets refused (malformed chains, sizes).
    pub tx_dropped: u64,
    /// Bytes of the packets given to the guest (virtio-net headers not counted).
    pub rx_bytes: u64,
    /// Bytes of the packets sent to the host (headers not counted).
    pub tx_bytes: u64,
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    tap: File,
    is_tap: bool,
    mac: [u8; 6],
    features: u64,
    rx_buf: Vec<u8>,
    /// Length of a packet in `rx_buf` waiting for guest buffers.
    rx_pending: Option<usize>,
    /// Length of the last packet received.
    rx_last_len: usize,
    /// No receive buffers: stop polling the host end until the guest posts some.
    rx_starved: bool,
    /// The host end refused a write: wait until it is writable.
    tx_blocked: bool,
    /// Interrupt moderation per queue (receive, transmit), when on.
    moderation: [Option<Moderation>; 2],
    /// Packets sent since the guest was last told.
    tx_unsignalled: usize,
    /// Counters.
    pub stats: NetStats,
}

impl Net {
    /// A device on the TAP `tap` with address `mac`.
    pub fn new(tap: File, mac: [u8; 6]) -> Self {
        Self::with_host_end(tap, mac, true)
    }

    /// A device on any packet fd (`is_tap` false: no offload ioctls).
    pub fn with_host_end(tap: File, mac: [u8; 6], is_tap: bool) -> Self {
        Self {
            tap,
            is_tap,
            mac,
            features: 0,
            rx_buf: vec![0; MAX_PACKET],
            rx_pending: None,
            rx_last_len: 0,
            rx_starved: false,
            tx_blocked: false,
            moderation: [None, None],
            tx_unsignalled: 0,
            stats: NetStats::default(),
        }
    }

    /// Moderates both queues' interrupts under load (see [`moderation`]).
    pub fn with_moderation(mut self) -> io::Result<Self> {
        self.moderation = [Some(Moderation::new()?), Some(Moderation::new()?)];
        Ok(self)
    }

    /// The queue mask to report for a batch of buffers of queue `q` just
    /// used: the guest must see receive buffers at once when it has none
    /// left, sent ones when half the ring waits to be reclaimed.
    fn used(&mut self, q: usize, queue_size: u16) -> QueueMask {
        let urgent = match q {
            RX => self.rx_starved,
            _ => self.tx_unsignalled >= usize::from(queue_size / 2),
        };
        let now = self.moderation[q].as_mut().is_none_or(|m| m.batch(urgent));
        if now { self.signalled(q) } else { 0 }
    }

    fn signalled(&mut self, q: usize) -> QueueMask {
        if q == TX {
            self.tx_unsignalled = 0;
        }
        1 << q
    }

    fn mergeable(&self) -> bool {
        has_feature(self.features, VIRTIO_NET_F_MRG_RXBUF)
    }

    /// Sends what the ring holds, leaving the driver's notifications as
    /// they are: [`Net::transmit_all`] decides about those.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut any = false;
        while let Some(chain) = pop_chain(queue, mem, TX)? {
            let head = chain.head_index();
            let sent = match Chain::new(mem, chain) {
                Ok(c) if (VNET_HDR_LEN..=MAX_PACKET).contains(&c.readable.len()) => {
                    match c.readable.writev(self.tap.as_fd()) {
                        Ok(_) => {
                            self.stats.tx_bytes += (c.readable.len() - VNET_HDR_LEN) as u64;
                            true
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // Retry this chain when the host end drains.
                            queue.go_to_previous_position();
                            self.tx_blocked = true;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "virtio-net: host end refused a packet");
                            false
                        }
                    }
                }
                Ok(_) | Err(_) => false,
            };
            self.tx_unsignalled += 1;
            if sent {
                self.stats.tx_packets += 1;
            } else {
                self.stats.tx_dropped += 1;
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|e| queue_error(TX, e))?;
            any = true;
        }
        Ok(any)
    }

    /// Sends until the ring is empty and says whether to interrupt the guest.
    ///
    /// While a hold runs, the driver's kicks stay off (under event-index
    /// they stop by themselves once one came, until `avail_event` moves):
    /// the hold's timer looks at the ring instead, so a steady stream costs
    /// the guest one kick per hold rather than one per packet. Otherwise
    /// kicks are turned back on — and the ring looked at once more, for a
    /// packet added meanwhile.
    fn transmit_all(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueMask, DeviceError> {
        let mut used = 0;
        loop {
            let any = self.transmit(queue, mem)?;
            if self.tx_blocked {
                // The host end's readiness brings us back; no kick needed.
                return Ok(used | if any { self.used(TX, queue.size()) } else { 0 });
            }
            if any {
                used |= self.used(TX, queue.size());
                if self.holding(TX) {
                    return Ok(used);
                }
            }
            if !queue
                .enable_notification(mem)
                .map_err(|e| queue_error(TX, e))?
            {
                return Ok(used);
            }
        }
    }

    /// Receives and says whether to interrupt the guest. A guest left
    /// without buffers hears at once of what a hold kept back, even when
    /// this turn brought nothing new: it must run to post more.
    fn receive_and_signal(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueMask, DeviceError> {
        let any = self.receive(queue, mem)?;
        Ok(if any || (self.rx_starved && self.holding(RX)) {
            self.used(RX, queue.size())
        } else {
            0
        })
    }

    fn holding(&self, q: usize) -> bool {
        self.moderation[q].as_ref().is_some_and(Moderation::holding)
    }

    /// Moves host packets to the guest until the host end is empty, the
    /// guest has no buffers, or a batch is done.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut any = false;
        for _ in 0..BATCH {
            if self.rx_pending.is_none() && self.mergeable() && self.rx_last_len >= DIRECT_FROM {
                match self.receive_direct(queue, mem)? {
                    Direct::Delivered => {
                        any = true;
                        continue;
                    }
                    Direct::Dropped => continue,
                    Direct::Empty => break,
                    // Through `rx_buf`, which copes with any buffers.
                    Direct::NoRoom => {}
                }
            }
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read(&mut self.rx_buf) {
                    Ok(0) => break,
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(DeviceError::Backend(format!("reading the TAP: {e}"))),
                },
            };
            if len < VNET_HDR_LEN {
                self.rx_pending = None;
                self.stats.rx_dropped += 1;
                continue;
            }
            self.rx_pending = Some(len);
            self.rx_last_len = len;
            match self.deliver(len, queue, mem)? {
                Delivery::Delivered | Delivery::Dropped => {
                    self.rx_pending = None;
                    any = true;
                }
                Delivery::NoRoom => {
                    // Wait for the guest's next receive buffers (their kick
                    // clears this); the packet stays pending.
                    self.rx_starved = true;
                    break;
                }
            }
        }
        Ok(any)
    }

    /// Reads the TAP's next packet straight into the guest's receive
    /// buffers: one `readv` over enough chains for the largest packet, the
    /// chains it did not fill put back. Saves the copy through `rx_buf`
    /// (64 KiB per packet under a TCP stream) but looks at ~17 chains per
    /// packet, so it is used only while packets are large. Mergeable buffers
    /// only; any chain the device cannot simply write into sends the packet
    /// the buffered way.
    fn receive_direct(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Direct, DeviceError> {
        let mut taken: Vec<(u16, usize)> = Vec::new();
        let mut bufs = Bufs::default();
        let mut popped: u16 = 0;
        let put_back = |queue: &mut Queue, n: u16| {
            for _ in 0..n {
                queue.go_to_previous_position();
            }
        };
        while bufs.len() < MAX_PACKET {
            let next = pop_chain(queue, mem, RX)?;
            let usable = next.map(|chain| (chain.head_index(), Chain::new(mem, chain)));
            let Some((head, Ok(c))) = usable else {
                put_back(queue, popped + u16::from(usable.is_some()));
                return Ok(Direct::NoRoom);
            };
            popped += 1;
            if c.writable.is_empty() || !c.readable.is_empty() || popped > queue.size() {
                put_back(queue, popped);
                return Ok(Direct::NoRoom);
            }
            taken.push((head, c.writable.len()));
            bufs.extend(&c.writable);
            if !bufs.fits_one_call() {
                // Buffers in too many pieces for `readv`; copying into them
                // has no such limit.
                put_back(queue, popped);
                return Ok(Direct::NoRoom);
            }
        }
        if taken[0].1 < VNET_HDR_LEN {
            put_back(queue, popped);
            return Ok(Direct::NoRoom);
        }
        let len = match bufs.readv(self.tap.as_fd()) {
            Ok(len) => len,
            Err(e) => {
                put_back(queue, popped);
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Direct::Empty),
                    _ => Err(DeviceError::Backend(format!("reading the TAP: {e}"))),
                };
            }
        };
        if len == 0 {
            put_back(queue, popped);
            return Ok(Direct::Empty);
        }
        self.rx_last_len = len;
        if len < VNET_HDR_LEN {
            put_back(queue, popped);
            self.stats.rx_dropped += 1;
            return Ok(Direct::Dropped);
        }
        let mut filled = 0;
        let mut covered = 0;
        while covered < len {
            covered += taken[filled].1;
            filled += 1;
        }
        // `num_buffers`, the header's last field.
        bufs.split_at(10)
            .1
            .copy_from(&(filled as u16).to_le_bytes());
        let mut left = len;
        for &(head, room) in &taken[..filled] {
            let n = room.min(left);
            left -= n;
            queue
                .add_used(mem, head, n as u32)
                .map_err(|e| queue_error(RX, e))?;
        }
        put_back(queue, popped - filled as u16);
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += len.saturating_sub(VNET_HDR_LEN) as u64;
        Ok(Direct::Delivered)
    }

    /// Puts the packet in `rx_buf[..len]` into guest buffers.
    ///
    /// Chains are only completed once the packet's fate is known: when the
    /// available buffers are not enough, every chain taken is put back (and
    /// notifications are re-enabled at the ring's current end first, so that
    /// the driver's next buffer brings a kick under event-index). A packet
    /// that even the whole ring could not hold, or (without mergeable
    /// buffers) one larger than the buffer it got, is dropped.
    fn deliver(
        &mut self,
        len: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Delivery, DeviceError> {
        'retry: loop {
            let mut taken: Vec<(u16, Chain<'_>)> = Vec::new();
            // Chains the device cannot write into: returned empty, later.
            let mut unusable: Vec<u16> = Vec::new();
            let mut popped: u16 = 0;
            let mut room = 0usize;
            let mut fits = true;
            while room < len {
                let next = pop_chain(queue, mem, RX)?;
                let Some(chain) = next else {
                    if popped >= queue.size() {
                        // The whole ring is not enough: never will be.
                        fits = false;
                        break;
                    }
                    if give_back(queue, mem, popped)? {
                        continue 'retry;
                    }
                    return Ok(Delivery::NoRoom);
                };
                popped += 1;
                if popped > queue.size() {
                    // More than the ring holds: only a driver reusing entries
                    // it has not got back gets here, and it could keep this
                    // loop (and `taken`) growing without end.
                    give_back(queue, mem, popped)?;
                    return Ok(Delivery::NoRoom);
                }
                let head = chain.head_index();
                match Chain::new(mem, chain) {
                    Ok(c) if !c.writable.is_empty() && c.readable.is_empty() => {
                        room += c.writable.len();
                        taken.push((head, c));
                    }
                    _ => unusable.push(head),
                }
                if !self.mergeable() && !taken.is_empty() && room < len {
                    // Without mergeable buffers a packet needs one big buffer.
                    fits = false;
                    break;
                }
            }
            if fits {
                let count = taken.len() as u16;
                self.rx_buf[10..12].copy_from_slice(&count.to_le_bytes());
            }
            let mut off = 0;
            for (head, c) in &taken {
                let n = if fits {
                    c.writable.copy_from(&self.rx_buf[off..len])
                } else {
                    0
                };
                off += n;
                queue
                    .add_used(mem, *head, n as u32)
                    .map_err(|e| queue_error(RX, e))?;
            }
            for head in unusable {
                queue
                    .add_used(mem, head, 0)
                    .map_err(|e| queue_error(RX, e))?;
            }
            if fits {
                self.stats.rx_packets += 1;
                self.stats.rx_bytes += len.saturating_sub(VNET_HDR_LEN) as u64;
                return Ok(Delivery::Delivered);
            }
            self.stats.rx_dropped += 1;
            return Ok(Delivery::Dropped);
        }
    }
}

/// Puts the `popped` chains last taken back on the ring, turning the
/// driver's notifications on at its end first (under event-index its next
/// buffer then kicks), and says whether the ring has more than that now.
fn give_back(queue: &mut Queue, mem: &GuestMemoryMmap, popped: u16) -> Result<bool, DeviceError> {
    let more = queue
        .enable_notification(mem)
        .map_err(|e| queue_error(RX, e))?;
    for _ in 0..popped {
        queue.go_to_previous_position();
    }
    Ok(more)
}

/// What came of reading a packet straight into guest buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direct {
    /// In the guest's buffers.
    Delivered,
    /// Too short to be a packet: thrown away.
    Dropped,
    /// The TAP has nothing now.
    Empty,
    /// The ring's buffers do not suit: nothing was read.
    NoRoom,
}

/// What became of a received packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Thrown away (the guest's buffers could never hold it).
    Dropped,
    /// Not enough buffers yet: nothing was consumed.
    NoRoom,
}

impl VirtioBackend for Net {
    fn bytes(&self) -> (u64, u64) {
        (self.stats.rx_bytes, self.stats.tx_bytes)
    }

    fn device_type(&self) -> u16 {
        1
    }

    fn pci_class(&self) -> u32 {
        // Network controller, Ethernet.
        0x02_00_00
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        .iter()
        .fold(0, |f, b| f | 1 << b)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6]; nothing else is offered.
        data.fill(0);
        let start = (offset as usize).min(6);
        let end = (start + data.len()).min(6);
        data[..end - start].copy_from_slice(&self.mac[start..end]);
    }

    fn activate(&mut self, features: u64) -> Result<(), super::ActivateError> {
        self.features = features;
        if self.is_tap {
            let mut flags = 0;
            if has_feature(features, VIRTIO_NET_F_GUEST_CSUM) {
                flags |= tap::offload::CSUM;
                if has_feature(features, VIRTIO_NET_F_GUEST_TSO4) {
                    flags |= tap::offload::TSO4;
                }
                if has_feature(features, VIRTIO_NET_F_GUEST_TSO6) {
                    flags |= tap::offload::TSO6;
                }
                if has_feature(features, VIRTIO_NET_F_GUEST_ECN) {
                    flags |= tap::offload::TSO_ECN;
                }
            }
            tap::set_offload(&self.tap, flags)
                .map_err(|e| super::ActivateError::Backend(format!("TAP offloads: {e}")))?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.features = 0;
        self.rx_pending = None;
        self.rx_last_len = 0;
        self.rx_starved = false;
        self.tx_blocked = false;
        for m in self.moderation.iter_mut().flatten() {
            m.clear();
        }
        self.tx_unsignalled = 0;
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueMask, DeviceError> {
        match index {
            RX => {
                // New receive buffers: resume taking packets from the host.
                self.rx_starved = false;
                self.receive_and_signal(&mut queues[RX], mem)
            }
            TX if !self.tx_blocked => self.transmit_all(&mut queues[TX], mem),
            _ => Ok(0),
        }
    }

    fn host_fds(&self) -> Vec<(RawFd, EventSet)> {
        let mut set = EventSet::empty();
        if !self.rx_starved {
            set |= EventSet::IN;
        }
        if self.tx_blocked {
            set |= EventSet::OUT;
        }
        let mut fds = vec![(self.tap.as_raw_fd(), set)];
        for m in self.moderation.iter().flatten() {
            fds.push((m.fd(), EventSet::IN));
        }
        fds
    }

    fn host_fd_ready(
        &mut self,
        fd: RawFd,
        events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueMask, DeviceError> {
        let timer_of = |q: usize| self.moderation[q].as_ref().map(Moderation::fd);
        if let Some(q) = [RX, TX].into_iter().find(|&q| timer_of(q) == Some(fd)) {
            let polling = q == TX && !self.tx_blocked;
            if polling {
                // Kicks were off during the hold: what came goes out with it.
                self.transmit(&mut queues[TX], mem)?;
            }
            let expired = self.moderation[q].as_mut().is_some_and(Moderation::expired);
            let mut used = if expired { self.signalled(q) } else { 0 };
            if polling {
                used |= self.transmit_all(&mut queues[TX], mem)?;
            }
            return Ok(used);
        }
        // A TAP whose interface was deleted reports only errors, forever:
        // the device stops (NEEDS_RESET) instead of spinning on it.
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            return Err(DeviceError::Backend("the TAP failed or went away".into()));
        }
        let mut used = 0;
        if events.contains(EventSet::OUT) {
            self.tx_blocked = false;
            used |= self.transmit_all(&mut queues[TX], mem)?;
        }
        if events.contains(EventSet::IN) && !self.rx_starved {
            used |= self.receive_and_signal(&mut queues[RX], mem)?;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests;
