//! `p2pvmm`'s VM commands on this host: where `/dev/kvm` cannot run Linux
//! guests (the PVM software hypervisor, or no vmx/svm), they refuse with the
//! reason; where it can, they get as far as loading the kernel.

use std::process::Command;

use vmm::isolation::{HostVirt, why_not_vm};

fn p2pvmm(args: &[&str]) -> (bool, String) {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pvmm"));
    // Hermetic: the user's P2PVMM_LOG, P2PVMM_EXIT_STATS, ... stay out.
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("P2PVM") || name.starts_with("P2PD_") || name == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    let out = cmd
        .arg("--home")
        .arg(home.path())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_says_why_it_cannot_run_a_guest() {
    let host = HostVirt::probe();
    let (ok, err) = p2pvmm(&["run", "--name", "t", "--kernel", "/nonexistent/vmlinux"]);
    assert!(!ok);
    if host.hardware() {
        // A host that can run guests gets to the kernel, which is missing.
        assert!(err.contains("Reading /nonexistent/vmlinux"), "{err}");
    } else {
        let why = why_not_vm(&host);
        assert!(!why.is_empty());
        assert!(
            err.contains("cannot run a Linux guest here") && err.contains(&why),
            "{err}"
        );
        if host.pvm {
            assert!(err.contains("PVM software hypervisor"), "{err}");
        }
    }
}

#[test]
fn up_with_isolation_vm_refuses_without_hardware_virtualization() {
    let host = HostVirt::probe();
    let dir = tempfile::tempdir().unwrap();
    let vms = dir.path().join("vms.toml");
    std::fs::write(&vms, "[[vm]]\nname = \"a\"\nkernel = \"/nonexistent\"\n").unwrap();
    if host.hardware() {
        eprintln!(
            "this host has hardware virtualization: `up --isolation vm` would start VMs; checked by the nested tests instead"
        );
        return;
    }
    let (ok, err) = p2pvmm(&["up", "--isolation", "vm", "--vms", vms.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("--isolation vm") && err.contains(&why_not_vm(&host)),
        "{err}"
    );
}

#[test]
fn vm_configs_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(&cfg, "name = \"../escape\"\nkernel = \"/k\"\n").unwrap();
    let (ok, err) = p2pvmm(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--allow-software-kvm",
    ]);
    assert!(!ok);
    assert!(err.contains("VM name"), "{err}");
    let (ok, err) = p2pvmm(&[
        "run",
        "--name",
        "t",
        "--kernel",
        "/k",
        "--mem-mib",
        "1",
        "--allow-software-kvm",
    ]);
    assert!(!ok);
    assert!(err.contains("mem_mib"), "{err}");
}
