//! ACPI tables: how the guest learns its CPUs, interrupt controllers, PCI
//! root, and how to power off and reset.
//!
//! Why ACPI rather than an MP table: both Debian kernels need it for an
//! IO-APIC and SMP (the cloud kernel cannot parse MP tables at all); ACPI
//! alone gives Linux a `poweroff` path (the hardware-reduced sleep control
//! register), a reset register, PCI INTx routing (`_PRT`) and ECAM (MCFG);
//! an MP table gives none of these. The platform is *hardware-reduced*
//! (Cloud Hypervisor's choice too): no PM timer, no SCI, no legacy PIC for
//! Linux to calibrate against — fewer exits during boot.
//!
//! Tables, in guest memory from [`layout::ACPI_START`]:
//! RSDP → XSDT → {FADT → DSDT, MADT, MCFG}.

use acpi_tables::Aml;
use acpi_tables::aml::{self, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{self, ports};

const OEM_ID: [u8; 6] = *b"P2PVM ";
const OEM_TABLE_ID: [u8; 8] = *b"P2PVMM  ";
const OEM_REVISION: u32 = 1;

/// What the tables describe.
#[derive(Debug, Clone, Copy)]
pub struct Platform {
    /// Number of vCPUs (APIC ids 0..n).
    pub vcpus: u8,
    /// Start of the PCI 64-bit BAR window.
    pub mmio64_start: u64,
}

/// Why the tables could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Writing them into guest memory failed.
    #[error("Writing ACPI tables into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// They do not fit below 1 MiB.
    #[error("ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(usize),
}

/// The tables as bytes, each with the guest address it must sit at.
#[derive(Debug)]
pub struct Tables {
    /// (address, bytes), RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// Guest address of the RSDP.
    pub fn rsdp(&self) -> u64 {
        self.blobs[0].0
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Builds every table for `platform`, laid out from [`layout::ACPI_START`].
pub fn build(platform: Platform) -> Result<Tables, AcpiError> {
    // Fixed order, each table 8-byte aligned after the RSDP.
    let rsdp_addr = layout::ACPI_START;
    let mut next = rsdp_addr + Rsdp::len() as u64;
    let mut place = |len: usize| {
        next = next.next_multiple_of(8);
        let at = next;
        next += len as u64;
        at
    };

    let dsdt = dsdt(platform);
    let dsdt_addr = place(dsdt.len());
    let fadt = bytes_of(&fadt(dsdt_addr));
    let fadt_addr = place(fadt.len());
    let madt = bytes_of(&madt(platform));
    let madt_addr = place(madt.len());
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, 0);
    let mcfg = bytes_of(&mcfg);
    let mcfg_addr = place(mcfg.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for a in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(a);
    }
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    if next > layout::HIGH_RAM_START {
        return Err(AcpiError::TooLarge((next - layout::ACPI_START) as usize));
    }
    Ok(Tables {
        blobs: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (mcfg_addr, mcfg),
            (xsdt_addr, xsdt),
        ],
    })
}

/// Writes `tables` into guest memory.
pub fn write(mem: &GuestMemoryMmap, tables: &Tables) -> Result<(), AcpiError> {
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::Memory)?;
    }
    Ok(())
}

fn io_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Power and sleep buttons are not fixed hardware (there are none).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.reset_reg = io_byte(ports::ACPI_RESET);
    b.reset_value = ports::ACPI_RESET_VALUE;
    b.sleep_control_reg = io_byte(ports::ACPI_SLEEP_CONTROL);
    b.sleep_status_reg = io_byte(ports::ACPI_SLEEP_STATUS);
    // IA-PC boot architecture: no VGA (bit 2), no ASPM control (bit 4).
    b.iapc_boot_arch = ((1u16 << 2) | (1 << 4)).into();
    b.finalize()
}

fn madt(p: Platform) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_START as u32),
    );
    for id in 0..p.vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    madt
}

/// The DSDT: the PCI host bridge with its windows and INTx routing, COM1,
/// pvpanic, the ECAM reservation, and the S5 sleep type.
fn dsdt(p: Platform) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ports::ACPI_S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let devices = [pci_root(p), com1(), pvpanic(), ecam_reservation()];
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("_SB_".into(), children).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// AML bytes of one device (so the device list can hold owned values).
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn pci_root(p: Platform) -> RawAml {
    let mmio32_end = (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32;
    let mmio64_end = p.mmio64_start + layout::PCI_MMIO64_SIZE - 1;
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_ports = aml::IO::new(ports::PCI_CONFIG_ADDRESS, ports::PCI_CONFIG_ADDRESS, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, ports::PCI_CONFIG_ADDRESS - 1, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffff, None);
    let mem32 = aml::AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        mmio32_end,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        p.mmio64_start,
        mmio64_end,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mem32, &mem64]);

    // _PRT: INTA#–INTD# of every slot to a GSI, swizzled like a PCI bridge
    // would, so functions with other pins still land on distinct lines.
    let mut entries = Vec::new();
    for slot in 1u32..32 {
        for pin in 0u32..4 {
            let gsi = layout::PCI_INTX_GSI_BASE + (slot + pin) % layout::PCI_INTX_LINES;
            entries.push(((slot << 16) | 0xffff, pin, gsi));
        }
    }
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &0u8, gsi]))
        .collect();
    let prt = aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect());

    RawAml(bytes_of(&aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &0u8),
            &aml::Name::new("_SEG".into(), &0u8),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_BBN".into(), &0u8),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    )))
}

fn com1() -> RawAml {
    let io = aml::IO::new(ports::COM1, ports::COM1, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, ports::COM1_IRQ);
    RawAml(bytes_of(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq])),
        ],
    )))
}

/// QEMU's pvpanic, which Linux's `pvpanic-mmio` driver binds (by `_HID`).
fn pvpanic() -> RawAml {
    let io = aml::IO::new(ports::PVPANIC, ports::PVPANIC, 1, 1);
    RawAml(bytes_of(&aml::Device::new(
        "PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io])),
        ],
    )))
}

/// Motherboard resources: the ECAM window, so Linux trusts MCFG.
fn ecam_reservation() -> RawAml {
    let mem = aml::Memory32Fixed::new(
        false,
        layout::PCI_ECAM_START as u32,
        layout::PCI_ECAM_SIZE as u32,
    );
    RawAml(bytes_of(&aml::Device::new(
        "MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &1u8),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem])),
        ],
    )))
}

#[cfg(test)]
mod tests;
