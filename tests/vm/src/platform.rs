//! Scenarios that run the platform's two VMs: the images built by
//! `p2pvm-images` (with the test host's kernel, from the cache), and in L1
//! what operating them needs — `p2pvmm`, our `p2pd`/`p2pctl` for a host-side
//! node, iproute2 for the TAP, nftables for `up`'s NAT, e2fsprogs for the store disk, util-linux's
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
        // `up` gives the service VM its NAT with nftables; a namespace on a
        // veth is the network segment beyond the test host.
        .binary("/opt/nft", require_tool("nft", "nftables")?)
        // `up` makes the store disk with e2fsprogs.
        .binary("/opt/mkfs.ext4", require_tool("mkfs.ext4", "e2fsprogs")?)
        // The figures and the dashboard are read over HTTP.
        .binary("/opt/curl", require_tool("curl", "curl")?);
    // The sandbox backend (for comparisons) needs util-linux's tools, not
    // busybox's namesakes.
    let scenario = ["unshare", "nsenter", "setpriv"]
        .iter()
        .try_fold(scenario, |s, tool| {
            Ok::<_, anyhow::Error>(
                s.binary(format!("/opt/{tool}"), require_tool(tool, "util-linux")?),
            )
        })?;
    let scenario = NAT_MODULES.iter().fold(scenario, |s, m| s.l1_module(*m));
    Ok((scenario, images))
}

/// What `up`'s NAT for the service VM (`vmm::hostnet`) and a segment behind
/// a veth need in the test host's kernel.
const NAT_MODULES: &[&str] = &[
    // libcrc32c (under nf_tables) asks the crypto API for crc32c when it
    // loads: a soft dependency the closure does not follow.
    "crc32c_generic",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_ct",
    "nft_fib_ipv4",
    "veth",
];

#[cfg(test)]
mod tests {
    use super::CONSOLES_SH;
    use crate::scripts::LIB_SH;
    use std::process::Command;

    /// Runs `body` after the helpers, against a fake `p2pvmm console` that
    /// is the client VM's shell: it runs each typed line and appends what it
    /// prints to the console log — except that during the first line typed
    /// the VM `resets` boots again (its init's line). When that is the
    /// client, the command is lost with its shell; when it is the service,
    /// the client's command still answers.
    fn with_a_vm_that_resets_once(resets: &str, body: &str) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let fake = dir.path().join("p2pvmm");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\n\
                 log={d}/home/vms/$2/console.log\n\
                 line=$(cat | sed 's#/tmp/#{d}/#g')\n\
                 if [ ! -f {d}/reset ]; then\n\
                   touch {d}/reset\n\
                   echo 'p2pvm-init: Some VM, 0.4 s since boot' >> {d}/home/vms/{resets}/console.log\n\
                   [ {resets} = $2 ] && exit 0\n\
                 fi\n\
                 sh -c \"$line\" >> \"$log\" 2>&1\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        for vm in ["client", "service"] {
            std::fs::create_dir_all(dir.path().join(format!("home/vms/{vm}"))).unwrap();
            std::fs::write(
                dir.path().join(format!("home/vms/{vm}/console.log")),
                "p2pvm-init: Some VM, 0.3 s since boot\n",
            )
            .unwrap();
        }
        let script = format!(
            "{LIB_SH}\n{CONSOLES_SH}\nP2PVMM={fake}; P2PVMM_HOME={d}/home\n\
             came_back() {{ echo \"$1:$2\" >> {d}/came_back; }}\n{body}",
            fake = fake.display()
        );
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        let came_back = std::fs::read_to_string(dir.path().join("came_back")).unwrap_or_default();
        (String::from_utf8_lossy(&out.stdout).into_owned(), came_back)
    }

    #[test]
    fn a_check_whose_vm_reset_under_it_is_asked_again_after_the_reboot() {
        let (out, came_back) =
            with_a_vm_that_resets_once("client", "echo \"got=$(ask client K1 'echo 42' 5)\"");
        assert_eq!(out.trim(), "got=42");
        assert_eq!(came_back.trim(), "client:K1");
    }

    #[test]
    fn a_check_that_used_the_other_vm_is_asked_again_when_that_one_reset() {
        // The first answer (1) came while the service VM rebooted: spoiled.
        let count = "n=$(( $(cat /tmp/n 2>/dev/null || echo 0) + 1 )); echo $n > /tmp/n; echo $n";
        let (out, came_back) = with_a_vm_that_resets_once(
            "service",
            &format!("echo \"got=$(ask client K3 '{count}' 5)\""),
        );
        assert_eq!(out.trim(), "got=2");
        assert_eq!(came_back.trim(), "service:K3");
    }

    #[test]
    fn a_check_that_must_not_run_twice_is_not_asked_again() {
        let (out, came_back) = with_a_vm_that_resets_once(
            "client",
            "reask=no; echo \"got=$(ask client K2 'echo 42' 5)\"",
        );
        assert!(out.contains("got=\n"), "{out}");
        assert!(came_back.is_empty(), "{came_back}");
    }
}
