//! `p2pvm-kvm-hold [READY_FILE]`: holds one empty KVM VM open until killed.
//!
//! A helper for the nested test host (tests/vm), not part of the product.
//! Linux before 6.12 turns AMD-V on in every CPU when the first VM is
//! created (an IPI to each CPU sets EFER.SVME and the host save area) and off
//! again when the last one is destroyed. Under QEMU's emulated SVM the test
//! host has been seen to freeze at that very moment: its console stopped
//! right after it was ready, before our VMM's guests printed anything. With
//! one VM held from the test host's boot, virtualization is turned on once,
//! while nothing else runs, and never off. `READY_FILE` is written once the
//! VM exists.

use std::process::ExitCode;

fn main() -> ExitCode {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("p2pvm-kvm-hold: cannot open /dev/kvm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("p2pvm-kvm-hold: cannot create a VM: {e}");
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
