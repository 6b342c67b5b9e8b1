//! Fuzz bodies: what a hostile guest controls, thrown at the device models.
//! Used by the `cargo fuzz` targets in `fuzz/` and by property tests in CI.
//!
//! - [`virtio_blk`], [`virtio_net`]: arbitrary guest memory (descriptor
//!   table, rings, buffers) under a queue, processed by the device. The
//!   device must not panic, loop, touch memory outside the guest's (vm-memory
//!   refuses, and the sanitizer would see it), or write the disk outside the
//!   image.
//! - [`pci_config`]: arbitrary configuration-space, BAR and MSI-X accesses
//!   through 0xcf8/0xcfc, ECAM and the MMIO bus to a virtio-pci function.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::bus::{Bus, BusDevice};
use crate::devices::fake::FakeVm;
use crate::devices::pci::root::{PciConfigIo, PciConfigMmio, PciHandle, PciRoot};
use crate::devices::virtio::VirtioBackend;
use crate::devices::virtio::blk::{Block, SECTOR_SIZE};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::transport::VirtioPci;

/// Guest memory the fuzzed queues live in.
const MEM_BYTES: usize = 1 << 20;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x4000;

/// Guest memory filled from `data` (the rest zero), and queues over it
/// whose size comes from the first byte.
fn guest(data: &[u8], queues: usize) -> Option<(GuestMemoryMmap, Vec<Queue>)> {
    let (&size_sel, rest) = data.split_first()?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).ok()?;
    let n = rest.len().min(MEM_BYTES);
    mem.write_slice(&rest[..n], GuestAddress(0)).ok()?;
    let size = 1u16 << (size_sel % 9);
    let mut qs = Vec::new();
    for q in 0..queues as u64 {
        let mut queue = Queue::new(256).ok()?;
        queue.set_size(size);
        queue.set_desc_table_address(Some((DESC + q * 0x1000) as u32), Some(0));
        queue.set_avail_ring_address(Some((AVAIL + q * 0x800) as u32), Some(0));
        queue.set_used_ring_address(Some((USED + q * 0x800) as u32), Some(0));
        queue.set_event_idx(size_sel & 0x80 != 0);
        queue.set_ready(true);
        qs.push(queue);
    }
    Some((mem, qs))
}

/// virtio-blk over arbitrary guest memory.
pub fn virtio_blk(data: &[u8]) {
    let Some((mem, mut queues)) = guest(data, 1) else {
        return;
    };
    let Ok(file) = tempfile::NamedTempFile::new() else {
        return;
    };
    let disk_len = 64 * SECTOR_SIZE;
    if file.as_file().set_len(disk_len).is_err() {
        return;
    }
    let read_only = data.get(1).is_some_and(|b| b & 1 == 1);
    let Ok(mut blk) = Block::open(file.path(), read_only) else {
        return;
    };
    // Twice: the second pass sees what the first left in the used ring.
    for _ in 0..2 {
        let _ = blk.process_queue(0, &mut queues, &mem);
    }
    let len = std::fs::metadata(file.path()).map(|m| m.len()).unwrap_or(0);
    assert_eq!(len, disk_len, "the guest grew or shrank the disk image");
}

/// virtio-net over arbitrary guest memory, with a packet waiting on the host
/// side taken from the input too — twice, so that a large first one sends the
/// second straight into guest buffers (`Net::receive_direct`).
pub fn virtio_net(data: &[u8]) {
    let Some((mem, mut queues)) = guest(data, 2) else {
        return;
    };
    let Ok((ours, theirs)) = UnixDatagram::pair() else {
        return;
    };
    if ours.set_nonblocking(true).is_err() || theirs.set_nonblocking(true).is_err() {
        return;
    }
    let packet_len = data.get(2).map_or(0, |b| usize::from(*b) * 256);
    let packet: Vec<u8> = data.iter().cycle().take(packet_len).copied().collect();
    let _ = theirs.send(&packet);
    let _ = theirs.send(&packet);
    let mut net = Net::with_host_end(File::from(OwnedFd::from(ours)), [2, 0, 0, 0, 0, 1], false);
    let features = u64::from(data.get(3).copied().unwrap_or(0)) << 8 | 1 << 15;
    let _ = net.activate(features);
    for q in [1usize, 0, 1] {
        let _ = net.process_queue(q, &mut queues, &mem);
    }
    let fd = {
        use std::os::fd::AsRawFd;
        theirs.as_raw_fd()
    };
    for _ in 0..2 {
        let _ = net.host_fd_ready(fd, event_manager::EventSet::IN, &mut queues, &mem);
    }
    // Drain what reached the "host"; each datagram is one whole packet.
    let mut buf = vec![0u8; 70_000];
    while let Ok(n) = theirs.recv(&mut buf) {
        assert!(
            n >= 12,
            "a packet shorter than its virtio-net header reached the host"
        );
    }
}

/// Arbitrary accesses to a virtio-pci function through every way a guest has.
pub fn pci_config(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]) else {
        return;
    };
    let vm = Arc::new(FakeVm::default());
    let Ok(dev) = VirtioPci::new(Rng::default(), mem, vm, 0xc000_0000, 17) else {
        return;
    };
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(Mutex::new(PciRoot::new(&mmio)));
    let handle: PciHandle = Arc::new(Mutex::new(dev));
    if crate::devices::bus::lock(&root).add(handle).is_err() {
        return;
    }
    let io = PciConfigIo(root.clone());
    let ecam = PciConfigMmio(root);
    // Ops of 8 bytes: kind, width, 2 bytes of offset, 4 bytes of value.
    for op in data.chunks_exact(8) {
        let len = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let offset = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let value = u64::from(u32::from_le_bytes([op[4], op[5], op[6], op[7]])) * 0x1_0000_0001;
        let bytes = value.to_le_bytes();
        let mut out = [0u8; 8];
        match op[0] % 6 {
            0 => io.write(offset % 8, &bytes[..len.min(4)]),
            1 => io.read(offset % 8, &mut out[..len.min(4)]),
            2 => ecam.write(offset | 1 << 15, &bytes[..len.min(4)]),
            3 => ecam.read(offset | 1 << 15, &mut out[..len.min(4)]),
            // BAR 0 wherever the guest put it (or nowhere).
            4 => {
                let _ = mmio.write(0xc000_0000 + offset % 0x8000, &bytes[..len]);
            }
            _ => {
                let _ = mmio.read(0xc000_0000 + offset % 0x8000, &mut out[..len]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn blk_survives_any_guest_memory(data in proptest::collection::vec(any::<u8>(), 0..9000)) {
            virtio_blk(&data);
        }

        #[test]
        fn net_survives_any_guest_memory(data in proptest::collection::vec(any::<u8>(), 0..9000)) {
            virtio_net(&data);
        }

        #[test]
        fn pci_survives_any_access(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            pci_config(&data);
        }
    }

    /// Random bytes rarely form valid chains; these do, with hostile buffers.
    #[test]
    fn structured_hostile_chains() {
        let mut data = vec![4u8]; // queue size 16
        let mut mem = vec![0u8; 0x5000];
        // Descriptor 0: header readable at 0x8000 len 16, next 1.
        // Descriptor 1: writable huge length at the end of memory, next 2.
        // Descriptor 2: loops to 1.
        let descs: [(u64, u32, u16, u16); 3] = [
            (0x8000, 16, 1, 1),
            ((MEM_BYTES - 8) as u64, u32::MAX, 3, 2),
            (0x9000, 512, 3, 1),
        ];
        for (i, (a, l, f, n)) in descs.iter().enumerate() {
            let at = DESC as usize + 16 * i;
            mem[at..at + 8].copy_from_slice(&a.to_le_bytes());
            mem[at + 8..at + 12].copy_from_slice(&l.to_le_bytes());
            mem[at + 12..at + 14].copy_from_slice(&f.to_le_bytes());
            mem[at + 14..at + 16].copy_from_slice(&n.to_le_bytes());
        }
        mem[AVAIL as usize + 2] = 1;
        data.extend(mem);
        virtio_blk(&data);
        virtio_net(&data);
    }
}
