//! The KVM VM: its memory slots, the in-kernel interrupt controllers and PIT,
//! and the GSI routing table that MSI-X vectors are added to.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY, KvmIrqRouting, kvm_irq_routing_entry,
    kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;
use crate::devices::{MmapRegion, MsiMessage, VmOps};
use crate::vstate::memory::GuestRam;

/// Why a VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A VM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// Pins of the in-kernel IO-APIC; GSIs below this are wired to it.
pub const IOAPIC_PINS: u32 = 24;
/// Pins 0–15 are the ISA interrupts (also wired to the PICs).
pub const ISA_IRQS: u32 = 16;
/// KVM's routing table holds at most this many entries (`KVM_MAX_IRQ_ROUTES`).
const MAX_GSI: u32 = 4096;

/// A KVM VM with in-kernel irqchip and PIT.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    /// MSI routes by GSI. The irqchip routes are rebuilt around them each
    /// time, because `KVM_SET_GSI_ROUTING` replaces the whole table.
    msi_routes: Mutex<BTreeMap<u32, MsiMessage>>,
    next_gsi: Mutex<u32>,
    /// Device memory slots (guest address, the mapping KVM points into).
    device_slots: Mutex<BTreeMap<u32, (u64, Arc<MmapRegion>)>>,
    /// Guest RAM slots, as registered.
    ram_slots: Mutex<Vec<MemorySlot>>,
}

/// One KVM memory slot: where it sits in the guest and in this process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Where this process maps it.
    pub host_addr: u64,
}

/// Slots below this are guest RAM's; device memory takes the ones above.
const FIRST_DEVICE_SLOT: u32 = 16;

impl Vm {
    /// Creates the VM with its interrupt controllers (two 8259s and an
    /// IO-APIC, in the kernel) and PIT.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        // Intel VMX needs these pages for real mode; harmless on AMD.
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        // The speaker port (0x61) is answered by KVM, so a guest probing it
        // costs no exit to userspace.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
        Ok(Self {
            fd,
            msi_routes: Mutex::new(BTreeMap::new()),
            next_gsi: Mutex::new(IOAPIC_PINS),
            device_slots: Mutex::new(BTreeMap::new()),
            ram_slots: Mutex::new(Vec::new()),
        })
    }

    /// The raw VM fd, for creating vCPUs.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Hands every RAM region to KVM as a memory slot.
    pub fn register_memory(&self, ram: &GuestRam) -> Result<(), VmError> {
        for (slot, region) in ram.memory.iter().enumerate() {
            let host = ram
                .memory
                .get_host_address(region.start_addr())
                .map_err(|_| {
                    VmError::Kvm(
                        "guest region host address",
                        kvm_ioctls::Error::new(libc::EFAULT),
                    )
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a mapping of `region.len()` bytes
            // owned by `ram.memory`, which the VM keeps alive for as long as
            // the VM fd exists (the builder holds both in one `Machine`), and
            // slots never overlap because the regions do not.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
            crate::devices::bus::lock(&self.ram_slots).push(MemorySlot {
                slot: r.slot,
                guest_addr: r.guest_phys_addr,
                size: r.memory_size,
                host_addr: r.userspace_addr,
            });
        }
        Ok(())
    }

    /// Every memory slot the guest has, RAM first, then device memory.
    pub fn memory_slots(&self) -> Vec<MemorySlot> {
        let mut all = crate::devices::bus::lock(&self.ram_slots).clone();
        for (slot, (gpa, mapping)) in crate::devices::bus::lock(&self.device_slots).iter() {
            all.push(MemorySlot {
                slot: *slot,
                guest_addr: *gpa,
                size: mapping.size() as u64,
                host_addr: mapping.as_ptr() as u64,
            });
        }
        all
    }

    /// Raises or lowers ISA/IO-APIC line `irq` directly (no irqfd).
    pub fn set_irq_line(&self, irq: u32, level: bool) -> io::Result<()> {
        self.fd.set_irq_line(irq, level).map_err(io_err)
    }

    fn apply_routes(&self, msi: &BTreeMap<u32, MsiMessage>) -> io::Result<()> {
        let mut entries = Vec::with_capacity((IOAPIC_PINS + ISA_IRQS) as usize + msi.len());
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for irq in 0..ISA_IRQS {
            let (chip, pin) = if irq < 8 {
                (KVM_IRQCHIP_PIC_MASTER, irq)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
            };
            entries.push(irqchip_route(irq, chip, pin));
        }
        for (&gsi, msg) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.address as u32;
            e.u.msi.address_hi = (msg.address >> 32) as u32;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::other("GSI routing table too large"))?;
        self.fd.set_gsi_routing(&table).map_err(io_err)
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn io_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl VmOps for Vm {
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io_err)
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io_err)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.fd.register_irqfd(fd, gsi).map_err(io_err)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.fd.unregister_irqfd(fd, gsi).map_err(io_err)
    }

    fn register_irqfd_resample(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> io::Result<()> {
        self.fd
            .register_irqfd_with_resample(fd, resample, gsi)
            .map_err(io_err)
    }

    fn allocate_msi_gsi(&self) -> Option<u32> {
        let mut next = crate::devices::bus::lock(&self.next_gsi);
        (*next < MAX_GSI).then(|| {
            *next += 1;
            *next - 1
        })
    }

    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        let mut routes = crate::devices::bus::lock(&self.msi_routes);
        routes.insert(gsi, msg);
        self.apply_routes(&routes)
    }

    fn map_memory(&self, gpa: u64, mapping: Arc<MmapRegion>) -> io::Result<u32> {
        let mut slots = crate::devices::bus::lock(&self.device_slots);
        let slot = (FIRST_DEVICE_SLOT..)
            .find(|s| !slots.contains_key(s))
            .expect("fewer device slots than u32 values");
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: mapping.size() as u64,
            userspace_addr: mapping.as_ptr() as u64,
        };
        // SAFETY: `mapping` is a live mapping of `size()` bytes; the table
        // keeps an `Arc` of it until the slot is deleted (or the VM fd is
        // gone: the table drops with the `Vm`, after the fd closes). KVM
        // refuses a slot that overlaps another, so RAM is never shadowed.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(io_err)?;
        slots.insert(slot, (gpa, mapping));
        Ok(slot)
    }

    fn unmap_memory(&self, slot: u32) -> io::Result<()> {
        let mut slots = crate::devices::bus::lock(&self.device_slots);
        if !slots.contains_key(&slot) {
            return Err(io::ErrorKind::NotFound.into());
        }
        // A zero-sized region deletes the slot.
        let r = kvm_userspace_memory_region {
            slot,
            ..Default::default()
        };
        // SAFETY: deleting a slot hands KVM no memory.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(io_err)?;
        slots.remove(&slot);
        Ok(())
    }
}
