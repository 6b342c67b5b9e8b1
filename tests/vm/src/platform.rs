//! Scenarios that run the platform's two VMs: the images built by
//! `p2pvm-images` (with the test host's kernel, from the cache), and in L1
//! what operating them needs — `p2pvmm`, our `p2pd`/`p2pctl` for a host-side
//! node, iproute2 for the TAP, e2fsprogs for the store disk, util-linux's
//! namespace tools for the sandbox backend (to compare with). The L1 script
//! gets the console helpers of `scenarios/consoles.sh` prepended.

use anyhow::Context;
use p2pvm_images::build::{BuildOptions, Built, build};
use p2pvm_images::kernel::KernelOptions;
use p2pvm_images::release;
use p2pvm_images::util::{Cache, require_tool};

use crate::{Scenario, TestHost};

/// The console helpers every platform scenario starts with.
pub const CONSOLES_SH: &str = include_str!("../scenarios/consoles.sh");

/// Builds the images into `<cache>/platform-images` and returns a scenario
/// running `script` with them (at `$ROOT/guest/{service,client}.cpio`, and
/// `link_images DIR` puts them with the kernel in one directory).
pub fn scenario(host: &TestHost, name: &str, script: &str) -> anyhow::Result<(Scenario, Built)> {
    let bins = release::build()?;
    let images = build(
        &Cache::at(host.cache_dir().to_path_buf())?,
        &BuildOptions {
            out: host.cache_dir().join("platform-images"),
            // The test host's kernel, already in the cache.
            kernel: KernelOptions::from_env(),
            programs: release::programs(&bins, None)?,
        },
    )
    .context("building the platform's images")?;
    anyhow::ensure!(
        images.lock.kernel.version == host.kernel().version,
        "the images have kernel {} but the test host runs {}",
        images.lock.kernel.version,
        host.kernel().version
    );
    let scenario = Scenario::new(name, format!("{CONSOLES_SH}\n{script}"))
        .p2pvmm(release::program(&bins, "p2pvmm")?)
        .file("/guest/service.cpio", images.service())
        .file("/guest/client.cpio", images.client())
        .binary("/opt/p2pd", release::program(&bins, "p2pd")?)
        .binary(
            "/opt/p2p-frontend",
            release::program(&bins, "p2p-frontend")?,
        )
        .binary("/opt/p2pctl", release::program(&bins, "p2pctl")?)
        .binary(
            "/opt/apibench",
            release::program(&bins.join("examples"), "apibench")?,
        )
        .binary("/opt/ip", crate::vmm_bin::iproute2()?)
        // `up` makes the store disk with e2fsprogs.
        .binary("/opt/mkfs.ext4", require_tool("mkfs.ext4", "e2fsprogs")?);
    // The sandbox backend (for comparisons) needs util-linux's tools, not
    // busybox's namesakes.
    let scenario = ["unshare", "nsenter", "setpriv"]
        .iter()
        .try_fold(scenario, |s, tool| {
            Ok::<_, anyhow::Error>(
                s.binary(format!("/opt/{tool}"), require_tool(tool, "util-linux")?),
            )
        })?;
    Ok((scenario, images))
}
