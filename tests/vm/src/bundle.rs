//! QEMU carried into the L1 image (for comparison runs): besides its shared libraries
//! (see [`p2pvm_images::libs`]) it needs the firmware files its `-kernel` direct boot opens.
//!
//! [`QEMU_FIRMWARE`] was found by tracing `openat` of `qemu-system-x86_64 -machine pc
//! -nodefaults -display none -vga none -kernel vmlinux` (a PVH ELF kernel): SeaBIOS
//! (`bios-256k.bin`), `kvmvapic.bin` and `pvh.bin`. `linuxboot_dma.bin` (1.5 KiB) is added
//! for bzImage kernels. The test `qemu_firmware_list_is_complete` re-checks this with strace.

use std::path::PathBuf;

use anyhow::{Result, ensure};

use crate::util::require_tool;

/// Where QEMU is put in the L1 image (its firmware search path is relative to it).
pub const QEMU_GUEST_PATH: &str = "/usr/bin/qemu-system-x86_64";

/// Firmware files QEMU opens for `-machine pc -kernel vmlinux` (same paths in L1).
pub const QEMU_FIRMWARE: &[&str] = &[
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/qemu/pvh.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
];

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
