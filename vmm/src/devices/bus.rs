//! Address buses: the port-I/O and MMIO spaces a vCPU's exits are dispatched
//! on. A device claims a range; an access is handed to the device with its
//! offset inside the range.
//!
//! Dispatch clones the device handle under a read lock and calls it with no
//! lock held, so a device may change the bus it sits on (a PCI function whose
//! BAR the guest moves, reached through ECAM on the same MMIO bus).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. Methods take `&self`: each device does its own locking,
/// since vCPU threads and the device thread reach it concurrently.
pub trait BusDevice: Send + Sync {
    /// A read of `data.len()` bytes at `offset` into the device's range.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A write at `offset` into the device's range.
    fn write(&self, offset: u64, data: &[u8]);
}

/// A device whose state sits behind one mutex; `Mutex<T>` is then a
/// [`BusDevice`].
pub trait MutBusDevice: Send {
    /// See [`BusDevice::read`].
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// See [`BusDevice::write`].
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl<T: MutBusDevice> BusDevice for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(self).read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        lock(self).write(offset, data)
    }
}

/// Locks `m`, taking over a lock a panicking thread left poisoned: device
/// state stays usable (every device keeps its own invariants per access), and
/// one vCPU thread's panic must not cascade into the others.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a range could not be claimed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps one already claimed.
    #[error("Bus range {base:#x}+{len:#x} overlaps a device already there")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("Bus range {base:#x}+{len:#x} is empty or wraps")]
    Invalid {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

#[derive(Clone)]
struct Slot {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    slots: RwLock<BTreeMap<u64, Slot>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        f.debug_list()
            .entries(slots.iter().map(|(b, s)| (*b, s.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `[base, base + len)` for `device`.
    pub fn insert(&self, device: Arc<dyn BusDevice>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Invalid { base, len })?;
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        // The nearest range starting below `end` is the only one that can overlap.
        if let Some((&b, s)) = slots.range(..end).next_back()
            && b + s.len > base
        {
            return Err(BusError::Overlap { base, len });
        }
        slots.insert(base, Slot { len, device });
        Ok(())
    }

    /// Releases the range starting at `base`; returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.remove(&base).is_some()
    }

    fn resolve(&self, addr: u64, len: usize) -> Option<(Arc<dyn BusDevice>, u64)> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let (&base, slot) = slots.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the range.
        (offset.checked_add(len as u64)? <= slot.len).then(|| (slot.device.clone(), offset))
    }

    /// Reads at `addr`; `false` when nothing is there (the caller answers
    /// as an empty bus would, all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes at `addr`; `false` when nothing is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Option<(u64, Vec<u8>)>,
    }
    impl MutBusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Reg::default()));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x104, &mut d));
        assert_eq!(d, [4, 4]);
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(lock(&a).last, Some((0xe, vec![1, 2])));
        // Straddling the end, below, above: nothing.
        assert!(!bus.read(0x10f, &mut d));
        assert!(!bus.read(0xff, &mut [0u8; 1]));
        assert!(!bus.write(0x110, &[0]));
    }

    #[test]
    fn overlaps_and_bad_ranges_refused() {
        let bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Reg::default())) as Arc<dyn BusDevice>;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev(), 0x10f, 1).is_err());
        assert!(bus.insert(dev(), 0xf0, 0x11).is_err());
        assert!(bus.insert(dev(), 0, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
        bus.insert(dev(), 0x110, 0x10).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        assert!(bus.remove(0x100));
        assert!(!bus.remove(0x100));
        bus.insert(dev(), 0x100, 0x10).unwrap();
    }
}
