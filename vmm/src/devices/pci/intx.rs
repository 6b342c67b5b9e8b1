//! A level-triggered PCI INTx line through KVM: an irqfd with a resample
//! fd. The device asserts; at the guest's EOI KVM lowers the line and
//! signals the resample fd, and the device raises it again if its interrupt
//! is still pending — level semantics without an exit per interrupt.
//!
//! The PCI 2.3 bits live in configuration space: status bit 3 shows a
//! pending interrupt, command bit 10 keeps it off the line. Linux's
//! `uio_pci_generic` relies on both (it masks in its handler, and userspace
//! unmasks by writing the command register).

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::config::ConfigSpace;
use crate::devices::VmOps;

/// One INTx line.
#[derive(Debug)]
pub struct Intx {
    irqfd: EventFd,
    resample: EventFd,
    pending: bool,
    gsi: u32,
}

impl Intx {
    /// A line on IO-APIC input `gsi`, registered in `vm`.
    pub fn new(gsi: u32, vm: &Arc<dyn VmOps>) -> std::io::Result<Self> {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let resample = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        vm.register_irqfd_resample(&irqfd, &resample, gsi)?;
        Ok(Self {
            irqfd,
            resample,
            pending: false,
            gsi,
        })
    }

    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Signalled by KVM at the guest's EOI; the device thread watches it.
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }

    /// The device has an interrupt for the guest.
    pub fn assert(&mut self, config: &mut ConfigSpace) {
        self.pending = true;
        config.set_interrupt_status(true);
        if !config.intx_disabled() {
            let _ = self.irqfd.write(1);
        }
    }

    /// The device's interrupt was serviced (e.g. its status was read). The
    /// line itself drops at the guest's EOI.
    pub fn deassert(&mut self, config: &mut ConfigSpace) {
        self.pending = false;
        config.set_interrupt_status(false);
    }

    /// KVM lowered the line at an EOI: raise it again if still pending.
    pub fn resampled(&mut self, config: &ConfigSpace) {
        let _ = self.resample.read();
        if self.pending && !config.intx_disabled() {
            let _ = self.irqfd.write(1);
        }
    }

    /// The guest wrote the command register: re-raise a pending interrupt
    /// it just unmasked.
    pub fn command_written(&mut self, config: &ConfigSpace) {
        if self.pending && !config.intx_disabled() {
            let _ = self.irqfd.write(1);
        }
    }

    /// Whether the device has an interrupt pending.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// The irqfd (tests watch it).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fake::FakeVm;
    use crate::devices::pci::config::{COMMAND_INTX_DISABLE, Header, STATUS_INTERRUPT, reg};

    fn config() -> ConfigSpace {
        ConfigSpace::new(Header {
            vendor: 1,
            device: 2,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
            interrupt_pin: 1,
        })
    }

    #[test]
    fn pci23_status_and_disable() {
        let vm: Arc<dyn VmOps> = Arc::new(FakeVm::default());
        let mut line = Intx::new(17, &vm).unwrap();
        let mut c = config();
        // Disabled by the guest: the status shows it, the line stays low.
        c.write(reg::COMMAND, &COMMAND_INTX_DISABLE.to_le_bytes());
        line.assert(&mut c);
        assert_ne!(c.word(reg::COMMAND + 2) & STATUS_INTERRUPT, 0);
        assert!(line.irqfd().read().is_err());
        // Re-enabled: the pending interrupt goes out.
        c.write(reg::COMMAND, &0u16.to_le_bytes());
        line.command_written(&c);
        assert_eq!(line.irqfd().read().unwrap(), 1);
        // EOI while still pending: raised again.
        line.resample_fd().write(1).unwrap();
        line.resampled(&c);
        assert_eq!(line.irqfd().read().unwrap(), 1);
        // Serviced: EOI leaves it low.
        line.deassert(&mut c);
        assert_eq!(c.word(reg::COMMAND + 2) & STATUS_INTERRUPT, 0);
        line.resample_fd().write(1).unwrap();
        line.resampled(&c);
        assert!(line.irqfd().read().is_err());
    }
}
