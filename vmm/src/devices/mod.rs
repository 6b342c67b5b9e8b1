//! Emulated devices: the buses they sit on, the legacy PC devices, the PCI
//! root and its functions, the virtio devices on virtio-pci, and the
//! inter-VM channel device.
//!
//! Devices never hold the VM's file descriptor: what they may ask of the VM
//! (ioeventfds, irqfds, MSI routes) goes through [`VmOps`], which the KVM VM
//! implements and unit tests fake.

pub mod bus;
pub mod channel;
pub mod legacy;
pub mod pci;
pub mod virtio;

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// An MSI message as the guest programs it into an MSI-X table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low and high dwords).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// What a device may ask of the VM it belongs to.
pub trait VmOps: Send + Sync {
    /// Signals `fd` when the guest writes to MMIO address `addr` (any value
    /// and width), without an exit to userspace.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Undoes [`VmOps::register_ioevent`].
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Injects interrupt `gsi` (edge) each time `fd` is signalled.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Undoes [`VmOps::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Asserts level-triggered `gsi` when `fd` is signalled; at the guest's
    /// EOI the line is deasserted and `resample` signalled, so the device can
    /// assert it again if it still has something pending.
    fn register_irqfd_resample(&self, fd: &EventFd, resample: &EventFd, gsi: u32)
    -> io::Result<()>;
    /// A fresh GSI for an MSI route, or `None` when they are exhausted.
    fn allocate_msi_gsi(&self) -> Option<u32>;
    /// Points `gsi` at `msg` (replacing what it pointed at).
    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()>;
    /// Makes `mapping` guest memory at `gpa` (a device's memory BAR backed
    /// by host memory, so guest accesses cost no exit). The VM keeps the
    /// mapping alive while the slot exists. Returns the slot.
    fn map_memory(&self, gpa: u64, mapping: Arc<MmapRegion>) -> io::Result<u32>;
    /// Removes a slot [`VmOps::map_memory`] made.
    fn unmap_memory(&self, slot: u32) -> io::Result<()>;
}

/// Host memory a device lends its guest (see [`VmOps::map_memory`]).
pub type MmapRegion = vm_memory::MmapRegion<()>;

/// Reads the little-endian value of up to 8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Writes the low `data.len()` bytes of `v` little-endian.
pub fn put_le_value(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

#[doc(hidden)]
pub mod fake {
    //! A [`VmOps`] that records what devices asked for, for unit tests and
    //! the fuzz bodies.

    use super::*;
    use std::sync::Mutex;

    /// Records routes and registrations; allocates GSIs from 24 up.
    #[derive(Debug, Default)]
    pub struct FakeVm {
        /// MMIO ioevents registered (address).
        pub ioevents: Mutex<Vec<u64>>,
        /// MSI routes by GSI.
        pub routes: Mutex<std::collections::BTreeMap<u32, MsiMessage>>,
        /// irqfds registered (gsi, with resample).
        pub irqfds: Mutex<Vec<(u32, bool)>>,
        /// Which descriptor each plain irqfd is (descriptor, gsi).
        pub irqfd_fds: Mutex<Vec<(std::os::fd::RawFd, u32)>>,
        /// Memory slots by number: (guest address, size).
        pub slots: Mutex<std::collections::BTreeMap<u32, (u64, usize)>>,
        next_gsi: Mutex<u32>,
    }

    impl VmOps for FakeVm {
        fn register_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            self.ioevents.lock().unwrap().push(addr);
            Ok(())
        }
        fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut v = self.ioevents.lock().unwrap();
            let i = v
                .iter()
                .position(|a| *a == addr)
                .ok_or(io::ErrorKind::NotFound)?;
            v.remove(i);
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
            use std::os::fd::AsRawFd;
            let mut fds = self.irqfd_fds.lock().unwrap();
            // KVM refuses one eventfd twice in a VM.
            if fds.iter().any(|(f, _)| *f == fd.as_raw_fd()) {
                return Err(io::ErrorKind::ResourceBusy.into());
            }
            fds.push((fd.as_raw_fd(), gsi));
            self.irqfds.lock().unwrap().push((gsi, false));
            Ok(())
        }
        fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
            use std::os::fd::AsRawFd;
            let mut fds = self.irqfd_fds.lock().unwrap();
            let i = fds
                .iter()
                .position(|e| *e == (fd.as_raw_fd(), gsi))
                .ok_or(io::ErrorKind::NotFound)?;
            fds.remove(i);
            let mut all = self.irqfds.lock().unwrap();
            let j = all.iter().position(|e| *e == (gsi, false)).unwrap();
            all.remove(j);
            Ok(())
        }
        fn register_irqfd_resample(&self, _: &EventFd, _: &EventFd, gsi: u32) -> io::Result<()> {
            self.irqfds.lock().unwrap().push((gsi, true));
            Ok(())
        }
        fn allocate_msi_gsi(&self) -> Option<u32> {
            let mut n = self.next_gsi.lock().unwrap();
            let gsi = 24 + *n;
            *n += 1;
            Some(gsi)
        }
        fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
            self.routes.lock().unwrap().insert(gsi, msg);
            Ok(())
        }
        fn map_memory(&self, gpa: u64, mapping: Arc<MmapRegion>) -> io::Result<u32> {
            let mut slots = self.slots.lock().unwrap();
            let slot = (100..).find(|s| !slots.contains_key(s)).unwrap();
            slots.insert(slot, (gpa, mapping.size()));
            Ok(slot)
        }
        fn unmap_memory(&self, slot: u32) -> io::Result<()> {
            self.slots
                .lock()
                .unwrap()
                .remove(&slot)
                .map(|_| ())
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        }
    }
}
