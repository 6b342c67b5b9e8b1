//! The boot-marker port: the guest's `/init` writes
//! [`ports::BOOT_MARKER_VALUE`] to it once, so the VMM can report the time
//! from its own start to the guest's userspace.

use std::sync::Arc;

use crate::arch::x86_64::layout::ports;
use crate::devices::bus::MutBusDevice;
use crate::lifecycle::BootTimes;

/// One write-only byte.
#[derive(Debug)]
pub struct BootMarker(pub Arc<BootTimes>);

impl MutBusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&ports::BOOT_MARKER_VALUE) {
            self.0.init();
        }
    }
}
