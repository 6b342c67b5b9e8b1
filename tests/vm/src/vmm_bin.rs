//! Our VMM for the test host: a release build of `p2pvmm`, made (or found
//! up to date) by cargo before a scenario runs. A debug build would work but
//! runs its exit handling several times slower under the emulated L1.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// Builds `p2pvmm` in release mode (a no-op when it is current) and returns
/// its path. Uses the cargo running the tests and the same target directory.
pub fn p2pvmm_release() -> anyhow::Result<PathBuf> {
    Ok(release(&[("vmm", "p2pvmm")])?.remove(0))
}

/// The platform's programs for the guests, in release mode: `p2pd`,
/// `p2p-frontend`, `p2pctl` (in that order).
pub fn guest_programs_release() -> anyhow::Result<Vec<PathBuf>> {
    release(&[
        ("p2p-service-vm", "p2pd"),
        ("guest-frontend", "p2p-frontend"),
        ("p2pctl", "p2pctl"),
    ])
}

/// Builds `(package, binary)` pairs in release mode in one cargo run (a no-op
/// when current) and returns their paths, in order.
pub fn release(bins: &[(&str, &str)]) -> anyhow::Result<Vec<PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--locked"]);
    for (package, bin) in bins {
        cmd.args(["-p", package, "--bin", bin]);
    }
    let status = cmd
        .current_dir(&workspace)
        .status()
        .context("running cargo for release builds")?;
    if !status.success() {
        bail!("cargo build --release of {bins:?} failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    bins.iter()
        .map(|(_, bin)| {
            let path = target.join("release").join(bin);
            if path.exists() {
                Ok(path)
            } else {
                bail!("{} is missing after the build", path.display())
            }
        })
        .collect()
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
