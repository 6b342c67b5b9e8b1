//! CPUID for a vCPU: what KVM supports on this host, with the hypervisor
//! bit, the KVM paravirtual leaves and the vCPU's own topology filled in.
//!
//! The hypervisor bit and the KVM leaves are not cosmetic: without them Linux
//! does not use kvm-clock, calibrates its TSC against the PIT, and under
//! nested virtualization that calibration never finishes
//! (`guest-kernel-facts.md` §7).

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX bit 24: the local APIC timer's TSC-deadline mode. KVM
/// emulates it (`KVM_CAP_TSC_DEADLINE_TIMER`) but leaves the bit out of
/// `KVM_GET_SUPPORTED_CPUID` for the VMM to set. With it, Linux arms its
/// timer by one absolute TSC value and needs no calibration of the APIC
/// timer's count rate at boot.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EDX bit 28: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// The base of the hypervisor leaves.
pub const KVM_BASE: u32 = 0x4000_0000;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Patches `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `id` of `count`;
/// `tsc_deadline`: KVM has `KVM_CAP_TSC_DEADLINE_TIMER`.
pub fn patch(cpuid: &mut CpuId, id: u8, count: u8, tsc_deadline: bool) {
    let mut has_kvm_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                // Initial APIC id, logical processor count, CLFLUSH line size (8 × 8 bytes).
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0xb | 0x1f => topology(e, id, count),
            // Intel deterministic cache parameters: cores per package − 1 in EAX[31:26].
            0x4 => {
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
            }
            KVM_BASE => {
                has_kvm_leaf = true;
                e.eax = e.eax.max(KVM_BASE + 1);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            // AMD: number of cores − 1.
            0x8000_0008 => e.ecx = (e.ecx & !0xff) | u32::from(count.saturating_sub(1)),
            _ => {}
        }
    }
    if !has_kvm_leaf {
        // KVM lists its leaves on every host that has them; a host that does
        // not still gets the signature so the guest knows what it runs on.
        let _ = cpuid.push(kvm_cpuid_entry2 {
            function: KVM_BASE,
            eax: KVM_BASE + 1,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
}

/// Extended topology (leaves 0xb and 0x1f): one thread per core, `count`
/// cores, the x2APIC id in EDX of every sub-leaf.
fn topology(e: &mut kvm_cpuid_entry2, id: u8, count: u8) {
    e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    e.edx = u32::from(id);
    match e.index {
        0 => {
            // SMT level: one thread, shift 0.
            e.eax = 0;
            e.ebx = 1;
            e.ecx = 1 << 8;
        }
        1 => {
            // Core level: the bits needed to number `count` cores.
            let shift = u32::from(count.max(1)).next_power_of_two().trailing_zeros();
            e.eax = shift;
            e.ebx = u32::from(count);
            e.ecx = (2 << 8) | 1;
        }
        n => {
            // Invalid level ends the enumeration.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                edx: EDX_HTT,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 2,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn hypervisor_bit_and_kvm_signature() {
        let mut c = sample();
        patch(&mut c, 0, 1, true);
        let l1 = leaf(&c, 1, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        let kvm = leaf(&c, KVM_BASE, 0);
        let mut sig = Vec::new();
        for r in [kvm.ebx, kvm.ecx, kvm.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert!(kvm.eax > KVM_BASE);
    }

    #[test]
    fn topology_per_vcpu() {
        let mut c = sample();
        patch(&mut c, 2, 4, false);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(leaf(&c, 0xb, 0).edx, 2);
        let core = leaf(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
        assert_eq!(leaf(&c, 0xb, 2).ecx >> 8, 0);
    }

    #[test]
    fn tsc_deadline_only_when_kvm_has_it() {
        let mut with = sample();
        patch(&mut with, 0, 1, true);
        assert_ne!(leaf(&with, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        let mut without = sample();
        patch(&mut without, 0, 1, false);
        assert_eq!(leaf(&without, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }
}
