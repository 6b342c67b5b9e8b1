//! Our programs for the test host: release builds of `p2pvmm` and the
//! guests' programs, made (or found up to date) by the one cargo invocation
//! the image builder uses ([`p2pvm_images::release`]), so that tests and
//! images share one build. A debug `p2pvmm` would work but runs its exit
//! handling several times slower under the emulated L1.

use std::path::PathBuf;

use anyhow::bail;

/// Builds `p2pvmm` in release mode (a no-op when it is current) and returns
/// its path.
pub fn p2pvmm_release() -> anyhow::Result<PathBuf> {
    let dir = p2pvm_images::release::build()?;
    Ok(p2pvm_images::release::program(&dir, "p2pvmm")?)
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
