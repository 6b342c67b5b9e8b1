//! Register state of a vCPU at its first instruction, for each entry mode,
//! and the guest memory structures that state points at (GDT, IDT, page
//! tables).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt;
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: flat 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh {
        /// The kernel's PVH entry point.
        entry: u64,
        /// Guest address of the start info.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity-mapped low 4 GiB,
    /// `%rsi` = the zero page.
    Linux64 {
        /// `startup_64`: the load address + 0x200.
        entry: u64,
        /// Guest address of `boot_params`.
        zero_page: u64,
    },
}

/// Why register state could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing a boot structure into guest memory failed.
    #[error("Writing boot structures into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// General registers at entry.
pub fn regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Pvh { entry, start_info } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rbx: start_info,
            ..Default::default()
        },
        EntryMode::Linux64 { entry, zero_page } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: zero_page,
            ..Default::default()
        },
    }
}

/// Writes the GDT and IDT (and, for long mode, page tables) into guest memory
/// and returns `sregs` updated to match. `sregs` comes from the vCPU, so
/// fields this function does not own (APIC base, ...) keep KVM's values.
pub fn sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let table = match mode {
        EntryMode::Pvh { .. } => gdt::table32(),
        EntryMode::Linux64 { .. } => gdt::table64(),
    };
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Memory)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = gdt::segment(&table, gdt::CODE);
    let data = gdt::segment(&table, gdt::DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(&table, gdt::TSS);

    match mode {
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 { .. } => {
            write_identity_map(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps 0–4 GiB with 2 MiB pages: the boot protocol wants the
/// kernel, the zero page and the command line mapped; covering all of the
/// 32-bit space also maps every device the early kernel might touch.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(RegsError::Memory);
    w(PDPTE_START | PRESENT_RW, PML4_START)?;
    for dir in 0..4u64 {
        let pd = PDE_START + dir * 0x1000;
        w(pd | PRESENT_RW, PDPTE_START + dir * 8)?;
        for i in 0..512u64 {
            let phys = ((dir << 9) + i) << 21;
            w(phys | PRESENT_RW | PAGE_SIZE_2M, pd + i * 8)?;
        }
    }
    Ok(())
}

/// FPU state at reset as the architecture defines it (x87 control word
/// 0x37f, all SSE exceptions masked).
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Local APIC register offsets of the two local interrupt lines.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Wires LINT0 to the 8259 (ExtINT) and LINT1 to NMI, as a PC's firmware
/// does, so that a guest which never touches its local APIC still receives
/// the PIC's interrupts.
pub fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    let mut update = |offset: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = lapic.regs[offset + i] as u8;
        }
        let value = u32::from_le_bytes(b);
        // Delivery mode is bits 8–10.
        let value = (value & !0x700) | (mode << 8);
        for (i, v) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *v as _;
        }
    };
    update(APIC_LVT0, APIC_MODE_EXTINT);
    update(APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_entry() {
        let m = mem();
        let s = sregs(
            &m,
            EntryMode::Linux64 {
                entry: 0x100_0200,
                zero_page: 0x7000,
            },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        // The last 2 MiB page below 4 GiB maps itself.
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
        let gdt: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt, gdt::table64()[1]);
    }

    #[test]
    fn pvh_entry() {
        let m = mem();
        let mode = EntryMode::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        };
        let s = sregs(&m, mode, kvm_sregs::default()).unwrap();
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, 0);
        let r = regs(mode);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, 0x6000, 2));
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_bindings::kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!((l.regs[APIC_LVT0 + 1] as u8) & 7, 7);
        assert_eq!((l.regs[APIC_LVT1 + 1] as u8) & 7, 4);
    }
}
