//! The guest physical address map: where RAM, boot structures, firmware
//! tables and device windows sit. Everything the builder writes into guest
//! memory, and every window the PCI allocator hands out, is named here.
//!
//! ```text
//! 0x0000_0000  low RAM ........................ e820 usable to 0x9_fc00
//!   0x0000_0500  GDT (boot segments)
//!   0x0000_6000  PVH start_info + its e820 table
//!   0x0000_7000  Linux zero page (bzImage boot)
//!   0x0000_9000  page tables (identity map of 0-4 GiB, bzImage boot)
//!   0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first, where Linux scans for it; reserved)
//! 0x0010_0000  RAM (kernel at its ELF p_paddr, initrd at the top of low RAM)
//! 0xc000_0000  PCI 32-bit BAR window (512 MiB)
//! 0xe000_0000  PCI ECAM, bus 0 only (1 MiB; MCFG; reserved in e820)
//! 0xfec0_0000  IO-APIC
//! 0xfee0_0000  local APIC
//! 0x1_0000_0000 RAM above 4 GiB (when the guest has more than 3 GiB)
//! after RAM, 1 GiB-aligned: PCI 64-bit BAR window (64 GiB)
//! ```

/// Start of the GDT the boot segments are described by.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of a null IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// The Linux boot protocol's "zero page" (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PML4 of the boot identity map (64-bit boot protocol).
pub const PML4_START: u64 = 0x9000;
/// The PDPT of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories (2 MiB pages) covering 0–4 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line accepted (Linux's `COMMAND_LINE_SIZE` on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Where the stack pointer starts for the 64-bit boot protocol (grows down,
/// below the command line).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Start of the extended BIOS data area: RAM above it is not usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables, RSDP first. Linux also finds the RSDP by scanning
/// 0xe0000–0xfffff, so a kernel that ignores the boot protocol's pointer
/// still boots with ACPI.
pub const ACPI_START: u64 = 0xe_0000;
/// The x86 reset vector (F000:FFF0): where a CPU starts after reset, and
/// where Linux jumps (in real mode) when every other way of rebooting failed.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// End of the legacy BIOS area (exclusive) and start of "high" memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM stops here and resumes at 4 GiB.
pub const MMIO32_START: u64 = 0xc000_0000;
/// PCI 32-bit BAR window.
pub const PCI_MMIO32_START: u64 = MMIO32_START;
/// Size of the PCI 32-bit BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration (ECAM). Only bus 0 exists, so the
/// window is 32 devices × 8 functions × 4 KiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window (bus 0 only).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// IO-APIC registers (the in-kernel IO-APIC answers here).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// First address above the 32-bit hole.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Size of the PCI 64-bit BAR window (placed after RAM).
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// Where the in-kernel TSS lives (Intel VMX needs three pages KVM can use;
/// placed just below the BIOS area at the top of the 4 GiB space).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real mode on Intel, the page after the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Port I/O map. Everything else reads as all ones and ignores writes.
pub mod ports {
    /// i8042 data port (only the controller's reset command matters).
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port; `0xfe` written here resets the machine.
    pub const I8042_COMMAND: u16 = 0x64;
    /// CMOS/RTC index and data ports.
    pub const RTC: u16 = 0x70;
    /// The guest's "reached userspace" marker: `/init` writes
    /// [`BOOT_MARKER_VALUE`] here so the VMM can report boot time to init.
    pub const BOOT_MARKER: u16 = 0x440;
    /// Value written to [`BOOT_MARKER`].
    pub const BOOT_MARKER_VALUE: u8 = 0x7b;
    /// pvpanic (ACPI `QEMU0001`): the guest writes here when it panics.
    pub const PVPANIC: u16 = 0x505;
    /// ACPI hardware-reduced sleep control (write), sleep status (read) and
    /// reset registers, one byte each.
    pub const ACPI_PM: u16 = 0x600;
    /// Sleep control register (FADT `SLEEP_CONTROL_REG`).
    pub const ACPI_SLEEP_CONTROL: u16 = ACPI_PM;
    /// Sleep status register (FADT `SLEEP_STATUS_REG`).
    pub const ACPI_SLEEP_STATUS: u16 = ACPI_PM + 1;
    /// Reset register (FADT `RESET_REG`).
    pub const ACPI_RESET: u16 = ACPI_PM + 2;
    /// Value the guest writes to [`ACPI_RESET`] to reset.
    pub const ACPI_RESET_VALUE: u8 = 0x01;
    /// Sleep type of S5 (soft off) as `_S5_` tells the guest.
    pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
    /// PCI configuration mechanism #1: address register.
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    /// PCI configuration mechanism #1: data window (4 bytes).
    pub const PCI_CONFIG_DATA: u16 = 0xcfc;
    /// COM1.
    pub const COM1: u16 = 0x3f8;
    /// COM1's ISA interrupt.
    pub const COM1_IRQ: u32 = 4;
}

/// First GSI of the PCI INTx lines (IO-APIC pins 16–23).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of PCI INTx lines; slots share them round-robin.
pub const PCI_INTX_LINES: u32 = 8;

/// The GSI of INTA# of PCI slot `slot` (the only pin our functions use).
pub fn pci_intx_gsi(slot: u8) -> u32 {
    PCI_INTX_GSI_BASE + u32::from(slot) % PCI_INTX_LINES
}

// The 32-bit windows must not overlap each other or the APICs.
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);

/// The RAM ranges for a guest of `mem_size` bytes: up to the 32-bit hole,
/// then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO32_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO32_START),
            (RAM_64BIT_START, mem_size - MMIO32_START),
        ]
    }
}

/// Start of the PCI 64-bit window for a guest of `mem_size` bytes: after the
/// end of RAM (and never below 4 GiB), aligned to 1 GiB.
pub fn pci_mmio64_start(mem_size: u64) -> u64 {
    let ram_end = ram_ranges(mem_size)
        .last()
        .map_or(RAM_64BIT_START, |&(start, len)| start + len)
        .max(RAM_64BIT_START);
    ram_end.next_multiple_of(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(pci_mmio64_start(256 << 20), RAM_64BIT_START);
    }

    #[test]
    fn big_guests_skip_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO32_START), (RAM_64BIT_START, 1 << 30)]);
        assert_eq!(pci_mmio64_start(4 << 30), 5 << 30);
        // The hole holds every 32-bit window and the APICs.
        for a in [PCI_MMIO32_START, PCI_ECAM_START, IOAPIC_START, APIC_START] {
            assert!((MMIO32_START..RAM_64BIT_START).contains(&a));
        }
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let spans = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (PVH_INFO_START, 0x40),
            (PVH_MEMMAP_START, 0x20 * 16),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x4000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in spans.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START);
            for b in &spans[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
