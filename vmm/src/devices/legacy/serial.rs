//! COM1: vm-superio's 16550A emulation, its interrupt on ISA IRQ 4 (an
//! irqfd), its output to whatever writer the builder hands it (the
//! [`Console`](crate::console::Console)'s, which owns this device in turn,
//! so the device names only `Write`).

use std::io::Write;

use vm_superio::Serial;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use super::EdgeTrigger;
use crate::devices::bus::MutBusDevice;

/// Tells the console's input side when the guest emptied the receive FIFO.
#[derive(Debug)]
pub struct InputRoom(pub EventFd);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The 8250 on the port-I/O bus (8 registers).
pub struct SerialDevice {
    serial: Serial<EdgeTrigger, InputRoom, SerialOut>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    /// A UART raising `irq` and printing to `out`; `input_room` is signalled
    /// when its receive FIFO empties.
    pub fn new(irq: EventFd, input_room: EventFd, out: SerialOut) -> Self {
        Self {
            serial: Serial::with_events(EdgeTrigger(irq), InputRoom(input_room), out),
        }
    }

    /// Queues keystrokes for the guest; returns how many fit the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.serial.fifo_capacity() == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl MutBusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Byte registers: a wider access reads the first one.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first()
            && let Err(e) = self.serial.write(offset as u8, value)
        {
            tracing::debug!(error = %e, "serial write");
        }
    }
}
