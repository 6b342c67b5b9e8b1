//! A virtio-pci function's configuration space, BAR 0 and MSI-X table under
//! arbitrary accesses through 0xcf8/0xcfc, ECAM and the MMIO bus (BAR moves,
//! sizing, capability writes, queue registers). The VMM must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::pci_config(data);
});
