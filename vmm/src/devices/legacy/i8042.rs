//! The i8042 keyboard controller, only as far as its reset line: Linux's
//! `reboot=k` (and its fallback after ACPI) writes 0xfe to port 0x64.

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::devices::bus::MutBusDevice;
use crate::lifecycle::{ExitReason, ExitSignal};

/// Turns the controller's reset pulse into a VM reset.
#[derive(Debug)]
pub struct ResetLine(pub Arc<ExitSignal>);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        tracing::info!("the guest reset itself through the i8042");
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// Ports 0x60–0x64 (data at offset 0, command/status at offset 4).
pub struct I8042(I8042Device<ResetLine>);

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl I8042 {
    /// A controller whose reset ends the run with [`ExitReason::Reset`].
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetLine(exit)))
    }
}

impl MutBusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let _ = self.0.write(offset as u8, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status[0] & 2, 0, "input buffer never full");
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
