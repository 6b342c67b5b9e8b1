use std::fs::File;
use std::sync::Mutex;

use event_manager::{EventManager, SubscriberOps};

use super::*;
use crate::devices::fake::FakeVm;
use crate::devices::pci::config::STATUS_INTERRUPT;

const BAR0: u64 = 0xc000_0000;
const BAR2: u64 = 0x1_0000_0000;

struct Rig {
    dev: Arc<Mutex<ChannelDevice>>,
    vm: Arc<FakeVm>,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    /// Rings this device (the other VM's doorbell).
    other_rings: EventFd,
    /// What this guest's doorbell signals (the other VMM watches it).
    our_doorbell: EventFd,
}

fn memfd(len: u64) -> File {
    let fd = rustix::fs::memfd_create("test-region", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let f = File::from(fd);
    f.set_len(len).unwrap();
    f
}

fn rig(len: u64) -> Rig {
    let ours = p2pvm_channel::event::eventfd().unwrap();
    let peer = p2pvm_channel::event::eventfd().unwrap();
    let other_rings = eventfd_from(ours.try_clone().unwrap());
    let our_doorbell = eventfd_from(peer.try_clone().unwrap());
    let grant = Grant {
        region: memfd(len),
        ours,
        peer,
    };
    let vm = Arc::new(FakeVm::default());
    let ops: Arc<dyn VmOps> = vm.clone();
    let dev = ChannelDevice::new(grant, Side::Driver, ops, BAR0, BAR2, 17).unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let mut events = EventManager::new().unwrap();
    let sub: Arc<Mutex<dyn MutEventSubscriber + Send>> = dev.clone();
    events.add_subscriber(sub);
    Rig {
        dev,
        vm,
        events,
        other_rings,
        our_doorbell,
    }
}

fn read32(dev: &Arc<Mutex<ChannelDevice>>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.lock().unwrap().bar_read(REGISTER_BAR, off, &mut b);
    u32::from_le_bytes(b)
}

fn write32(dev: &Arc<Mutex<ChannelDevice>>, off: u64, v: u32) {
    dev.lock()
        .unwrap()
        .bar_write(REGISTER_BAR, off, &v.to_le_bytes());
}

fn line_raised(dev: &Arc<Mutex<ChannelDevice>>) -> bool {
    dev.lock().unwrap().intx.irqfd().read().is_ok()
}

fn turn(r: &mut Rig) -> usize {
    r.events.run_with_timeout(0).unwrap()
}

#[test]
fn identity_and_bars() {
    let r = rig(64 << 20);
    let d = r.dev.lock().unwrap();
    let c = d.config();
    assert_eq!(
        c.read(reg::ID),
        u32::from(DEVICE_ID) << 16 | u32::from(VENDOR_ID)
    );
    assert_eq!(c.byte(reg::INTERRUPT + 1), 1, "INTA#");
    assert_eq!(c.bar(REGISTER_BAR).unwrap().size, REGISTER_BAR_SIZE);
    let b2 = c.bar(REGION_BAR).unwrap();
    assert_eq!(
        (b2.size, b2.kind, b2.prefetchable),
        (64 << 20, BarKind::Mem64, true)
    );
    assert_eq!(c.bar_address(REGION_BAR), Some(BAR2));
    assert_eq!(d.region_size(), 64 << 20);
}

#[test]
fn a_region_that_is_no_bar_is_refused() {
    let grant = Grant {
        region: memfd(3 << 20),
        ours: p2pvm_channel::event::eventfd().unwrap(),
        peer: p2pvm_channel::event::eventfd().unwrap(),
    };
    let vm: Arc<dyn VmOps> = Arc::new(FakeVm::default());
    let e = ChannelDevice::new(grant, Side::Device, vm, BAR0, BAR2, 17).unwrap_err();
    assert!(
        matches!(e, ChannelDeviceError::RegionSize(n) if n == 3 << 20),
        "{e}"
    );
}

#[test]
fn the_region_follows_its_bar_as_a_memory_slot() {
    let r = rig(1 << 20);
    r.dev
        .lock()
        .unwrap()
        .bar_moved(REGION_BAR, None, Some(BAR2));
    let slots = r.vm.slots.lock().unwrap().clone();
    assert_eq!(
        slots.values().copied().collect::<Vec<_>>(),
        vec![(BAR2, 1 << 20)]
    );
    r.dev
        .lock()
        .unwrap()
        .bar_moved(REGION_BAR, Some(BAR2), Some(BAR2 + (1 << 30)));
    let slots = r.vm.slots.lock().unwrap().clone();
    assert_eq!(
        slots.values().copied().collect::<Vec<_>>(),
        vec![(BAR2 + (1 << 30), 1 << 20)]
    );
    // Memory decoding off: no slot at all.
    r.dev
        .lock()
        .unwrap()
        .bar_moved(REGION_BAR, Some(BAR2 + (1 << 30)), None);
    assert!(r.vm.slots.lock().unwrap().is_empty());
}

#[test]
fn the_doorbell_is_an_ioeventfd_that_follows_bar0() {
    let r = rig(1 << 20);
    r.dev
        .lock()
        .unwrap()
        .bar_moved(REGISTER_BAR, None, Some(BAR0));
    assert_eq!(*r.vm.ioevents.lock().unwrap(), vec![BAR0 + regs::DOORBELL]);
    r.dev
        .lock()
        .unwrap()
        .bar_moved(REGISTER_BAR, Some(BAR0), Some(BAR0 + 0x1000));
    assert_eq!(
        *r.vm.ioevents.lock().unwrap(),
        vec![BAR0 + 0x1000 + regs::DOORBELL]
    );
    // A write the ioeventfd did not catch still rings the other side.
    write32(&r.dev, regs::DOORBELL, 7);
    assert_eq!(r.our_doorbell.read().unwrap(), 1);
}

#[test]
fn a_ring_raises_intx_with_the_pci23_status_until_acknowledged() {
    let mut r = rig(1 << 20);
    assert_eq!(read32(&r.dev, regs::IV_POSITION), POSITION_DRIVER);
    // Masked: the status records the ring, the line stays low.
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1);
    assert!(!line_raised(&r.dev));
    // Unmasking delivers it.
    write32(&r.dev, regs::INTR_MASK, 1);
    assert!(line_raised(&r.dev));
    let status = r.dev.lock().unwrap().config().word(reg::COMMAND + 2);
    assert_ne!(status & STATUS_INTERRUPT, 0, "PCI 2.3 interrupt status");
    // Reading the status acknowledges: cleared, and the PCI bit with it.
    assert_eq!(read32(&r.dev, regs::INTR_STATUS), 1);
    assert_eq!(read32(&r.dev, regs::INTR_STATUS), 0);
    let status = r.dev.lock().unwrap().config().word(reg::COMMAND + 2);
    assert_eq!(status & STATUS_INTERRUPT, 0);
}

#[test]
fn a_ring_while_intx_is_disabled_is_delivered_when_reenabled() {
    let mut r = rig(1 << 20);
    write32(&r.dev, regs::INTR_MASK, 1);
    // uio_pci_generic's handler sets INTx-disable.
    let cmd = COMMAND_MEMORY | super::super::pci::config::COMMAND_INTX_DISABLE;
    r.dev
        .lock()
        .unwrap()
        .config_write(reg::COMMAND, &cmd.to_le_bytes());
    r.other_rings.write(1).unwrap();
    turn(&mut r);
    assert!(!line_raised(&r.dev), "disabled");
    r.dev
        .lock()
        .unwrap()
        .config_write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
    assert!(line_raised(&r.dev), "re-enabled with the ring pending");
}

#[test]
fn enabling_intx_after_the_handler_disabled_it_acknowledges() {
    let mut r = rig(1 << 20);
    write32(&r.dev, regs::INTR_MASK, 1);
    let disabled = COMMAND_MEMORY | super::super::pci::config::COMMAND_INTX_DISABLE;
    let set_command = |r: &Rig, v: u16| {
        r.dev
            .lock()
            .unwrap()
            .config_write(reg::COMMAND, &v.to_le_bytes())
    };
    for round in 0..3 {
        r.other_rings.write(1).unwrap();
        // (After the last round's status read, the re-arm comes first.)
        for _ in 0..3 {
            turn(&mut r);
        }
        assert!(line_raised(&r.dev), "round {round}: delivered");
        // uio_pci_generic's handler, then the driver's one config write.
        set_command(&r, disabled);
        // A ring meanwhile waits in the eventfd (the bell is not watched).
        r.other_rings.write(1).unwrap();
        assert_eq!(turn(&mut r), 0);
        set_command(&r, COMMAND_MEMORY);
        assert_eq!(r.dev.lock().unwrap().status, 0, "acknowledged");
        // The re-arm brings the waiting ring as a new interrupt.
        let mut woke = 0;
        for _ in 0..3 {
            woke += turn(&mut r);
        }
        assert_eq!(woke, 2, "round {round}: the re-arm, then the ring");
        assert!(
            line_raised(&r.dev),
            "round {round}: the waiting ring delivered"
        );
        assert_eq!(read32(&r.dev, regs::INTR_STATUS), 1);
    }
}

#[test]
fn a_storm_costs_one_wakeup_per_acknowledgment() {
    let mut r = rig(1 << 20);
    write32(&r.dev, regs::INTR_MASK, 1);
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1);
    assert!(line_raised(&r.dev));
    // The other guest keeps ringing: nothing wakes this VMM.
    for _ in 0..1000 {
        r.other_rings.write(1).unwrap();
        assert_eq!(turn(&mut r), 0);
    }
    assert!(!line_raised(&r.dev));
    // The guest acknowledges: the rings that waited arrive as one.
    assert_eq!(read32(&r.dev, regs::INTR_STATUS), 1);
    let mut woke = 0;
    for _ in 0..4 {
        woke += turn(&mut r);
    }
    assert_eq!(woke, 2, "the re-arm, then one ring for the thousand");
    assert!(line_raised(&r.dev));
    assert_eq!(read32(&r.dev, regs::INTR_STATUS), 1);
}

#[test]
fn odd_register_accesses_change_nothing() {
    let r = rig(1 << 20);
    let mut d = r.dev.lock().unwrap();
    for (off, len) in [
        (1u64, 4usize),
        (2, 2),
        (0x10, 4),
        (0xffc, 4),
        (u64::MAX - 3, 4),
        (0, 0),
        (0, 8),
    ] {
        d.bar_write(REGISTER_BAR, off, &vec![0xff; len]);
        let mut b = vec![0xaa; len];
        d.bar_read(REGISTER_BAR, off, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{off:#x}/{len}: {b:?}");
    }
    // Position and status are read-only.
    d.bar_write(REGISTER_BAR, regs::IV_POSITION, &5u32.to_le_bytes());
    d.bar_write(REGISTER_BAR, regs::INTR_STATUS, &1u32.to_le_bytes());
    drop(d);
    assert_eq!(read32(&r.dev, regs::IV_POSITION), POSITION_DRIVER);
    assert_eq!(read32(&r.dev, regs::INTR_STATUS), 0);
    assert_eq!(read32(&r.dev, regs::INTR_MASK), 0);
    // Accesses to the region BAR (only possible while its slot is missing)
    // read as zero and write nothing.
    let mut b = [0xaau8; 8];
    r.dev.lock().unwrap().bar_read(REGION_BAR, 0, &mut b);
    assert_eq!(b, [0; 8]);
}

/// Enables MSI-X as Linux does: the capability's enable bit, then vector 0's
/// address and data, unmasked.
fn enable_msix(r: &Rig) {
    let mut d = r.dev.lock().unwrap();
    let cap = d.msix_cap;
    assert_eq!(d.config().byte(cap), msix::CAP_ID);
    d.config_write(cap + 2, &(1u16 << 15).to_le_bytes());
    let entry = |d: &mut ChannelDevice, field: u64, v: u32| {
        d.bar_write(REGISTER_BAR, MSIX_TABLE_OFFSET + field, &v.to_le_bytes())
    };
    entry(&mut d, 0, 0xfee0_0000);
    entry(&mut d, 4, 0);
    entry(&mut d, 8, 0x4041);
    entry(&mut d, 12, 0);
}

fn message_sent(r: &Rig) -> bool {
    r.dev.lock().unwrap().msix.irqfd(0).unwrap().read().is_ok()
}

/// Whether KVM holds the bell as an irqfd (on the vector's GSI).
fn bell_in_kvm(r: &Rig) -> bool {
    let d = r.dev.lock().unwrap();
    let bell = d.bell.as_raw_fd();
    let gsi = d.bell_gsi;
    let held =
        r.vm.irqfd_fds
            .lock()
            .unwrap()
            .iter()
            .any(|(fd, _)| *fd == bell);
    assert_eq!(held, gsi.is_some(), "the device knows where its bell is");
    held
}

fn mask_vector(r: &Rig, masked: bool) {
    r.dev.lock().unwrap().bar_write(
        REGISTER_BAR,
        MSIX_TABLE_OFFSET + 12,
        &u32::from(masked).to_le_bytes(),
    )
}

#[test]
fn with_msix_the_bell_is_the_vectors_irqfd_and_this_vmm_never_wakes() {
    let mut r = rig(1 << 20);
    enable_msix(&r);
    write32(&r.dev, regs::INTR_MASK, 1);
    let gsi = *r.vm.routes.lock().unwrap().keys().next().expect("a route");
    assert_eq!(r.vm.routes.lock().unwrap()[&gsi].data, 0x4041);
    assert!(bell_in_kvm(&r));
    assert_eq!(
        r.dev.lock().unwrap().bell_gsi,
        Some(gsi),
        "on the vector's GSI"
    );
    turn(&mut r); // the event loop lets go of the bell
    for round in 0..3 {
        r.other_rings.write(1).unwrap();
        assert_eq!(turn(&mut r), 0, "round {round}: KVM takes the ring");
        assert!(!line_raised(&r.dev), "round {round}: not the line");
    }
    // No status read, no INTx write: the guest never exits for a ring.
    assert_eq!(r.dev.lock().unwrap().status, 0);
}

#[test]
fn with_msix_but_interrupts_masked_the_ring_waits_in_the_status() {
    let mut r = rig(1 << 20);
    enable_msix(&r);
    assert!(!bell_in_kvm(&r), "the interrupt mask register is still 0");
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1, "this VMM watches the bell");
    assert!(!message_sent(&r));
    assert_eq!(r.dev.lock().unwrap().status, 1);
    write32(&r.dev, regs::INTR_MASK, 1);
    assert!(message_sent(&r), "the held ring goes out when unmasked");
    assert!(bell_in_kvm(&r));
}

#[test]
fn a_masked_vector_takes_the_bell_back_and_holds_the_ring_in_the_pba() {
    let mut r = rig(1 << 20);
    enable_msix(&r);
    write32(&r.dev, regs::INTR_MASK, 1);
    assert!(bell_in_kvm(&r));
    mask_vector(&r, true);
    assert!(!bell_in_kvm(&r), "a masked vector must not reach the guest");
    turn(&mut r); // the re-arm
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1, "this VMM watches the bell again");
    assert!(!message_sent(&r));
    let mut pba = [0u8; 8];
    r.dev
        .lock()
        .unwrap()
        .bar_read(REGISTER_BAR, MSIX_PBA_OFFSET, &mut pba);
    assert_eq!(pba[0] & 1, 1, "pending");
    mask_vector(&r, false);
    assert!(message_sent(&r), "delivered on unmask");
    assert!(bell_in_kvm(&r), "and KVM holds the bell again");
}

#[test]
fn turning_msix_off_takes_the_bell_back_for_intx() {
    let mut r = rig(1 << 20);
    enable_msix(&r);
    write32(&r.dev, regs::INTR_MASK, 1);
    assert!(bell_in_kvm(&r));
    let cap = r.dev.lock().unwrap().msix_cap;
    r.dev
        .lock()
        .unwrap()
        .config_write(cap + 2, &0u16.to_le_bytes());
    assert!(!bell_in_kvm(&r));
    turn(&mut r);
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1);
    assert!(line_raised(&r.dev), "INTx again");
}

#[test]
fn enabling_msix_while_an_intx_acknowledgment_is_awaited_hands_the_bell_to_kvm() {
    let mut r = rig(1 << 20);
    write32(&r.dev, regs::INTR_MASK, 1);
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1);
    assert!(line_raised(&r.dev));
    // Unwatched now (INTx). The guest switches to MSI-X instead of acknowledging.
    enable_msix(&r);
    assert!(bell_in_kvm(&r));
    assert!(!r.dev.lock().unwrap().awaiting_ack);
    let status = r.dev.lock().unwrap().config().word(reg::COMMAND + 2);
    assert_eq!(status & STATUS_INTERRUPT, 0, "the line was lowered");
    r.other_rings.write(1).unwrap();
    let mut woke = 0;
    for _ in 0..3 {
        woke += turn(&mut r);
    }
    assert_eq!(woke, 1, "the re-arm only: KVM takes the ring");
}

#[test]
fn with_msix_a_held_ring_stops_the_bell_waking_this_vmm() {
    // Interrupt mask register 0: the ring waits in the status.
    let mut r = rig(1 << 20);
    enable_msix(&r);
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1);
    for _ in 0..1000 {
        r.other_rings.write(1).unwrap();
        assert_eq!(turn(&mut r), 0, "a held ring: more rings add nothing");
    }
    write32(&r.dev, regs::INTR_MASK, 1);
    assert!(message_sent(&r), "the held ring goes out when unmasked");
    assert!(bell_in_kvm(&r));
}

#[test]
fn with_msix_a_ring_pending_on_a_masked_vector_stops_the_bell_waking_this_vmm() {
    let mut r = rig(1 << 20);
    enable_msix(&r);
    write32(&r.dev, regs::INTR_MASK, 1);
    mask_vector(&r, true);
    turn(&mut r); // the re-arm
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1);
    for _ in 0..1000 {
        r.other_rings.write(1).unwrap();
        assert_eq!(turn(&mut r), 0, "pending: more rings add nothing");
    }
    mask_vector(&r, false);
    assert!(message_sent(&r), "delivered on unmask");
    assert!(bell_in_kvm(&r));
}

#[test]
fn with_msix_and_the_status_read_a_held_bell_is_watched_again() {
    let mut r = rig(1 << 20);
    enable_msix(&r);
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 1);
    r.other_rings.write(1).unwrap();
    assert_eq!(turn(&mut r), 0);
    assert_eq!(read32(&r.dev, regs::INTR_STATUS), 1);
    let mut woke = 0;
    for _ in 0..4 {
        woke += turn(&mut r);
    }
    assert_eq!(woke, 2, "the re-arm, then the ring that waited");
    assert_eq!(read32(&r.dev, regs::INTR_STATUS), 1);
}

#[test]
fn with_msix_but_no_irqfd_every_ring_is_still_relayed() {
    let mut r = rig(1 << 20);
    // KVM refuses the bell as an irqfd: rings pass through this VMM.
    let bell = r.dev.lock().unwrap().bell.as_raw_fd();
    r.vm.irqfd_fds.lock().unwrap().push((bell, 0));
    enable_msix(&r);
    write32(&r.dev, regs::INTR_MASK, 1);
    assert_eq!(r.dev.lock().unwrap().bell_gsi, None);
    turn(&mut r); // the re-arm
    for round in 0..3 {
        r.other_rings.write(1).unwrap();
        assert_eq!(turn(&mut r), 1, "round {round}");
        assert!(message_sent(&r), "round {round}: relayed");
    }
}
