//! Segment descriptors for the two entry modes the VMM starts a vCPU in: flat
//! 32-bit protected mode (PVH) and 64-bit long mode (the Linux 64-bit boot
//! protocol). KVM loads segment registers from `kvm_segment`s, but the same
//! descriptors are also written into guest memory so that a reload by the
//! guest finds what the registers already hold.

use kvm_bindings::kvm_segment;

/// Descriptor flags as they sit in bits 40–55 of a GDT entry (access byte
/// plus the flags nibble).
mod flags {
    /// Present, ring 0, code, execute/read, accessed; 4 KiB granularity, 32-bit.
    pub const CODE32: u16 = 0xc09b;
    /// Present, ring 0, code, execute/read, accessed; 4 KiB granularity, 64-bit.
    pub const CODE64: u16 = 0xa09b;
    /// Present, ring 0, data, read/write, accessed; 4 KiB granularity, 32-bit.
    pub const DATA: u16 = 0xc093;
    /// Present, 32/64-bit TSS, busy (VMX checks insist on a busy TSS in TR).
    pub const TSS: u16 = 0x008b;
}

/// A GDT entry from its flags, base and limit (the usual bit scattering).
pub fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn base(e: u64) -> u64 {
    ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000)
}

fn limit(e: u64) -> u32 {
    let raw = ((e & 0xffff) | ((e >> 32) & 0x000f_0000)) as u32;
    // With 4 KiB granularity the limit counts pages.
    if e & (1 << 55) != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The `kvm_segment` that loading selector `index * 8` from `table` gives.
pub fn segment(table: &[u64], index: usize) -> kvm_segment {
    let e = table[index];
    kvm_segment {
        base: base(e),
        limit: limit(e),
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g: ((e >> 55) & 1) as u8,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from((e >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Selector indexes in both tables.
pub const CODE: usize = 1;
/// Data segment index.
pub const DATA: usize = 2;
/// Task register index.
pub const TSS: usize = 3;

/// The GDT for a 32-bit (PVH) entry.
pub fn table32() -> [u64; 4] {
    [
        0,
        entry(flags::CODE32, 0, 0xfffff),
        entry(flags::DATA, 0, 0xfffff),
        entry(flags::TSS, 0, 0x67),
    ]
}

/// The GDT for a 64-bit entry.
pub fn table64() -> [u64; 4] {
    [
        0,
        entry(flags::CODE64, 0, 0xfffff),
        entry(flags::DATA, 0, 0xfffff),
        entry(flags::TSS, 0, 0x67),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        // The values every x86 boot loader writes for flat segments.
        assert_eq!(table32()[CODE], 0x00cf_9b00_0000_ffff);
        assert_eq!(table64()[CODE], 0x00af_9b00_0000_ffff);
        assert_eq!(table32()[DATA], 0x00cf_9300_0000_ffff);
        assert_eq!(table32()[TSS], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn segments_decode() {
        let t = table64();
        let cs = segment(&t, CODE);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (cs.type_, cs.present, cs.s, cs.l, cs.db, cs.g),
            (0xb, 1, 1, 1, 0, 1)
        );
        let tss = segment(&t, TSS);
        assert_eq!((tss.limit, tss.g, tss.s, tss.type_), (0x67, 0, 0, 0xb));
        let cs32 = segment(&table32(), CODE);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        assert_eq!(segment(&[0], 0).unusable, 1);
        let e = entry(0xc093, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcd_efff);
    }
}
