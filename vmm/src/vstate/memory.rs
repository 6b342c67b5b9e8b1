//! Guest RAM: one memfd mapped shared into this process, a region per RAM
//! range of the layout, advised for transparent huge pages.
//!
//! Why a memfd and not anonymous memory: the same kind of object backs the
//! inter-VM shared region, and a memfd is what a later snapshot or a
//! second process (a device model) would need to see guest memory. Huge pages
//! matter far beyond their usual few percent here: under nested
//! virtualization every 4 KiB page of guest RAM is a nested page fault, and
//! huge pages took a guest's boot from 8.3 s to 5.3 s
//! (`guest-kernel-facts.md` §7).

#![allow(unsafe_code)]

use std::fs::File;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::arch::x86_64::layout;

/// Name of the memfd behind guest RAM (it shows in `/proc/PID/maps`).
pub const MEMFD_NAME: &str = "p2pvmm-guest-ram";

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memfd could not be created or sized.
    #[error("Creating the guest memory file")]
    Memfd(#[source] std::io::Error),
    /// Mapping a RAM range failed.
    #[error("Mapping guest RAM at {addr:#x} ({size} bytes)")]
    Map {
        /// Guest address of the range.
        addr: u64,
        /// Its length.
        size: usize,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions did not form a valid guest memory.
    #[error("Assembling guest memory")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// A guest of this size makes no sense.
    #[error("Guest memory must be between 16 MiB and 1 TiB, not {0} MiB")]
    Size(u64),
}

/// Whether the host backs shared memory with transparent huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// `shmem_enabled` allows huge pages for advised mappings (or always).
    Advised,
    /// The host does not offer them for shared memory (`never`/`deny`, or
    /// no THP at all): guest memory uses 4 KiB pages.
    Unavailable,
}

impl HugePages {
    /// Reads the host's policy for shared memory.
    pub fn probe() -> Self {
        let policy = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
        Self::from_policy(&policy)
    }

    fn from_policy(policy: &str) -> Self {
        // The active choice is the bracketed word, e.g. "always within_size [advise] never".
        let active = policy
            .split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(['[', ']']));
        match active {
            Some("always" | "within_size" | "advise" | "force") => HugePages::Advised,
            _ => HugePages::Unavailable,
        }
    }
}

/// The guest's RAM and the file behind it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped regions, as vm-memory sees them.
    pub memory: GuestMemoryMmap,
    /// The memfd every region maps (offset = position in RAM order).
    pub file: Arc<File>,
    /// Total RAM in bytes.
    pub size: u64,
    /// What the host gave us.
    pub huge_pages: HugePages,
}

/// Smallest guest accepted: the kernel, its initramfs and the boot
/// structures need room below the 32-bit hole.
const MIN_MEM_BYTES: u64 = 16 << 20;
/// Largest guest accepted; well past anything this platform runs.
const MAX_MEM_BYTES: u64 = 1 << 40;

/// Creates `mem_size` bytes of guest RAM laid out by [`layout::ram_ranges`].
pub fn create(mem_size: u64) -> Result<GuestRam, MemoryError> {
    if !(MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&mem_size) {
        return Err(MemoryError::Size(mem_size >> 20));
    }
    let fd = rustix::fs::memfd_create(MEMFD_NAME, rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| MemoryError::Memfd(e.into()))?;
    let file = Arc::new(File::from(fd));
    file.set_len(mem_size).map_err(MemoryError::Memfd)?;
    let huge_pages = HugePages::probe();

    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in layout::ram_ranges(mem_size) {
        let size = len as usize;
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryError::Map { addr, size, source })?;
        if huge_pages == HugePages::Advised {
            advise_huge(&mapping);
        }
        regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(addr))
                .ok_or(MemoryError::Size(len >> 20))?,
        );
        offset += len;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
    Ok(GuestRam {
        memory,
        file,
        size: mem_size,
        huge_pages,
    })
}

/// Advises the kernel to back `mapping` with huge pages. A refusal only costs
/// speed, so it is logged, not returned.
fn advise_huge(mapping: &MmapRegion) {
    // SAFETY: the range is exactly the mapping `MmapRegion` created and still
    // owns; MADV_HUGEPAGE changes no contents and no protection, only the
    // page size the kernel prefers for it.
    let r = unsafe {
        rustix::mm::madvise(
            mapping.as_ptr().cast(),
            mapping.size(),
            rustix::mm::Advice::LinuxHugepage,
        )
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "MADV_HUGEPAGE refused: guest RAM uses 4 KiB pages");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn policy_parsing() {
        assert_eq!(
            HugePages::from_policy("always within_size [advise] never deny force"),
            HugePages::Advised
        );
        assert_eq!(
            HugePages::from_policy("always within_size advise [never] deny force"),
            HugePages::Unavailable
        );
        assert_eq!(HugePages::from_policy(""), HugePages::Unavailable);
    }

    #[test]
    fn overhead_excludes_guest_ram() {
        let before = crate::runner::rss_overhead_kib().unwrap();
        let ram = create(64 << 20).unwrap();
        // Touch all of it: 64 MiB resident in the memfd mapping.
        for page in (0..64u64 << 20).step_by(4096) {
            ram.memory.write_obj(1u8, GuestAddress(page)).unwrap();
        }
        let after = crate::runner::rss_overhead_kib().unwrap();
        assert!(
            after < before + 8 * 1024,
            "guest RAM counted as overhead: {before} -> {after} KiB"
        );
    }

    #[test]
    fn ram_is_one_shared_file() {
        let ram = create(32 << 20).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The bytes live in the memfd, not in private memory.
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert!(create(1 << 20).is_err());
    }
}
