//! The VM's state as KVM holds it: the VM, its memory and its vCPUs.

pub mod kvm;
pub mod memory;
pub mod profile;
pub mod slots;
pub mod vcpu;
pub mod vm;
