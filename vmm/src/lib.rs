//! `p2pvmm`: the VMM of the split platform and its supervisor.
//!
//! The VMM boots Debian's Linux kernel in KVM guests; the supervisor runs the
//! platform's two sides and the event channels between them.
//!
//! ```text
//!  p2pvmm up ──► p2pvmm run (one process per VM) ──► KVM
//!                 builder.rs: memory, kernel, ACPI, vCPUs, devices
//!                 vstate/    kvm, vm, memory, vcpu
//!                 arch/x86_64 layout, boot protocols, CPUID, MSRs, ACPI
//!                 devices/   legacy (serial, RTC, i8042, ACPI PM), pci, virtio,
//!                            channel (the shared region and doorbells)
//! ```
//!
//! Backends: `sandbox` ([`sandbox`], [`supervisor`]) runs everywhere; `vm`
//! (the platform's two KVM guests over the same channel, [`platform`],
//! [`vm_supervisor`]) needs hardware virtualization and is chosen by
//! [`isolation`] only where it exists.

pub mod arch;
pub mod builder;
pub mod config;
pub mod console;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod hostnet;
pub mod instance;
pub mod isolation;
pub mod lifecycle;
pub mod metrics;
pub mod platform;
pub mod ratelimit;
pub mod runner;
pub mod sandbox;
pub mod seccomp;
pub mod supervisor;
pub mod vm_dir;
pub mod vm_supervisor;
pub mod vstate;
