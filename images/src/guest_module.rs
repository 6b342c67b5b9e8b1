//! Our one kernel module, `p2pvm_channel.ko` (source in `images/module/`):
//! it binds the channel device with an MSI-X vector and hands its interrupts
//! to user space through UIO, where Debian's own `uio_pci_generic` knows only
//! INTx (whose masking and unmasking cost register round trips to the VMM on
//! every interrupt; see `docs/vm-mode.md`).
//!
//! Built against Debian's `linux-headers-<version>` for exactly the kernel the
//! images carry: the headers package and what it depends on for building
//! (`linux-headers-*-common`, `linux-kbuild-*`) are fetched with `apt-get
//! download` and unpacked into the cache, where the one absolute path in the
//! headers' `Makefile` is pointed at the unpacked copy. Then `make M=...`
//! with the compiler the kernel was built with (`gcc-12` for bookworm). The
//! module is not signed: Debian's kernel checks signatures but does not
//! require them (`CONFIG_MODULE_SIG_FORCE` unset), and loading it marks the
//! kernel tainted, nothing more.
//!
//! Layout: `<cache>/headers/<version>/root/` (the unpacked packages) and
//! `<cache>/guest-module/<version>/` (the build, redone when the source
//! changes; `p2pvm_channel.ko` stripped of debug information).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext, Result};
use crate::kernel::{apt_download, fresh_staging, install_staging};
use crate::util::{Cache, require_tool, run_captured, write_atomic};

/// The module's name (as `modprobe` and the load list know it).
pub const NAME: &str = "p2pvm_channel";
/// Its C source.
const SOURCE: &str = include_str!("../module/p2pvm_channel.c");
/// Its kbuild file.
const KBUILD: &str = include_str!("../module/Kbuild");

/// Builds (or finds already built) `p2pvm_channel.ko` for kernel `version`.
pub fn build(cache: &Cache, version: &str) -> Result<PathBuf> {
    let out = cache.subdir(&format!("guest-module/{version}"))?;
    let ko = out.join(format!("{NAME}.ko"));
    let stamp = out.join("source.sha256");
    let wanted = source_digest();
    if ko.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        return Ok(ko);
    }
    let headers = headers(cache, version)?;
    let make = require_tool("make", "make")?;
    require_tool("gcc-12", "gcc-12")?;
    let strip = require_tool("strip", "binutils")?;
    let src = out.join("src");
    if src.exists() {
        fs::remove_dir_all(&src).ctx(|| format!("cannot clear {}", src.display()))?;
    }
    fs::create_dir_all(&src).ctx(|| format!("cannot create {}", src.display()))?;
    write_atomic(&src.join(format!("{NAME}.c")), SOURCE.as_bytes())?;
    write_atomic(&src.join("Kbuild"), KBUILD.as_bytes())?;
    tracing::info!("building {NAME}.ko against linux-headers-{version}");
    run_captured(
        Command::new(make)
            .arg("-s")
            .arg("-C")
            .arg(&headers)
            .arg(format!("M={}", src.display()))
            .arg("modules")
            // Reproducible: no build host or time in the module.
            .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
            .env("KBUILD_BUILD_USER", "p2pvm")
            .env("KBUILD_BUILD_HOST", "p2pvm"),
    )?;
    let built = src.join(format!("{NAME}.ko"));
    run_captured(
        Command::new(strip)
            .arg("--strip-debug")
            .arg("-o")
            .arg(&ko)
            .arg(&built),
    )?;
    write_atomic(&stamp, format!("{wanted}\n").as_bytes())?;
    Ok(ko)
}

/// The SHA-256 of the source and kbuild file, hex.
fn source_digest() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(SOURCE.as_bytes());
    h.update([0]);
    h.update(KBUILD.as_bytes());
    hex::encode(h.finalize())
}

/// The unpacked `linux-headers-<version>` tree, fetched and unpacked once.
fn headers(cache: &Cache, version: &str) -> Result<PathBuf> {
    let dir = cache.root().join("headers").join(version);
    let tree = |root: &Path| root.join(format!("usr/src/linux-headers-{version}"));
    if tree(&dir.join("root")).join("Makefile").is_file() && dir.join("ready").is_file() {
        return Ok(tree(&dir.join("root")));
    }
    let dpkg_deb = require_tool("dpkg-deb", "dpkg")?;
    let debs = cache.subdir("debs")?;
    let (staging, root) = fresh_staging(&dir, version)?;
    let main = format!("linux-headers-{version}");
    let deb = apt_download(&main, &debs)?;
    let mut packages = vec![deb.clone()];
    for dep in build_dependencies(&dpkg_deb, &deb)? {
        packages.push(apt_download(&dep, &debs)?);
    }
    for deb in &packages {
        run_captured(Command::new(&dpkg_deb).arg("-x").arg(deb).arg(&root))?;
    }
    // The arch tree's Makefile includes the common tree by absolute path.
    let makefile = tree(&root).join("Makefile");
    let text =
        fs::read_to_string(&makefile).ctx(|| format!("cannot read {}", makefile.display()))?;
    let unpacked = format!("include {}/usr/src/", dir.join("root").display());
    if !text.contains("include /usr/src/") {
        return Err(ImageError::Kernel(format!(
            "{}: no `include /usr/src/...` line to redirect: {text:?}",
            makefile.display()
        )));
    }
    write_atomic(
        &makefile,
        text.replace("include /usr/src/", &unpacked).as_bytes(),
    )?;
    write_atomic(&staging.join("ready"), b"")?;
    install_staging(&staging, &dir)?;
    Ok(tree(&dir.join("root")))
}

/// The packages a headers package needs to build modules: its
/// `linux-headers-*` and `linux-kbuild-*` dependencies (not the compiler,
/// which is a host tool).
fn build_dependencies(dpkg_deb: &Path, deb: &Path) -> Result<Vec<String>> {
    let out = run_captured(Command::new(dpkg_deb).arg("-f").arg(deb).arg("Depends"))?;
    Ok(parse_build_dependencies(&String::from_utf8_lossy(
        &out.stdout,
    )))
}

fn parse_build_dependencies(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .filter(|name| name.starts_with("linux-headers-") || name.starts_with("linux-kbuild-"))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_header_and_kbuild_dependencies() {
        let deps = parse_build_dependencies(
            "linux-headers-6.1.0-57-common (= 6.1.192-3), linux-kbuild-6.1 (>= 6.1.192-3), \
             linux-compiler-gcc-12-x86 (>= 6.1.192-3)",
        );
        assert_eq!(deps, ["linux-headers-6.1.0-57-common", "linux-kbuild-6.1"]);
    }
}
