//! The PCI root: bus 0 with the host bridge at 00:00.0 and one function per
//! slot, configuration access through ports 0xcf8/0xcfc (mechanism #1) and
//! through ECAM, and BARs placed on the MMIO bus wherever the guest
//! programs them.

use std::sync::{Arc, Mutex, Weak};

use super::config::{ConfigSpace, Header, reg};
use crate::devices::bus::{Bus, BusDevice, lock};
use crate::devices::{le_value, put_le_value};

/// A PCI function as the root sees it.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &ConfigSpace;
    /// A configuration read of the dword at `offset` (devices with registers
    /// computed on read override this).
    fn config_read(&mut self, offset: usize) -> u32 {
        self.config().read(offset)
    }
    /// A guest configuration write. The default applies the write masks;
    /// devices override to react (MSI-X enable, INTx disable).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// A read inside BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write inside BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now decodes at `new` (`None`: not at all). Devices with
    /// ioeventfds in the BAR move them.
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}

/// Shared handle to a function.
pub type PciHandle = Arc<Mutex<dyn PciDevice>>;

/// Why a function could not be added.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// All 31 slots are taken.
    #[error("No free PCI slot")]
    Full,
    /// A BAR did not fit on the MMIO bus.
    #[error("BAR {bar} of slot {slot} overlaps another device")]
    Bar {
        /// Slot.
        slot: u8,
        /// BAR index.
        bar: usize,
    },
}

/// The host bridge: Red Hat's id for a generic PCIe host bridge, for which
/// Linux has no quirks.
fn host_bridge() -> ConfigSpace {
    ConfigSpace::new(Header {
        vendor: 0x1b36,
        device: 0x0008,
        revision: 0,
        class: 0x06_00_00,
        subsystem_vendor: 0x1b36,
        subsystem: 0,
        interrupt_pin: 0,
    })
}

/// BAR `bar` of a function, as a device on the MMIO bus.
struct BarRegion {
    device: PciHandle,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        lock(&self.device).bar_write(self.bar, offset, data)
    }
}

struct Slot {
    device: PciHandle,
    /// Where each BAR currently sits on the MMIO bus.
    mapped: [Option<u64>; 6],
}

/// Bus 0.
pub struct PciRoot {
    bridge: ConfigSpace,
    slots: Vec<Option<Slot>>,
    /// Weak: the bus holds this root (through the ECAM window), and a strong
    /// reference back would keep the whole VM alive after it stopped.
    mmio: Weak<Bus>,
    /// The 0xcf8 address latch.
    address: u32,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..32).filter(|&s| self.slots[s].is_some()).collect();
        f.debug_struct("PciRoot").field("slots", &used).finish()
    }
}

impl PciRoot {
    /// An empty bus 0 whose BARs live on `mmio`.
    pub fn new(mmio: &Arc<Bus>) -> Self {
        Self {
            bridge: host_bridge(),
            slots: (0..32).map(|_| None).collect(),
            mmio: Arc::downgrade(mmio),
            address: 0,
        }
    }

    /// The slot [`PciRoot::add`] will use next.
    pub fn next_slot(&self) -> Option<u8> {
        (1..32).find(|&s| self.slots[s].is_none()).map(|s| s as u8)
    }

    /// Puts `device` in the first free slot and maps its BARs where its
    /// configuration says (memory decoding on, as firmware would leave it).
    pub fn add(&mut self, device: PciHandle) -> Result<u8, RootError> {
        let slot = self.next_slot().ok_or(RootError::Full)?;
        self.slots[slot as usize] = Some(Slot {
            device,
            mapped: [None; 6],
        });
        self.sync_bars(slot)
            .map_err(|bar| RootError::Bar { slot, bar })?;
        Ok(slot)
    }

    /// Moves BARs on the MMIO bus to match the function's configuration;
    /// `Err(bar)` names a BAR that could not be placed.
    fn sync_bars(&mut self, slot: u8) -> Result<(), usize> {
        let Some(mmio) = self.mmio.upgrade() else {
            return Ok(());
        };
        let Some(s) = self.slots[slot as usize].as_mut() else {
            return Ok(());
        };
        let mut dev = lock(&s.device);
        let enabled = dev.config().memory_enabled();
        let bars: Vec<usize> = dev.config().bar_indexes().collect();
        let mut failed = Ok(());
        for bar in bars {
            let size = dev.config().bar(bar).map_or(0, |b| b.size);
            let want = dev
                .config()
                .bar_address(bar)
                .filter(|&a| enabled && a != 0 && a.checked_add(size).is_some());
            if want == s.mapped[bar] {
                continue;
            }
            let old = s.mapped[bar].take();
            if let Some(old) = old {
                mmio.remove(old);
            }
            let region = Arc::new(BarRegion {
                device: s.device.clone(),
                bar,
            });
            let placed = match want {
                Some(addr) => match mmio.insert(region, addr, size) {
                    Ok(()) => Some(addr),
                    Err(_) => {
                        // Left unmapped until the range frees up (see
                        // `sync_all`); logged at debug level only, since a
                        // guest can do this at will.
                        tracing::debug!(slot, bar, "BAR overlaps another device: left unmapped");
                        failed = Err(bar);
                        None
                    }
                },
                None => None,
            };
            s.mapped[bar] = placed;
            if old != placed {
                dev.bar_moved(bar, old, placed);
            }
        }
        failed
    }

    /// [`PciRoot::sync_bars`] for every slot: a BAR that moved away may have
    /// freed the range another one was refused.
    fn sync_all(&mut self) {
        for slot in 1..32u8 {
            let _ = self.sync_bars(slot);
        }
    }

    /// A configuration read of `data.len()` bytes at `offset` of `slot`
    /// (function 0 only; others do not exist).
    fn read(&mut self, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        let in_header = offset < super::config::CONFIG_SPACE_SIZE;
        let value = if function != 0 {
            // Absent functions read as all ones (vendor 0xffff).
            u32::MAX
        } else if slot == 0 {
            if in_header {
                self.bridge.read(offset)
            } else {
                0
            }
        } else {
            match &self.slots[slot as usize] {
                None => u32::MAX,
                Some(s) if in_header => lock(&s.device).config_read(offset & !3),
                // Conventional functions have no extended configuration space.
                Some(_) => 0,
            }
        };
        put_le_value(data, u64::from(value >> ((offset % 4) * 8)));
    }

    fn write(&mut self, slot: u8, function: u8, offset: usize, data: &[u8]) {
        if function != 0 || offset >= super::config::CONFIG_SPACE_SIZE {
            return;
        }
        if slot == 0 {
            self.bridge.write(offset, data);
            return;
        }
        let Some(s) = &self.slots[slot as usize] else {
            return;
        };
        let touches_mapping = {
            let mut dev = lock(&s.device);
            dev.config_write(offset, data);
            let r = offset & !3;
            r == reg::COMMAND || (reg::BAR0..reg::BAR0 + 24).contains(&r)
        };
        if touches_mapping {
            self.sync_all();
        }
    }
}

/// Splits a mechanism-#1 address into (bus, slot, function, register).
fn decode_cf8(address: u32) -> Option<(u8, u8, u8, usize)> {
    if address & 0x8000_0000 == 0 {
        return None;
    }
    Some((
        (address >> 16) as u8,
        ((address >> 11) & 0x1f) as u8,
        ((address >> 8) & 0x7) as u8,
        (address & 0xfc) as usize,
    ))
}

/// Ports 0xcf8–0xcff.
#[derive(Debug)]
pub struct PciConfigIo(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut root = lock(&self.0);
        if offset < 4 {
            // The address latch reads back only as a whole dword.
            let v = if offset == 0 && data.len() == 4 {
                root.address
            } else {
                u32::MAX
            };
            put_le_value(data, u64::from(v));
            return;
        }
        let byte = offset as usize - 4;
        match decode_cf8(root.address) {
            Some((0, slot, function, register)) if byte + data.len() <= 4 => {
                root.read(slot, function, register + byte, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut root = lock(&self.0);
        if offset == 0 {
            if data.len() == 4 {
                root.address = le_value(data) as u32;
            }
            return;
        }
        if offset < 4 {
            return;
        }
        let byte = offset as usize - 4;
        if let Some((0, slot, function, register)) = decode_cf8(root.address)
            && byte + data.len() <= 4
        {
            root.write(slot, function, register + byte, data);
        }
    }
}

/// The ECAM window (bus 0: 32 slots × 8 functions × 4 KiB).
#[derive(Debug)]
pub struct PciConfigMmio(pub Arc<Mutex<PciRoot>>);

fn decode_ecam(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for PciConfigMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (bus, slot, function, register) = decode_ecam(offset);
        if bus != 0 || register % 4 + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        lock(&self.0).read(slot, function, register, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (bus, slot, function, register) = decode_ecam(offset);
        if bus == 0 && register % 4 + data.len() <= 4 {
            lock(&self.0).write(slot, function, register, data);
        }
    }
}

#[cfg(test)]
mod tests;
