//! The hardware-reduced ACPI registers the FADT points at: sleep control
//! (the guest writes SLP_TYP|SLP_EN to power off), sleep status, and reset.

use std::sync::Arc;

use crate::arch::x86_64::layout::ports;
use crate::devices::bus::MutBusDevice;
use crate::lifecycle::{ExitReason, ExitSignal};

/// Sleep control register: SLP_EN.
const SLP_EN: u8 = 1 << 5;
/// Sleep control register: SLP_TYP (bits 2–4).
const SLP_TYP_SHIFT: u8 = 2;
/// Sleep status register: WAK_STS (the platform is awake).
const WAK_STS: u8 = 1 << 7;

/// Three byte registers from [`ports::ACPI_PM`].
#[derive(Debug)]
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    /// Registers whose power-off and reset end the run.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl MutBusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == u64::from(ports::ACPI_SLEEP_STATUS - ports::ACPI_PM)
            && let Some(b) = data.first_mut()
        {
            *b = WAK_STS;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let port = ports::ACPI_PM + offset as u16;
        if port == ports::ACPI_SLEEP_CONTROL && v & SLP_EN != 0 {
            let sleep_type = (v >> SLP_TYP_SHIFT) & 0x7;
            if sleep_type == ports::ACPI_S5_SLEEP_TYPE {
                self.exit.request(ExitReason::PowerOff);
            } else {
                // S1–S4 are not offered (`_S5_` is the only sleep object).
                crate::warn_limited!(
                    sleep_type,
                    "guest asked for a sleep state this VM does not offer"
                );
            }
        } else if port == ports::ACPI_RESET && v == ports::ACPI_RESET_VALUE {
            tracing::info!("the guest reset itself through ACPI");
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (AcpiPm, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (AcpiPm::new(exit.clone()), exit)
    }

    #[test]
    fn s5_powers_off() {
        let (mut pm, exit) = dev();
        // SLP_TYP without SLP_EN does nothing; an unknown type neither.
        pm.write(0, &[ports::ACPI_S5_SLEEP_TYPE << 2]);
        pm.write(0, &[(3 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), None);
        pm.write(0, &[(ports::ACPI_S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_register_resets() {
        let (mut pm, exit) = dev();
        pm.write(2, &[0x02]);
        assert_eq!(exit.reason(), None);
        pm.write(2, &[ports::ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        let mut b = [0u8];
        pm.read(1, &mut b);
        assert_eq!(b[0], WAK_STS);
    }
}
