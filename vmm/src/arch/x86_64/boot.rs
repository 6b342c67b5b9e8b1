//! What the kernel is told at entry: the e820 memory map, and the structure
//! that carries it with the command line, the initramfs and the ACPI RSDP —
//! PVH's `hvm_start_info` or the Linux boot protocol's zero page.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::{
    self, ACPI_START, EBDA_START, HIGH_RAM_START, PCI_ECAM_SIZE, PCI_ECAM_START, PVH_INFO_START,
    PVH_MEMMAP_START, ZERO_PAGE_START, ram_ranges,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map of a guest with `mem_size` bytes of RAM. The ECAM window
/// is listed as reserved: Linux only trusts an MCFG region that the firmware
/// reserved.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let e = |addr, size, kind| E820Entry { addr, size, kind };
    let ranges = ram_ranges(mem_size);
    let low_end = ranges[0].1;
    let mut map = vec![
        e(0, EBDA_START, E820_RAM),
        e(EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
        e(ACPI_START, HIGH_RAM_START - ACPI_START, E820_RESERVED),
        e(HIGH_RAM_START, low_end - HIGH_RAM_START, E820_RAM),
        e(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
    ];
    if let Some(&(addr, size)) = ranges.get(1) {
        map.push(e(addr, size, E820_RAM));
    }
    map
}

/// Where the loaded initramfs sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Why the boot structures could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// linux-loader refused or could not write them.
    #[error("Writing the boot parameters")]
    Configurator(#[source] linux_loader::configurator::Error),
    /// Too many e820 entries for the zero page.
    #[error("The memory map has {0} entries; the zero page holds 128")]
    TooManyE820(usize),
}

/// PVH: writes `hvm_start_info`, its memory map and module list; returns its
/// address (for `%ebx`).
pub fn write_pvh(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    cmdline_addr: u64,
    initrd: Option<Initrd>,
    rsdp_addr: u64,
) -> Result<u64, BootError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules_addr =
        PVH_MEMMAP_START + (memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modules_addr } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(modules_addr));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configurator)?;
    Ok(PVH_INFO_START)
}

/// Linux boot protocol: writes the zero page from the kernel's own setup
/// header; returns its address (for `%rsi`).
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: setup_header,
    e820: &[E820Entry],
    cmdline_addr: u64,
    cmdline_size: usize,
    initrd: Option<Initrd>,
    rsdp_addr: u64,
) -> Result<u64, BootError> {
    /// "Undefined" loader id: the kernel only uses it for diagnostics.
    const LOADER_TYPE_UNDEFINED: u8 = 0xff;
    /// loadflags bit 7: the loader set heap_end_ptr... not used; bit 5 QUIET off.
    const KEEP_SEGMENTS: u8 = 1 << 6;
    let mut bp = boot_params {
        hdr: header,
        ..Default::default()
    };
    if e820.len() > bp.e820_table.len() {
        return Err(BootError::TooManyE820(e820.len()));
    }
    bp.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    bp.hdr.loadflags |= KEEP_SEGMENTS;
    bp.hdr.cmd_line_ptr = cmdline_addr as u32;
    bp.hdr.cmdline_size = cmdline_size as u32;
    if let Some(rd) = initrd {
        bp.hdr.ramdisk_image = rd.addr as u32;
        bp.hdr.ramdisk_size = rd.size as u32;
    }
    bp.acpi_rsdp_addr = rsdp_addr;
    for (slot, e) in bp.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    bp.e820_entries = e820.len() as u8;
    let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configurator)?;
    Ok(ZERO_PAGE_START)
}

/// The only firmware this VM has: 16 bytes at the reset vector that write
/// the ACPI reset register. Linux ends up here when it reboots through "the
/// BIOS" — which it does by default on hardware-reduced ACPI platforms
/// (it prefers EFI there, has none, then falls back to a real-mode jump to
/// F000:FFF0). Without this stub such a reboot spins in zeroed memory.
pub fn reset_stub() -> [u8; 16] {
    let port = layout::ports::ACPI_RESET.to_le_bytes();
    [
        0xba,
        port[0],
        port[1], // mov dx, ACPI_RESET
        0xb0,
        layout::ports::ACPI_RESET_VALUE, // mov al, ACPI_RESET_VALUE
        0xee,                            // out dx, al
        0xf4,                            // hlt
        0xeb,
        0xfd, // jmp back to hlt
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

/// Writes [`reset_stub`] at [`layout::RESET_VECTOR`].
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::Bytes;
    mem.write_slice(&reset_stub(), GuestAddress(layout::RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn reset_stub_targets_the_reset_register() {
        let s = reset_stub();
        assert_eq!(u16::from_le_bytes([s[1], s[2]]), layout::ports::ACPI_RESET);
        assert_eq!(s[4], layout::ports::ACPI_RESET_VALUE);
        // jmp -3 lands on the hlt.
        assert_eq!((s[6], s[8] as i8), (0xf4, -3));
    }

    #[test]
    fn e820_small_guest() {
        let map = e820_map(256 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the EBDA and the BIOS area is usable.
        assert_eq!(ram, (256 << 20) - (HIGH_RAM_START - EBDA_START));
        assert!(
            map.iter()
                .any(|e| e.addr == PCI_ECAM_START && e.kind == E820_RESERVED)
        );
        // Sorted and disjoint.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:x?}");
        }
    }

    #[test]
    fn e820_big_guest_resumes_at_4g() {
        let map = e820_map(5 << 30);
        let last = *map.last().unwrap();
        assert_eq!(
            (last.addr, last.size, last.kind),
            (1 << 32, 2 << 30, E820_RAM)
        );
    }

    #[test]
    fn pvh_start_info_round_trip() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = e820_map(64 << 20);
        let rd = Initrd {
            addr: 0x300_0000,
            size: 12345,
        };
        let at = write_pvh(&mem, &map, 0x2_0000, Some(rd), ACPI_START).unwrap();
        let si: hvm_start_info = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!((si.cmdline_paddr, si.rsdp_paddr), (0x2_0000, ACPI_START));
        assert_eq!(si.memmap_entries as usize, map.len());
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(si.memmap_paddr)).unwrap();
        assert_eq!(
            (first.addr, first.size, first.type_),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(si.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (rd.addr, rd.size));
    }

    #[test]
    fn zero_page_round_trip() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = e820_map(64 << 20);
        let hdr = setup_header {
            header: 0x5372_6448,
            version: 0x020f,
            ..Default::default()
        };
        let rd = Initrd {
            addr: 0x200_0000,
            size: 4096,
        };
        let at = write_zero_page(&mem, hdr, &map, 0x2_0000, 100, Some(rd), ACPI_START).unwrap();
        let bp: boot_params = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!({ bp.hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ bp.hdr.ramdisk_image }, 0x200_0000);
        assert_eq!({ bp.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(bp.e820_entries as usize, map.len());
        let e = bp.e820_table[3];
        assert_eq!(({ e.addr }, { e.r#type }), (HIGH_RAM_START, E820_RAM));
        assert!(write_zero_page(&mem, hdr, &vec![map[0]; 129], 0, 0, None, 0).is_err());
    }
}
