//! A minimal virtio driver for unit tests: builds descriptor chains in
//! plain guest memory, makes them available, runs a backend's queue, and
//! reads the used ring back. Lets device logic be tested without KVM.

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{DeviceError, QueueMask, VirtioBackend};

/// A device-readable buffer (address, length).
#[allow(non_snake_case)]
pub fn R(addr: u64, len: u32) -> (u64, u32, bool) {
    (addr, len, false)
}

/// A device-writable buffer (address, length).
#[allow(non_snake_case)]
pub fn W(addr: u64, len: u32) -> (u64, u32, bool) {
    (addr, len, true)
}

/// Where queue `q`'s rings sit: 64 KiB apart from address 0.
#[derive(Debug, Clone, Copy)]
struct Rings {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Rings {
    fn new(q: usize, size: u16) -> Self {
        let desc = q as u64 * 0x1_0000;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        Self { desc, avail, used }
    }
}

/// The size of the drivers' guest memory.
const MEM_SIZE: u64 = 16 << 20;

/// Runs `f` on a thread and returns what it returns, failing the test after
/// 5 s: a device that spins on a ring fails rather than hangs the suite.
pub fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("the device spun instead of returning")
}

/// The driver side of a device's queues over 16 MiB of guest memory.
#[derive(Debug)]
pub struct Driver {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    rings: Vec<Rings>,
    size: u16,
    next_desc: Vec<u16>,
    pushed: Vec<u16>,
}

impl Driver {
    /// A driver for a single queue of `size` entries.
    pub fn new(size: u16) -> Self {
        Self::with_queues(size, 1)
    }

    /// A driver for `count` queues of `size` entries.
    pub fn with_queues(size: u16, count: usize) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let rings: Vec<Rings> = (0..count).map(|q| Rings::new(q, size)).collect();
        let queues = rings
            .iter()
            .map(|r| {
                let mut q = Queue::new(size).unwrap();
                q.set_size(size);
                q.try_set_desc_table_address(GuestAddress(r.desc)).unwrap();
                q.try_set_avail_ring_address(GuestAddress(r.avail)).unwrap();
                q.try_set_used_ring_address(GuestAddress(r.used)).unwrap();
                q.set_ready(true);
                q
            })
            .collect();
        Self {
            mem,
            queues,
            rings,
            size,
            next_desc: vec![0; count],
            pushed: vec![0; count],
        }
    }

    fn store_desc(&self, q: usize, idx: u16, d: Descriptor) {
        let at = self.rings[q].desc + 16 * u64::from(idx % self.size);
        self.mem
            .write_obj(RawDescriptor::from(d), GuestAddress(at))
            .unwrap();
    }

    fn make_available(&mut self, q: usize, head: u16) {
        let r = self.rings[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(r.avail + 2)).unwrap();
        let slot = r.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(r.avail + 2))
            .unwrap();
        self.pushed[q] += 1;
    }

    /// Makes a chain of `bufs` available on queue `q`.
    pub fn push_to(&mut self, q: usize, bufs: &[(u64, u32, bool)]) {
        let start = self.next_desc[q] % self.size;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (start + i as u16) % self.size;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store_desc(
                q,
                idx,
                Descriptor::new(addr, len, flags, (idx + 1) % self.size),
            );
        }
        self.next_desc[q] = self.next_desc[q].wrapping_add(bufs.len() as u16);
        self.make_available(q, start);
    }

    /// Makes a chain of `bufs` available on queue `q` through an indirect
    /// table written at `table`.
    pub fn push_indirect_to(&mut self, q: usize, table: u64, bufs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = Descriptor::new(addr, len, flags, i as u16 + 1);
            self.mem
                .write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc[q] % self.size;
        let len = 16 * bufs.len() as u32;
        self.store_desc(
            q,
            head,
            Descriptor::new(table, len, VRING_DESC_F_INDIRECT as u16, 0),
        );
        self.next_desc[q] = self.next_desc[q].wrapping_add(1);
        self.make_available(q, head);
    }

    /// Makes a chain available on queue 0.
    pub fn push(&mut self, bufs: &[(u64, u32, bool)]) {
        self.push_to(0, bufs)
    }

    /// Makes available a descriptor that chains to itself forever.
    pub fn push_looping(&mut self, buf: (u64, u32, bool)) {
        let idx = self.next_desc[0] % self.size;
        let flags = VRING_DESC_F_NEXT as u16 | if buf.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
        self.store_desc(0, idx, Descriptor::new(buf.0, buf.1, flags, idx));
        self.next_desc[0] = self.next_desc[0].wrapping_add(1);
        self.make_available(0, idx);
    }

    /// Turns on event-index notification suppression on every queue.
    pub fn enable_event_idx(&mut self) {
        for q in &mut self.queues {
            q.set_event_idx(true);
        }
    }

    /// The `avail_event` the device published on queue `q`: the driver
    /// kicks only when its avail index passes it.
    pub fn avail_event(&self, q: usize) -> u16 {
        let at = self.rings[q].used + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Claims `n` more chains are available on queue 0 than were made.
    pub fn lie_about_avail(&mut self, n: u16) {
        let r = self.rings[0];
        let idx: u16 = self.mem.read_obj(GuestAddress(r.avail + 2)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(n), GuestAddress(r.avail + 2))
            .unwrap();
    }

    /// Moves queue `q`'s avail ring to the last 4 bytes of memory, where only
    /// its flags and index fit, and claims a chain in it: a ring that says
    /// it holds something the device cannot read (the transport refuses such
    /// a queue; this bypasses it).
    pub fn put_avail_ring_past_the_end(&mut self, q: usize) {
        let at = MEM_SIZE - 4;
        self.queues[q]
            .try_set_avail_ring_address(GuestAddress(at))
            .unwrap();
        self.rings[q].avail = at;
        self.mem.write_obj(1u16, GuestAddress(at + 2)).unwrap();
    }

    /// Runs `backend` on queue `q`.
    pub fn run_queue<B: VirtioBackend>(
        &mut self,
        backend: &mut B,
        q: usize,
    ) -> Result<QueueMask, DeviceError> {
        backend.process_queue(q, &mut self.queues, &self.mem)
    }

    /// Runs `backend` on queue 0, expecting success.
    pub fn run<B: VirtioBackend>(&mut self, backend: &mut B) -> QueueMask {
        self.run_queue(backend, 0).expect("queue processing")
    }

    /// The queues (for host-fd-driven backends).
    pub fn queues(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// Chains made available on queue 0.
    pub fn pushed(&self) -> u16 {
        self.pushed[0]
    }

    /// The used index of queue `q`.
    pub fn used_idx_of(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    /// The used index of queue 0.
    pub fn used_idx(&self) -> u16 {
        self.used_idx_of(0)
    }

    /// The length of used element `n` of queue `q`.
    pub fn used_len_of(&self, q: usize, n: u16) -> u32 {
        let at = self.rings[q].used + 4 + 8 * u64::from(n % self.size) + 4;
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// The length of used element `n` of queue 0.
    pub fn used(&self, n: u16) -> u32 {
        self.used_len_of(0, n)
    }
}
