//! Model-specific registers a vCPU starts with: the syscall MSRs cleared,
//! fast strings on, and MTRRs enabled with write-back as the default memory
//! type (without it some hosts run guest RAM uncached).

use kvm_bindings::{Msrs, kvm_msr_entry};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The boot MSRs, keeping only those this host's KVM knows (`supported`,
/// from `KVM_GET_MSR_INDEX_LIST`), so `KVM_SET_MSRS` sets all it is given.
pub fn boot_msrs(supported: &[u32]) -> Msrs {
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    // At most 11 entries: far below the wrapper's limit.
    Msrs::from_entries(&entries).expect("a dozen MSRs fit the wrapper")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_supported_msrs() {
        let m = boot_msrs(&[MSR_MTRR_DEF_TYPE, MSR_LSTAR, 0x1234]);
        let got: Vec<(u32, u64)> = m.as_slice().iter().map(|e| (e.index, e.data)).collect();
        assert_eq!(
            got,
            vec![(MSR_LSTAR, 0), (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB)]
        );
    }
}
