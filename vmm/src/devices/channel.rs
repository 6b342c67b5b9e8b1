//! The inter-VM channel device: one PCI function in each of the two VMs.
//! Its BAR 2 is the shared region — the supervisor's sealed memfd, mapped
//! into this guest as a KVM memory slot, the only memory the two VMs share —
//! and its BAR 0 holds ivshmem-style registers (see `p2pvm_channel::pci` for
//! the guest's view and `docs/channel.md` for the contract).
//!
//! Event channels live here, in the VMMs, and cross between their two
//! processes as a pair of eventfds from the broker:
//!
//! ```text
//!  guest A doorbell ─ ioeventfd (KVM, no exit) ─► eventfd "ring" of VMM A
//!        = eventfd "bell" of VMM B ─┬─ irqfd of MSI-X vector 0 (KVM) ─────────► guest B
//!                                   └─ VMM B: IntrStatus := 1 ─► INTx (irqfd + resample)
//! ```
//!
//! The VMM never reads or writes the region's contents.
//!
//! Two ways to interrupt the guest. **MSI-X** (one vector, table and PBA in
//! BAR 0), which our guest module `p2pvm_channel` enables: an edge-triggered
//! message that the guest needs no register access to take, so an interrupt
//! costs it no exit to this VMM. While the guest can take the message (MSI-X
//! on, vector and function unmasked, the interrupt mask register set), the
//! bell itself is the vector's irqfd: the other guest's doorbell write
//! becomes this guest's interrupt inside KVM, and neither VMM process runs —
//! ivshmem's doorbell-to-irqfd wiring. Otherwise the bell goes back to this
//! device's event loop, which keeps a ring pending (status, PBA) until the
//! guest can take it. The interrupt status register then only counts rings
//! the VMM saw; an MSI-X driver does not read it. **INTx** with the PCI 2.3
//! status and disable bits, for Debian's stock `uio_pci_generic`.
//!
//! An interrupt storm is bounded by the receiver. With INTx, once the bell
//! has raised the interrupt, this device stops watching it until its own
//! guest acknowledges — reads the interrupt status, or enables INTx again
//! after `uio_pci_generic` disabled it: however fast the other guest rings,
//! this guest is interrupted at most once per acknowledgment it chooses to
//! make, and the doorbells in between only add to an eventfd counter. With
//! MSI-X there is no acknowledgment to wait for, but messages that arrive
//! while the guest has not yet taken the last one merge in its local APIC
//! (one pending bit per vector), so the guest still takes at most one
//! interrupt per handler run, and a ringing guest costs this VMM nothing
//! (KVM delivers the message) — the ringing guest pays an exit of its own
//! for each ring. While the guest cannot take the message, the first ring is
//! held (status, PBA) and the bell is left unwatched until the guest can
//! take it or reads the status: further rings would add nothing to the held
//! one, so they wait in the eventfd's counter rather than wake this VMM.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use p2pvm_channel::pci::{
    CLASS_CODE, DEVICE_ID, POSITION_DEVICE, POSITION_DRIVER, REGION_BAR, REGISTER_BAR,
    REGISTER_BAR_SIZE, VENDOR_ID, reg as regs,
};
use p2pvm_channel::{Grant, Side};
use vmm_sys_util::eventfd::EventFd;

use super::pci::config::{Bar, BarKind, COMMAND_MEMORY, ConfigSpace, Header, reg};
use super::pci::intx::Intx;
use super::pci::msix::{self, Msix};
use super::pci::root::PciDevice;
use super::{MmapRegion, VmOps, le_value, put_le_value};

/// Why the device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChannelDeviceError {
    /// The region is not a power of two of at least 4 KiB.
    #[error("the channel region is {0} bytes: a BAR needs a power of two of at least 4 KiB")]
    RegionSize(u64),
    /// Mapping the region, making eventfds or declaring BARs failed.
    #[error("{0}: {1}")]
    Setup(&'static str, String),
}

/// Where MSI-X's vector table lies in the register BAR.
const MSIX_TABLE_OFFSET: u64 = 0x800;
/// Where MSI-X's pending-bit array lies in the register BAR.
const MSIX_PBA_OFFSET: u64 = 0xc00;

/// The channel's PCI function.
pub struct ChannelDevice {
    config: ConfigSpace,
    vm: Arc<dyn VmOps>,
    intx: Intx,
    msix: Msix,
    msix_cap: usize,
    /// The region, mapped in this process only to hand it to KVM.
    region: Arc<MmapRegion>,
    region_slot: Option<u32>,
    /// Rung by the other VM (its doorbell's ioeventfd in its VMM).
    bell: EventFd,
    /// This guest's doorbell: an ioeventfd; the other VMM watches it.
    ring: EventFd,
    /// Where the doorbell's ioeventfd is registered.
    doorbell_at: Option<u64>,
    /// The vCPU thread asks the event loop to look again at whether it
    /// should watch `bell`.
    rearm: EventFd,
    /// The event loop watches `bell`.
    bell_watched: bool,
    /// INTx: a ring raised the line; the bell waits for the acknowledgment.
    awaiting_ack: bool,
    /// MSI-X: `bell` is KVM's irqfd on this GSI (see the module comment).
    bell_gsi: Option<u32>,
    mask: u32,
    status: u32,
    /// The pending interrupt reached the guest (raised while INTx was
    /// enabled): its handler disabling INTx, then the driver enabling it
    /// again, is the acknowledgment.
    delivered: bool,
    position: u32,
}

impl std::fmt::Debug for ChannelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelDevice")
            .field("position", &self.position)
            .field("region_bytes", &self.region.size())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Takes ownership of an eventfd descriptor as an `EventFd`.
#[allow(unsafe_code)]
fn eventfd_from(fd: OwnedFd) -> EventFd {
    // SAFETY: `into_raw_fd` hands over the only owner of a valid descriptor,
    // so the `EventFd` becomes its sole owner and closes it exactly once.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd.into_raw_fd()) }
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> ChannelDeviceError {
    move |e| ChannelDeviceError::Setup(what, e.to_string())
}

impl ChannelDevice {
    /// The function for `side` of the channel in `grant`, its BAR 0 at
    /// `bar0` (32-bit window), BAR 2 at `bar2` (64-bit window), INTx on
    /// `intx_gsi`.
    pub fn new(
        grant: Grant,
        side: Side,
        vm: Arc<dyn VmOps>,
        bar0: u64,
        bar2: u64,
        intx_gsi: u32,
    ) -> Result<Self, ChannelDeviceError> {
        let len = grant
            .region
            .metadata()
            .map_err(setup("sizing the region"))?
            .len();
        if !len.is_power_of_two() || len < 0x1000 {
            return Err(ChannelDeviceError::RegionSize(len));
        }
        let region =
            MmapRegion::from_file(vm_memory::FileOffset::new(grant.region, 0), len as usize)
                .map_err(|e| ChannelDeviceError::Setup("mapping the region", e.to_string()))?;
        let mut config = ConfigSpace::new(Header {
            vendor: VENDOR_ID,
            device: DEVICE_ID,
            revision: 1,
            class: CLASS_CODE,
            subsystem_vendor: VENDOR_ID,
            subsystem: 0x1100,
            interrupt_pin: 1,
        });
        let bar = |size, kind, prefetchable| Bar {
            size,
            kind,
            prefetchable,
        };
        let err =
            |e: super::pci::config::ConfigError| ChannelDeviceError::Setup("BAR", e.to_string());
        config
            .add_bar(
                REGISTER_BAR,
                bar(REGISTER_BAR_SIZE, BarKind::Mem32, false),
                bar0,
            )
            .map_err(err)?;
        config
            .add_bar(REGION_BAR, bar(len, BarKind::Mem64, true), bar2)
            .map_err(err)?;
        let msix = Msix::new(1, vm.clone())
            .map_err(|e| ChannelDeviceError::Setup("MSI-X", e.to_string()))?;
        let (cap, mask) = msix.capability(
            REGISTER_BAR as u8,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config
            .add_capability(&cap, &mask)
            .map_err(|e| ChannelDeviceError::Setup("MSI-X capability", e.to_string()))?;
        config.write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        config.set_interrupt_line(intx_gsi as u8);
        let intx = Intx::new(intx_gsi, &vm).map_err(setup("INTx"))?;
        let rearm =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(setup("eventfd"))?;
        // KVM may drain the bell (as an irqfd) between the event loop's
        // wake-up and its read: that read must not block the loop.
        rustix::io::ioctl_fionbio(&grant.ours, true).map_err(|e| setup("the bell")(e.into()))?;
        Ok(Self {
            config,
            vm,
            intx,
            msix,
            msix_cap,
            region: Arc::new(region),
            region_slot: None,
            bell: eventfd_from(grant.ours),
            ring: eventfd_from(grant.peer),
            doorbell_at: None,
            rearm,
            bell_watched: false,
            awaiting_ack: false,
            bell_gsi: None,
            mask: 0,
            status: 0,
            delivered: false,
            position: match side {
                Side::Device => POSITION_DEVICE,
                Side::Driver => POSITION_DRIVER,
            },
        })
    }

    /// Bytes of the shared region.
    pub fn region_size(&self) -> u64 {
        self.region.size() as u64
    }

    /// The other VM rang.
    fn rung(&mut self) {
        self.status = 1;
        if self.mask & 1 != 0 {
            self.raise();
        }
    }

    fn raise(&mut self) {
        if self.msix.enabled() {
            // Left pending in the PBA while the vector is masked.
            self.msix.trigger(0);
            return;
        }
        self.delivered |= !self.config.intx_disabled();
        self.intx.assert(&mut self.config);
    }

    /// Whether the bell is left unwatched until the guest acknowledges (INTx
    /// only: see the module comment).
    fn waits_for_acknowledgment(&self) -> bool {
        !self.msix.enabled()
    }

    /// MSI-X: a ring is held for the guest (the status set while the
    /// interrupt mask register is clear, or the message pending in the PBA),
    /// so further rings would change nothing until the guest can take it.
    fn ring_held(&self) -> bool {
        self.msix.enabled() && self.status != 0 && (self.mask & 1 == 0 || self.msix.pending(0))
    }

    /// Whether this VMM's event loop should watch the bell: not while KVM
    /// takes it, nor while an INTx acknowledgment is awaited, nor while an
    /// MSI-X ring is held (else the other VM's every ring would wake this
    /// VMM for nothing).
    fn wants_bell_watched(&self) -> bool {
        self.bell_gsi.is_none() && !self.awaiting_ack && !self.ring_held()
    }

    /// Has the event loop look at the bell again when what it should do
    /// about it changed (called from the vCPU side after register writes).
    fn rearm_if_changed(&self) {
        if self.wants_bell_watched() != self.bell_watched {
            let _ = self.rearm.write(1);
        }
    }

    /// Hands the bell to KVM as the MSI-X vector's irqfd while the guest can
    /// take messages, and takes it back when it cannot; runs after every
    /// guest write that may change that. The event loop is told to follow.
    fn route_bell(&mut self) {
        let target = if self.mask & 1 != 0 {
            self.msix.deliverable_gsi(0)
        } else {
            None
        };
        if target == self.bell_gsi {
            // A held ring may have gone out (unmasked vector or function)
            // or been held anew.
            self.rearm_if_changed();
            return;
        }
        if let Some(gsi) = self.bell_gsi.take()
            && let Err(e) = self.vm.unregister_irqfd(&self.bell, gsi)
        {
            crate::warn_limited!(error = %e, gsi, "channel bell: cannot take it back from KVM");
        }
        if let Some(gsi) = target {
            match self.vm.register_irqfd(&self.bell, gsi) {
                Ok(()) => self.bell_gsi = Some(gsi),
                Err(e) => {
                    crate::warn_limited!(error = %e, gsi, "channel bell: no irqfd; rings pass through the VMM")
                }
            }
        }
        let _ = self.rearm.write(1);
    }

    /// Watches the bell or stops, as [`Self::wants_bell_watched`] says.
    fn follow_bell(&mut self, ops: &mut EventOps) {
        let want = self.wants_bell_watched();
        if want == self.bell_watched {
            return;
        }
        let ev = Events::new_raw(self.bell.as_raw_fd(), EventSet::IN);
        let done = if want { ops.add(ev) } else { ops.remove(ev) };
        match done {
            Ok(()) => self.bell_watched = want,
            Err(e) => tracing::error!(error = ?e, watch = want, "channel bell: epoll"),
        }
    }

    /// The guest acknowledged the interrupt: clear it and look at the bell
    /// again (a doorbell that came meanwhile raises it anew at once).
    fn acknowledge(&mut self) -> u32 {
        let v = self.status;
        self.status = 0;
        self.delivered = false;
        self.intx.deassert(&mut self.config);
        self.awaiting_ack = false;
        self.rearm_if_changed();
        v
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            regs::INTR_MASK => self.mask,
            regs::INTR_STATUS => self.acknowledge(),
            regs::IV_POSITION => self.position,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            regs::INTR_MASK => {
                self.mask = v & 1;
                if self.mask != 0 && self.status != 0 {
                    self.raise();
                } else if self.mask == 0 {
                    self.intx.deassert(&mut self.config);
                }
                self.route_bell();
            }
            // Reached only where the ioeventfd did not catch the write.
            regs::DOORBELL => {
                let _ = self.ring.write(1);
            }
            _ => {}
        }
    }

    fn move_doorbell(&mut self, new: Option<u64>) {
        if let Some(at) = self.doorbell_at.take() {
            let _ = self.vm.unregister_ioevent(&self.ring, at);
        }
        if let Some(base) = new {
            let at = base + regs::DOORBELL;
            match self.vm.register_ioevent(&self.ring, at) {
                Ok(()) => self.doorbell_at = Some(at),
                Err(e) => {
                    tracing::warn!(error = %e, "channel doorbell: no ioeventfd; writes will exit")
                }
            }
        }
    }

    fn move_region(&mut self, new: Option<u64>) {
        if let Some(slot) = self.region_slot.take() {
            let _ = self.vm.unmap_memory(slot);
        }
        if let Some(gpa) = new {
            match self.vm.map_memory(gpa, self.region.clone()) {
                Ok(slot) => self.region_slot = Some(slot),
                Err(e) => {
                    crate::warn_limited!(error = %e, gpa, "channel region: cannot map it there")
                }
            }
        }
    }
}

impl PciDevice for ChannelDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let was_disabled = self.config.intx_disabled();
        let control = self.config.word(self.msix_cap + 2);
        let effect = self.config.write(offset, data);
        if let Some(start) = offset.checked_sub(self.msix_cap)
            && msix::control_from_write(start, data, control).is_some()
        {
            self.msix
                .control_written(self.config.word(self.msix_cap + 2));
            if self.msix.enabled() {
                // From now on messages, not the line; a bell left unwatched
                // for an INTx acknowledgment is watched again.
                self.intx.deassert(&mut self.config);
                self.delivered = false;
                if self.awaiting_ack {
                    self.awaiting_ack = false;
                    let _ = self.rearm.write(1);
                }
            }
            self.route_bell();
        }
        if effect.command {
            // uio_pci_generic's handler disables INTx; the driver enabling it
            // again is done with the interrupt: that acknowledges it too, one
            // register round trip instead of two (status read, then enable).
            if was_disabled && !self.config.intx_disabled() && self.delivered {
                self.acknowledge();
            }
            self.intx.command_written(&self.config);
            // A ring held back while INTx was disabled reaches the guest now.
            if !self.config.intx_disabled() && self.intx.pending() {
                self.delivered = true;
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The region is guest memory; only a guest access while its slot is
        // missing lands here, and reads as nothing.
        if bar != REGISTER_BAR {
            return;
        }
        match offset {
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + self.msix.pba_size()).contains(&o) => {
                self.msix.pba_read(o - MSIX_PBA_OFFSET, data)
            }
            o if o.is_multiple_of(4) && data.len() == 4 => {
                put_le_value(data, u64::from(self.read_register(o)))
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != REGISTER_BAR {
            return;
        }
        match offset {
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.table_write(o - MSIX_TABLE_OFFSET, data);
                self.route_bell();
            }
            o if o.is_multiple_of(4) && (1..=4).contains(&data.len()) => {
                self.write_register(o, le_value(data) as u32)
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, _old: Option<u64>, new: Option<u64>) {
        match bar {
            REGISTER_BAR => self.move_doorbell(new),
            REGION_BAR => self.move_region(new),
            _ => {}
        }
    }
}

impl MutEventSubscriber for ChannelDevice {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.bell.as_raw_fd(),
            self.rearm.as_raw_fd(),
            self.intx.resample_fd().as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(error = ?e, "cannot watch a channel eventfd");
            }
        }
        self.bell_watched = true;
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.bell.as_raw_fd() {
            // Once KVM holds the bell it takes the rings; the last one seen
            // here, if any, raced the hand-over and is delivered as usual.
            if self.bell.read().is_ok() {
                self.rung();
                // Until the guest acknowledges, further doorbells wait in
                // the eventfd's counter (see the module comment).
                self.awaiting_ack |= self.waits_for_acknowledgment();
            }
            self.follow_bell(ops);
        } else if fd == self.rearm.as_raw_fd() {
            let _ = self.rearm.read();
            self.follow_bell(ops);
        } else if fd == self.intx.resample_fd().as_raw_fd() {
            self.intx.resampled(&self.config);
        }
    }
}

#[cfg(test)]
mod tests;
