//! Host programs carried into the L1 image: a dynamically linked binary needs every shared
//! library `ldd` lists, at the same path, and its dynamic loader; QEMU additionally needs
//! the firmware files its `-kernel` direct boot opens.
//!
//! [`QEMU_FIRMWARE`] was found by tracing `openat` of `qemu-system-x86_64 -machine pc
//! -nodefaults -display none -vga none -kernel vmlinux` (a PVH ELF kernel): SeaBIOS
//! (`bios-256k.bin`), `kvmvapic.bin` and `pvh.bin`. `linuxboot_dma.bin` (1.5 KiB) is added
//! for bzImage kernels. The test `qemu_firmware_list_is_complete` re-checks this with strace.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::util::{require_tool, run_captured};

/// Where QEMU is put in the L1 image (its firmware search path is relative to it).
pub const QEMU_GUEST_PATH: &str = "/usr/bin/qemu-system-x86_64";

/// Firmware files QEMU opens for `-machine pc -kernel vmlinux` (same paths in L1).
pub const QEMU_FIRMWARE: &[&str] = &[
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/qemu/pvh.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
];

/// The shared libraries and loader of `binary` (empty for a static one), as `ldd` resolves
/// them on this host.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let info = crate::elf::inspect(binary)?
        .with_context(|| format!("{} is not an ELF file", binary.display()))?;
    let Some(interp) = info.interp else {
        return Ok(Vec::new());
    };
    let ldd = require_tool("ldd", "libc-bin")?;
    let out = run_captured(Command::new(ldd).arg(binary))?;
    let mut libs = parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("ldd {}", binary.display()))?;
    let interp = PathBuf::from(interp);
    if !libs.contains(&interp) {
        libs.push(interp);
    }
    Ok(libs)
}

/// Parses `ldd` output into absolute library paths (the vDSO has none and is skipped).
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("missing shared library: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            let path = PathBuf::from(path);
            if !libs.contains(&path) {
                libs.push(path);
            }
        }
    }
    Ok(libs)
}

/// The host's QEMU and the firmware it needs, checked to exist.
#[derive(Debug, Clone)]
pub struct QemuBundle {
    /// The host's `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// Firmware files (host path = path in L1).
    pub firmware: Vec<PathBuf>,
}

impl QemuBundle {
    /// Finds QEMU and its firmware on this host.
    pub fn locate() -> Result<Self> {
        let binary = require_tool("qemu-system-x86_64", "qemu-system-x86")?;
        let firmware: Vec<PathBuf> = QEMU_FIRMWARE.iter().map(PathBuf::from).collect();
        for file in &firmware {
            ensure!(
                file.exists(),
                "QEMU firmware {} is missing: install the Debian packages `qemu-system-x86` \
                 (with `qemu-system-data` and `seabios`)",
                file.display()
            );
        }
        Ok(Self { binary, firmware })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn host_shell_libraries() {
        let sh = std::fs::canonicalize(crate::util::find_tool("sh").unwrap()).unwrap();
        let libs = shared_libraries(&sh).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
    }
}
