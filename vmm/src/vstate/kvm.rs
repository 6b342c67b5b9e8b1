//! `/dev/kvm`: opening it and checking it offers what this VMM relies on.

use kvm_ioctls::{Cap, Kvm};

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("Opening /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel's KVM API is not the stable one.
    #[error("KVM API version {0}, expected 12")]
    ApiVersion(i32),
    /// A capability this VMM needs is missing.
    #[error("KVM lacks {0:?}, which this VMM needs")]
    MissingCap(Cap),
    /// An ioctl on the system fd failed.
    #[error("{0}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

/// Capabilities every VM needs: the in-kernel interrupt controllers and
/// timer, eventfds wired into the VM both ways, GSI routing for MSI-X, and
/// CPUID/MSR control.
const REQUIRED: &[Cap] = &[
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::IrqRouting,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::PitState2,
    Cap::ExtCpuid,
    Cap::AdjustClock,
    Cap::SignalMsi,
];

/// Opens `/dev/kvm` and checks its API version and capabilities.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion(version));
    }
    for cap in REQUIRED {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCap(*cap));
        }
    }
    Ok(kvm)
}
