//! `p2pvm-kvm-hold [READY_FILE]`: holds one KVM VM open until killed, with
//! an in-kernel interrupt controller and one vCPU that never runs.
//!
//! A helper for the nested test host (tests/vm), not part of the product.
//! It keeps the test host's KVM from changing its own code while the
//! scenario runs, which is when QEMU's emulator has been seen to fail:
//! - Linux before 6.12 turns AMD-V on in every CPU when the first VM is
//!   created (an IPI to each CPU sets EFER.SVME and the host save area) and
//!   off again when the last one is destroyed; the test host froze at that
//!   moment. With one VM held from boot, virtualization is turned on once,
//!   while nothing else runs, and never off.
//! - KVM's local APIC keeps a static key counting APICs that their guest has
//!   not enabled yet (`apic_sw_disabled`). It flips, and the kernel patches
//!   every branch on it with `int3` breakpoints across all CPUs, each time
//!   the count passes zero: when a VM's vCPUs are created and again shortly
//!   after its guest enables their APICs, so at every boot and reboot of
//!   either VM. Under the emulator's multi-threaded CPUs such a patch
//!   sometimes leaves one CPU executing the breakpoint after it was removed,
//!   and the test host dies with "Oops: int3" in `apic_has_pending_timer`.
//!   The held vCPU never runs, so its APIC stays software-disabled and the
//!   count never reaches zero: the key is set once, here, and never patched
//!   again.
//!
//! `READY_FILE` is written once the VM and its vCPU exist.

use std::process::ExitCode;

fn main() -> ExitCode {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("p2pvm-kvm-hold: cannot open /dev/kvm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("p2pvm-kvm-hold: cannot create a VM: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The interrupt controller first: a vCPU made without one would flip
    // another static key (`kvm_has_noapic_vcpu`) instead.
    if let Err(e) = vm.create_irq_chip() {
        eprintln!("p2pvm-kvm-hold: cannot create the interrupt controller: {e}");
        return ExitCode::FAILURE;
    }
    let _vcpu = match vm.create_vcpu(0) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("p2pvm-kvm-hold: cannot create a vCPU: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(ready) = std::env::args_os().nth(1)
        && let Err(e) = std::fs::write(&ready, b"held\n")
    {
        eprintln!(
            "p2pvm-kvm-hold: cannot write {}: {e}",
            ready.to_string_lossy()
        );
        return ExitCode::FAILURE;
    }
    loop {
        std::thread::park();
    }
}
