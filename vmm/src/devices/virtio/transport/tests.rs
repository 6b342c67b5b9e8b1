//! The transport driven the way Linux's virtio-pci driver drives it, with
//! the entropy device behind it and a fake VM recording routes and ioevents.

use super::*;
use crate::devices::fake::FakeVm;
use crate::devices::virtio::rng::Rng;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

/// Where guest RAM ends.
const RAM_END: u64 = 0x10_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_END as usize)]).unwrap()
}

fn device(m: &GuestMemoryMmap) -> (VirtioPci<Rng>, Arc<FakeVm>) {
    let vm = Arc::new(FakeVm::default());
    let d = VirtioPci::new(Rng::default(), m.clone(), vm.clone(), 0xc000_0000, 17).unwrap();
    (d, vm)
}

fn w32(d: &mut VirtioPci<Rng>, off: u64, v: u32) {
    d.bar_write(0, off, &v.to_le_bytes());
}
fn w16(d: &mut VirtioPci<Rng>, off: u64, v: u16) {
    d.bar_write(0, off, &v.to_le_bytes());
}
fn w8(d: &mut VirtioPci<Rng>, off: u64, v: u8) {
    d.bar_write(0, off, &[v]);
}
fn r32(d: &mut VirtioPci<Rng>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.bar_read(0, off, &mut b);
    u32::from_le_bytes(b)
}
fn r16(d: &mut VirtioPci<Rng>, off: u64) -> u16 {
    let mut b = [0u8; 2];
    d.bar_read(0, off, &mut b);
    u16::from_le_bytes(b)
}
fn r8(d: &mut VirtioPci<Rng>, off: u64) -> u8 {
    let mut b = [0u8; 1];
    d.bar_read(0, off, &mut b);
    b[0]
}

/// Negotiates VERSION_1 + EVENT_IDX and sets up queue 0 over `vq`.
fn bring_up(d: &mut VirtioPci<Rng>, vq: &MockSplitQueue<'_, GuestMemoryMmap>, msix: bool) {
    w8(d, 0x14, status::ACKNOWLEDGE);
    w8(d, 0x14, status::ACKNOWLEDGE | status::DRIVER);
    w32(d, 0x00, 1);
    let high = r32(d, 0x04);
    assert_ne!(high & 1, 0, "VERSION_1 offered");
    w32(d, 0x08, 1);
    w32(d, 0x0c, 1);
    w32(d, 0x08, 0);
    w32(d, 0x0c, 1 << VIRTIO_RING_F_EVENT_IDX);
    w8(
        d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(r8(d, 0x14) & status::FEATURES_OK, 0);
    w16(d, 0x16, 0);
    assert_eq!(r16(d, 0x18), 64, "max size offered");
    w16(d, 0x18, 16);
    if msix {
        w16(d, 0x10, 0);
        w16(d, 0x1a, 1);
        assert_eq!(r16(d, 0x1a), 1);
    }
    let (desc, avail, used) = (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
    w32(d, 0x20, desc as u32);
    w32(d, 0x24, (desc >> 32) as u32);
    w32(d, 0x28, avail as u32);
    w32(d, 0x2c, 0);
    w32(d, 0x30, used as u32);
    w32(d, 0x34, 0);
    w16(d, 0x1c, 1);
    w8(
        d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(d.active);
}

fn enable_msix(d: &mut VirtioPci<Rng>) {
    let cap = d.msix_cap;
    d.config_write(cap + 2, &0x8000u16.to_le_bytes());
    // Program and unmask vector 1 (queue 0).
    for (off, v) in [(16u64, 0xfee0_0000u32), (20, 0), (24, 0x31), (28, 0)] {
        w32(d, MSIX_TABLE_OFFSET + off, v);
    }
}

#[test]
fn queue_runs_and_interrupts_over_msix() {
    let m = mem();
    let (mut d, vm) = device(&m);
    // BAR 0 placed: one ioeventfd per queue at its notify address.
    d.bar_moved(0, None, Some(0xc000_0000));
    assert_eq!(
        *vm.ioevents.lock().unwrap(),
        vec![0xc000_0000 + NOTIFY_OFFSET]
    );
    let vq = MockSplitQueue::new(&m, 16);
    enable_msix(&mut d);
    bring_up(&mut d, &vq, true);
    let chain = [RawDescriptor::from(Descriptor::new(
        0x8_0000,
        32,
        VRING_DESC_F_WRITE as u16,
        0,
    ))];
    vq.add_desc_chains(&chain, 0).unwrap();
    // The driver's notification without an ioeventfd lands in the BAR.
    w16(&mut d, NOTIFY_OFFSET, 0);
    assert_eq!(
        d.queue_events[0].read().unwrap(),
        2,
        "activation kick + notify"
    );
    d.run_queue(0);
    let used_idx: u16 = m.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used_idx, 1);
    assert_eq!(d.backend().bytes_served, 32);
    assert_eq!(
        d.msix.irqfd(1).unwrap().read().unwrap(),
        1,
        "queue vector fired"
    );
    assert_eq!(vm.routes.lock().unwrap().len(), 1);
    // BAR moves: the ioeventfd follows.
    d.bar_moved(0, Some(0xc000_0000), Some(0xd000_0000));
    assert_eq!(
        *vm.ioevents.lock().unwrap(),
        vec![0xd000_0000 + NOTIFY_OFFSET]
    );
}

#[test]
fn intx_and_isr_without_msix() {
    let m = mem();
    let (mut d, _) = device(&m);
    let vq = MockSplitQueue::new(&m, 16);
    bring_up(&mut d, &vq, false);
    let chain = [RawDescriptor::from(Descriptor::new(
        0x8_0000,
        8,
        VRING_DESC_F_WRITE as u16,
        0,
    ))];
    vq.add_desc_chains(&chain, 0).unwrap();
    d.run_queue(0);
    assert!(d.intx.pending());
    assert_eq!(d.intx.irqfd().read().unwrap(), 1);
    // Reading ISR reports the queue interrupt once and lowers the line.
    assert_eq!(r8(&mut d, ISR_OFFSET), 1);
    assert_eq!(r8(&mut d, ISR_OFFSET), 0);
    assert!(!d.intx.pending());
}

#[test]
fn features_not_offered_are_refused() {
    let m = mem();
    let (mut d, _) = device(&m);
    w8(&mut d, 0x14, status::ACKNOWLEDGE | status::DRIVER);
    // VERSION_1 missing: legacy drivers are not served.
    w32(&mut d, 0x08, 0);
    w32(&mut d, 0x0c, 0);
    w8(
        &mut d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(r8(&mut d, 0x14) & status::FEATURES_OK, 0);
    // A bit the device never offered.
    w32(&mut d, 0x08, 1);
    w32(&mut d, 0x0c, 1 | 1 << 20);
    w8(
        &mut d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(r8(&mut d, 0x14) & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does not start the device.
    w8(
        &mut d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert!(!d.active);
}

#[test]
fn queue_registers_and_reset() {
    let m = mem();
    let (mut d, _) = device(&m);
    assert_eq!(r16(&mut d, 0x12), 1, "one queue");
    // Out-of-range selection reads as absent and ignores writes.
    w16(&mut d, 0x16, 5);
    assert_eq!(r16(&mut d, 0x18), 0);
    w16(&mut d, 0x1c, 1);
    // Invalid sizes are refused (not a power of two, above the maximum).
    w16(&mut d, 0x16, 0);
    w16(&mut d, 0x18, 48);
    assert_eq!(r16(&mut d, 0x18), 64);
    w16(&mut d, 0x18, 128);
    assert_eq!(r16(&mut d, 0x18), 64);
    // Vectors beyond the table read back as NO_VECTOR.
    w16(&mut d, 0x1a, 9);
    assert_eq!(r16(&mut d, 0x1a), NO_VECTOR);
    let vq = MockSplitQueue::new(&m, 16);
    bring_up(&mut d, &vq, false);
    let generation = r8(&mut d, 0x15);
    w8(&mut d, 0x14, 0);
    assert_eq!(r8(&mut d, 0x14), 0);
    assert_eq!(r16(&mut d, 0x1c), 0, "queue disabled by reset");
    assert_eq!(r8(&mut d, 0x15), generation.wrapping_add(1));
    assert!(!d.active);
}

#[test]
fn queue_addresses_in_halves_or_whole() {
    let m = mem();
    let (mut d, _) = device(&m);
    w16(&mut d, 0x16, 0);
    // Whole 64-bit write, then a high half, then a low half.
    d.bar_write(0, 0x20, &0x1_2345_6000u64.to_le_bytes());
    let mut q = [0u8; 8];
    d.bar_read(0, 0x20, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0x1_2345_6000);
    w32(&mut d, 0x24, 0x2);
    w32(&mut d, 0x20, 0x8000);
    d.bar_read(0, 0x20, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0x2_0000_8000);
    // Misaligned rings and bad sizes are refused: the old values stay.
    w32(&mut d, 0x30, 0x1001);
    assert_eq!(r32(&mut d, 0x30), 0);
    w16(&mut d, 0x18, 0);
    assert_eq!(r16(&mut d, 0x18), 64);
}

#[test]
fn corrupt_ring_needs_reset_and_stops() {
    let m = mem();
    let (mut d, _) = device(&m);
    let vq = MockSplitQueue::new(&m, 16);
    bring_up(&mut d, &vq, false);
    // The driver claims 100 buffers in a 16-entry ring.
    m.write_obj(100u16, vq.avail_addr().unchecked_add(2))
        .unwrap();
    d.run_queue(0);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
    assert!(!d.active);
    assert_eq!(r8(&mut d, ISR_OFFSET) & 2, 2, "config change signalled");
    // A reset brings it back.
    w8(&mut d, 0x14, 0);
    m.write_obj(0u16, vq.avail_addr().unchecked_add(2)).unwrap();
    bring_up(&mut d, &vq, false);
    assert_eq!(d.status() & status::NEEDS_RESET, 0);
}

#[test]
fn rings_outside_memory_fail_activation() {
    let m = mem();
    let (mut d, _) = device(&m);
    w8(&mut d, 0x14, status::ACKNOWLEDGE | status::DRIVER);
    w32(&mut d, 0x08, 1);
    w32(&mut d, 0x0c, 1);
    w8(
        &mut d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    w16(&mut d, 0x16, 0);
    w32(&mut d, 0x20, 0xfff0_0000);
    w16(&mut d, 0x1c, 1);
    w8(
        &mut d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(!d.active);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
}

#[test]
fn config_space_capabilities() {
    let m = mem();
    let (mut d, _) = device(&m);
    let c = d.config().clone();
    assert_eq!(c.read(0), 0x1044_1af4, "modern virtio-rng");
    // Walk the capability list: MSI-X then the five virtio structures.
    let mut at = c.byte(reg::CAP_PTR) as usize;
    let mut kinds = vec![];
    while at != 0 {
        kinds.push(if c.byte(at) == CAP_VENDOR {
            c.byte(at + 3)
        } else {
            c.byte(at)
        });
        at = c.byte(at + 1) as usize;
    }
    assert_eq!(
        kinds,
        vec![
            0x11,
            CAP_COMMON,
            CAP_NOTIFY,
            CAP_ISR,
            CAP_DEVICE,
            CAP_PCI_CFG
        ]
    );
    // Through the PCI configuration access capability, read num_queues.
    let p = d.pci_cfg_cap;
    d.config_write(p + 4, &[0]);
    d.config_write(p + 8, &0x12u32.to_le_bytes());
    d.config_write(p + 12, &2u32.to_le_bytes());
    assert_eq!(d.config_read(p + 16) & 0xffff, 1);
}

#[test]
fn a_queue_enabled_after_driver_ok_with_rings_outside_memory_fails_the_device() {
    let m = mem();
    let (mut d, _) = device(&m);
    w8(&mut d, 0x14, status::ACKNOWLEDGE | status::DRIVER);
    w32(&mut d, 0x08, 1);
    w32(&mut d, 0x0c, 1);
    w8(
        &mut d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    // DRIVER_OK with no queue enabled: activation has nothing to check.
    w8(
        &mut d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(d.active);
    let end = RAM_END;
    w16(&mut d, 0x16, 0);
    w32(&mut d, 0x20, 0x1000);
    w32(&mut d, 0x30, 0x2000);
    // Only the avail ring's flags and index are in memory, not its entries.
    w32(&mut d, 0x28, (end - 4) as u32);
    m.write_obj(1u16, GuestAddress(end - 2)).unwrap();
    w16(&mut d, 0x1c, 1);
    w16(&mut d, NOTIFY_OFFSET, 0);
    let mut d = crate::devices::virtio::testing::within_5s(move || {
        d.run_queue(0);
        d
    });
    assert_eq!(r16(&mut d, 0x1c), 0, "the queue was refused");
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
    assert!(!d.active);
}

#[test]
fn a_queue_enabled_before_driver_ok_with_rings_outside_memory_is_refused() {
    let m = mem();
    let (mut d, _) = device(&m);
    let end = RAM_END;
    w16(&mut d, 0x16, 0);
    w32(&mut d, 0x28, (end - 4) as u32);
    w16(&mut d, 0x1c, 1);
    assert_eq!(r16(&mut d, 0x1c), 0, "the driver reads the refusal back");
    assert_eq!(d.status() & status::NEEDS_RESET, 0);
    // Rings moved into memory are taken, and the device starts.
    let vq = MockSplitQueue::new(&m, 16);
    bring_up(&mut d, &vq, false);
    assert_eq!(r16(&mut d, 0x1c), 1);
    assert_eq!(d.status() & status::NEEDS_RESET, 0);
}
