//! The x86_64 PC this VMM presents: its address map, boot protocols, CPU
//! state at reset, and the firmware tables a firmware-less boot still needs.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod msr;
pub mod regs;
