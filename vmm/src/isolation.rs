//! Choosing the isolation backend: `vm` needs hardware virtualization; these
//! development machines expose `/dev/kvm` through PVM, a software hypervisor
//! that cannot run ordinary guest kernels, so `auto` must tell them apart.

use std::path::Path;

/// How the service side is kept apart from the client side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// The service side as a namespaced, Landlock- and seccomp-confined process.
    Sandbox,
    /// Two KVM virtual machines (needs hardware virtualization).
    Vm,
    /// `vm` where hardware virtualization works, else `sandbox`.
    Auto,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isolation::Sandbox => "sandbox",
            Isolation::Vm => "vm",
            Isolation::Auto => "auto",
        })
    }
}

/// What the host offers, as far as the choice is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVirt {
    /// `/dev/kvm` exists.
    pub kvm: bool,
    /// `/dev/kvm` is served by PVM (software), not VT-x/AMD-V.
    pub pvm: bool,
    /// The CPU advertises `vmx` or `svm`.
    pub hw_flag: bool,
}

impl HostVirt {
    /// Probes this host.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_parts(
            Path::new("/dev/kvm").exists(),
            Path::new("/sys/module/kvm_pvm").exists(),
            &cpuinfo,
        )
    }

    fn from_parts(kvm: bool, pvm: bool, cpuinfo: &str) -> Self {
        let hw_flag = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        Self { kvm, pvm, hw_flag }
    }

    /// Whether full Linux guests can run at native speed here.
    pub fn hardware(&self) -> bool {
        self.kvm && self.hw_flag && !self.pvm
    }
}

/// The backend chosen and why, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The backend to run.
    pub backend: Isolation,
    /// Why.
    pub reason: String,
}

/// Why a requested backend cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    /// `vm` was requested explicitly.
    #[error("--isolation vm: {0}")]
    VmUnavailable(String),
}

const VM_IMAGES_NOT_BUILT: &str = "no VM images were found (build them with `cargo run --release -p p2pvm-images -- build`, or give --images DIR or --vms FILE)";

/// Why KVM guests cannot run on `host` (empty when they can).
pub fn why_not_vm(host: &HostVirt) -> String {
    if !host.kvm {
        "no /dev/kvm".to_owned()
    } else if host.pvm {
        "/dev/kvm is the PVM software hypervisor (no hardware virtualization)".to_owned()
    } else if !host.hw_flag {
        "the CPU has no vmx/svm flag".to_owned()
    } else {
        String::new()
    }
}

/// Resolves `requested` against what the host offers; `vms_given` says
/// whether there are VMs to run (images found, or `--vms`).
pub fn choose(
    requested: Isolation,
    host: &HostVirt,
    vms_given: bool,
) -> Result<Choice, ChoiceError> {
    let why_not_vm = match why_not_vm(host) {
        w if !w.is_empty() => w,
        _ if !vms_given => VM_IMAGES_NOT_BUILT.to_owned(),
        _ if requested == Isolation::Sandbox => String::new(),
        _ => {
            return Ok(Choice {
                backend: Isolation::Vm,
                reason: "hardware virtualization is available".into(),
            });
        }
    };
    match requested {
        Isolation::Sandbox => Ok(Choice {
            backend: Isolation::Sandbox,
            reason: "requested with --isolation sandbox".into(),
        }),
        Isolation::Vm => Err(ChoiceError::VmUnavailable(why_not_vm)),
        Isolation::Auto => Ok(Choice {
            backend: Isolation::Sandbox,
            reason: format!("auto: {why_not_vm}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_is_not_hardware() {
        let pvm = HostVirt::from_parts(true, true, "flags\t: fpu sse2\n");
        assert!(!pvm.hardware());
        let c = choose(Isolation::Auto, &pvm, true).unwrap();
        assert_eq!(c.backend, Isolation::Sandbox);
        assert!(c.reason.contains("PVM"), "{}", c.reason);
        let err = choose(Isolation::Vm, &pvm, true).unwrap_err().to_string();
        assert!(err.contains("PVM software hypervisor"), "{err}");
        let hw = HostVirt::from_parts(true, false, "flags\t: fpu vmx sse2\n");
        assert!(hw.hardware());
        assert_eq!(
            choose(Isolation::Auto, &hw, true).unwrap().backend,
            Isolation::Vm
        );
        assert_eq!(
            choose(Isolation::Vm, &hw, true).unwrap().backend,
            Isolation::Vm
        );
        assert_eq!(
            choose(Isolation::Sandbox, &hw, true).unwrap().backend,
            Isolation::Sandbox
        );
        // No VMs to run: auto stays on the sandbox and says why.
        let c = choose(Isolation::Auto, &hw, false).unwrap();
        assert_eq!(c.backend, Isolation::Sandbox);
        assert!(c.reason.contains("p2pvm-images"), "{}", c.reason);
        let no_svm = HostVirt::from_parts(true, false, "flags\t: fpu sse2\n");
        let err = choose(Isolation::Vm, &no_svm, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vmx/svm"), "{err}");
        assert!(!HostVirt::from_parts(false, false, "flags : svm\n").hardware());
    }

    #[test]
    fn sandbox_is_always_available() {
        let c = choose(Isolation::Sandbox, &HostVirt::probe(), false).unwrap();
        assert_eq!(c.backend, Isolation::Sandbox);
    }
}
