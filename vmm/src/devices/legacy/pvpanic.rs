//! pvpanic (QEMU's ISA device, ACPI `QEMU0001`): the guest's panic notifier
//! writes here, so a panic is reported as one instead of a silent reboot.

use std::sync::Arc;

use crate::devices::bus::MutBusDevice;
use crate::lifecycle::{ExitReason, ExitSignal};

/// The guest panicked.
const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest is about to load a crash kernel (kdump); not a panic yet.
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// One byte register.
#[derive(Debug)]
pub struct PvPanic {
    exit: Arc<ExitSignal>,
}

impl PvPanic {
    /// A device whose panic event ends the run with [`ExitReason::Panic`].
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl MutBusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The events this device understands (the driver checks before use).
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first() {
            Some(&v) if v & PVPANIC_PANICKED != 0 => {
                tracing::error!("the guest kernel panicked");
                self.exit.request(ExitReason::Panic);
            }
            Some(&v) if v & PVPANIC_CRASH_LOADED != 0 => {
                crate::warn_limited!("the guest is loading its crash kernel");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_is_reported() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut p = PvPanic::new(exit.clone());
        let mut caps = [0u8];
        p.read(0, &mut caps);
        assert_eq!(caps[0], 3);
        p.write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(exit.reason(), None);
        p.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.reason(), Some(ExitReason::Panic));
    }
}
