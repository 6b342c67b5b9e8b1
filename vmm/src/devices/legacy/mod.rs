//! Legacy PC devices on the port-I/O bus: the 8250 console, the CMOS RTC,
//! the i8042's reset line, the ACPI power-management registers, pvpanic and
//! the boot-marker port.

pub mod acpi_pm;
pub mod boot_marker;
pub mod i8042;
pub mod pvpanic;
pub mod rtc;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line: an eventfd KVM turns into an interrupt
/// (irqfd).
#[derive(Debug)]
pub struct EdgeTrigger(pub EventFd);

impl vm_superio::Trigger for EdgeTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
