//! Putting the kernel, the initramfs and the command line into guest memory
//! and deciding how the vCPU enters the kernel.
//!
//! Three kernel formats are accepted, tried in this order:
//! - an ELF `vmlinux` with a PVH note (Debian's kernels have one): entered in
//!   32-bit mode at the PVH entry. No decompressor runs, which under nested
//!   emulation saves seconds.
//! - an ELF `vmlinux` without one: entered at its 64-bit entry point with a
//!   zero page (Firecracker's way).
//! - a bzImage: loaded per the boot protocol and entered at `startup_64`
//!   through the 64-bit boot protocol; its decompressor runs in the guest.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::Initrd;
use super::layout;
use super::regs::EntryMode;

/// Why the kernel or initramfs could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("Reading {path}")]
    Io {
        /// Which file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF kernel nor a bzImage.
    #[error("{path} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat {
        /// Which file.
        path: String,
    },
    /// linux-loader refused the image.
    #[error("Loading the kernel {path}")]
    Kernel {
        /// Which file.
        path: String,
        /// Why.
        #[source]
        source: loader::Error,
    },
    /// A bzImage too old for the 64-bit boot protocol.
    #[error(
        "{path}: boot protocol {version:#x} without a 64-bit entry (need 2.12+ with XLF_KERNEL_64)"
    )]
    No64BitEntry {
        /// Which file.
        path: String,
        /// Its boot protocol version.
        version: u16,
    },
    /// The command line was refused.
    #[error("Kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("Writing the command line")]
    CmdlineLoad(#[source] loader::Error),
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error(
        "The initramfs ({size} bytes) does not fit in low RAM above the kernel (ends at {kernel_end:#x}); give the VM more memory"
    )]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
    },
    /// Writing the initramfs into guest memory failed.
    #[error("Writing the initramfs into guest memory")]
    InitrdMemory(#[source] vm_memory::GuestMemoryError),
}

/// What loading produced.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// How to enter (the zero-page / start-info address is filled in later,
    /// by the builder, once the boot structures are written).
    pub kind: KernelKind,
    /// First address past the kernel image.
    pub kernel_end: u64,
}

/// The entry the kernel offers.
#[derive(Debug, Clone, Copy)]
pub enum KernelKind {
    /// PVH entry point.
    Pvh {
        /// Its address.
        entry: u64,
    },
    /// 64-bit boot protocol with this setup header.
    Linux64 {
        /// `startup_64`.
        entry: u64,
        /// The header to copy into the zero page.
        header: setup_header,
    },
}

impl KernelKind {
    /// The vCPU entry, given where the boot structure was written.
    pub fn entry_mode(&self, boot_struct: u64) -> EntryMode {
        match *self {
            KernelKind::Pvh { entry } => EntryMode::Pvh {
                entry,
                start_info: boot_struct,
            },
            KernelKind::Linux64 { entry, .. } => EntryMode::Linux64 {
                entry,
                zero_page: boot_struct,
            },
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Loaded, LoadError> {
    let mut file = File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(io(path))?;
    file.seek(SeekFrom::Start(0)).map_err(io(path))?;
    let highmem = Some(GuestAddress(layout::HIGH_RAM_START));
    let name = || path.display().to_string();
    if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut file, highmem).map_err(|source| LoadError::Kernel {
            path: name(),
            source,
        })?;
        let kind = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => KernelKind::Pvh { entry: entry.0 },
            _ => KernelKind::Linux64 {
                entry: r.kernel_load.0,
                header: synthetic_header(),
            },
        };
        return Ok(Loaded {
            kind,
            kernel_end: r.kernel_load.0 + r.kernel_end,
        });
    }
    let r = BzImage::load(mem, None, &mut file, highmem).map_err(|e| match e {
        loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage) => {
            LoadError::UnknownFormat { path: name() }
        }
        source => LoadError::Kernel {
            path: name(),
            source,
        },
    })?;
    let header = r
        .setup_header
        .ok_or(LoadError::UnknownFormat { path: name() })?;
    /// xloadflags bit 0: the kernel has a 64-bit entry at +0x200.
    const XLF_KERNEL_64: u16 = 1;
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::No64BitEntry {
            path: name(),
            version: header.version,
        });
    }
    Ok(Loaded {
        kind: KernelKind::Linux64 {
            entry: r.kernel_load.0 + 0x200,
            header,
        },
        kernel_end: r.kernel_load.0 + r.kernel_end,
    })
}

/// The setup header a bzImage would carry, for an ELF kernel entered through
/// the 64-bit boot protocol.
fn synthetic_header() -> setup_header {
    setup_header {
        boot_flag: 0xaa55,
        header: 0x5372_6448, // "HdrS"
        version: 0x020f,
        kernel_alignment: 0x0100_0000,
        ..Default::default()
    }
}

/// Writes `cmdline` at [`layout::CMDLINE_START`]; returns its length with the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, LoadError> {
    let cl = Cmdline::try_from(cmdline, layout::CMDLINE_MAX_SIZE).map_err(LoadError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl)
        .map_err(LoadError::CmdlineLoad)?;
    Ok(cmdline.len() + 1)
}

/// Loads the initramfs at `path` at the top of low RAM, page-aligned, above
/// `kernel_end` and below `addr_max` (the boot protocol's `initrd_addr_max`).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    low_ram_end: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<Initrd, LoadError> {
    let mut file = File::open(path).map_err(io(path))?;
    let size = file.metadata().map_err(io(path))?.len();
    let top = low_ram_end.min(addr_max.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(LoadError::InitrdTooLarge { size, kernel_end })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(LoadError::InitrdMemory)?;
    Ok(Initrd { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 10_000]).unwrap();
        let rd = load_initrd(&m, f.path(), 64 << 20, 16 << 20, u64::MAX).unwrap();
        assert_eq!(rd.addr % 4096, 0);
        assert!(rd.addr + rd.size <= 64 << 20);
        assert_eq!(m.read_obj::<u8>(GuestAddress(rd.addr + 9_999)).unwrap(), 7);
        // initrd_addr_max is honoured.
        let capped = load_initrd(&m, f.path(), 64 << 20, 16 << 20, (32 << 20) - 1).unwrap();
        assert!(capped.addr + capped.size <= 32 << 20);
        // No room above the kernel.
        assert!(matches!(
            load_initrd(&m, f.path(), 64 << 20, (64 << 20) - 4096, u64::MAX),
            Err(LoadError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 8192]).unwrap();
        assert!(matches!(
            load_kernel(&m, f.path()),
            Err(LoadError::UnknownFormat { .. })
        ));
        let mut elf = tempfile::NamedTempFile::new().unwrap();
        elf.write_all(b"\x7fELF\x02\x01\x01\0garbage").unwrap();
        assert!(matches!(
            load_kernel(&m, elf.path()),
            Err(LoadError::Kernel { .. })
        ));
    }

    #[test]
    fn cmdline_limits() {
        let m = mem();
        assert_eq!(load_cmdline(&m, "console=ttyS0").unwrap(), 14);
        let s: String = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(load_cmdline(&m, &s).is_err());
    }
}
