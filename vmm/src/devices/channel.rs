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
//!        = eventfd "bell" of VMM B ─► IntrStatus := 1 ─► INTx (irqfd + resample) ─► guest B
//! ```
//!
//! The VMM never reads or writes the region's contents.
//!
//! An interrupt storm is bounded by the receiver: once the bell has raised
//! the interrupt, this device stops watching it until its own guest
//! acknowledges — reads the interrupt status, or enables INTx again after
//! `uio_pci_generic` disabled it. However fast the other guest
//! rings, this VMM wakes — and this guest is interrupted — at most once per
//! acknowledgment its guest chooses to make; the doorbells in between only
//! add to an eventfd counter in the kernel.

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

/// The channel's PCI function.
pub struct ChannelDevice {
    config: ConfigSpace,
    vm: Arc<dyn VmOps>,
    intx: Intx,
    /// The region, mapped in this process only to hand it to KVM.
    region: Arc<MmapRegion>,
    region_slot: Option<u32>,
    /// Rung by the other VM (its doorbell's ioeventfd in its VMM).
    bell: EventFd,
    /// This guest's doorbell: an ioeventfd; the other VMM watches it.
    ring: EventFd,
    /// Where the doorbell's ioeventfd is registered.
    doorbell_at: Option<u64>,
    /// The vCPU thread asks the event loop to watch `bell` again.
    rearm: EventFd,
    bell_watched: bool,
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
        config.write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        config.set_interrupt_line(intx_gsi as u8);
        let intx = Intx::new(intx_gsi, &vm).map_err(setup("INTx"))?;
        let rearm =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(setup("eventfd"))?;
        Ok(Self {
            config,
            vm,
            intx,
            region: Arc::new(region),
            region_slot: None,
            bell: eventfd_from(grant.ours),
            ring: eventfd_from(grant.peer),
            doorbell_at: None,
            rearm,
            bell_watched: false,
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
        self.delivered |= !self.config.intx_disabled();
        self.intx.assert(&mut self.config);
    }

    /// The guest acknowledged the interrupt: clear it and look at the bell
    /// again (a doorbell that came meanwhile raises it anew at once).
    fn acknowledge(&mut self) -> u32 {
        let v = self.status;
        self.status = 0;
        self.delivered = false;
        self.intx.deassert(&mut self.config);
        if !self.bell_watched {
            let _ = self.rearm.write(1);
        }
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
        if self.config.write(offset, data).command {
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
        if bar == REGISTER_BAR && offset.is_multiple_of(4) && data.len() == 4 {
            put_le_value(data, u64::from(self.read_register(offset)));
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == REGISTER_BAR && offset.is_multiple_of(4) && (1..=4).contains(&data.len()) {
            self.write_register(offset, le_value(data) as u32);
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
            let _ = self.bell.read();
            self.rung();
            // Until the guest acknowledges, further doorbells wait in the
            // eventfd's counter (see the module comment).
            if ops.remove(Events::new_raw(fd, EventSet::IN)).is_ok() {
                self.bell_watched = false;
            }
        } else if fd == self.rearm.as_raw_fd() {
            let _ = self.rearm.read();
            if !self.bell_watched
                && ops
                    .add(Events::new_raw(self.bell.as_raw_fd(), EventSet::IN))
                    .is_ok()
            {
                self.bell_watched = true;
            }
        } else if fd == self.intx.resample_fd().as_raw_fd() {
            self.intx.resampled(&self.config);
        }
    }
}

#[cfg(test)]
mod tests;
