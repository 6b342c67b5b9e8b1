//! Our VMM for the test host: a release build of `p2pvmm`, made (or found
//! up to date) by cargo before a scenario runs. A debug build would work but
//! runs its exit handling several times slower under the emulated L1.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// Builds `p2pvmm` in release mode (a no-op when it is current) and returns
/// its path. Uses the cargo running the tests and the same target directory.
pub fn p2pvmm_release() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "vmm",
            "--bin",
            "p2pvmm",
        ])
        .current_dir(&workspace)
        .status()
        .context("running cargo to build p2pvmm")?;
    if !status.success() {
        bail!("cargo build --release -p vmm --bin p2pvmm failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("release/p2pvmm");
    if !bin.exists() {
        bail!("{} is missing after the build", bin.display());
    }
    Ok(bin)
}

/// The host's iproute2 `ip` (the L1 busybox has no `ip tuntap`), for scenarios
/// that create TAP devices; put in L1 at `/opt/ip`.
pub fn iproute2() -> anyhow::Result<PathBuf> {
    for p in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "iproute2's `ip` is needed to create TAP devices in the test host: apt-get install iproute2"
    )
}
