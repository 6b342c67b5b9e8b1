//! The service VM's store disk: an ext4 image (virtio-blk, `/dev/vda` in the
//! VM, mounted at `/var/lib/p2pd`) holding the node's identity, content and
//! credit ledger, so that they survive a restart of the VM. Created when
//! missing, reused otherwise; a file that exists but is not ext4 is left
//! alone (an error, never a reformat).
//!
//! A fresh store is the same bytes every time: `mkfs.ext4` gets a fixed UUID
//! and hash seed and a fixed clock (`E2FSPROGS_FAKE_TIME`).

use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::error::{ImageError, IoContext, Result};
use crate::util::{require_tool, run_captured};

/// The file system label (`LABEL=p2pvm-store`).
pub const STORE_LABEL: &str = "p2pvm-store";
/// Default size of a new store.
pub const DEFAULT_STORE_MIB: u64 = 2048;
/// Fixed UUID and hash seed of fresh stores (reproducible bytes).
const STORE_UUID: &str = "5d1f2a3c-7b0e-4c1d-9a55-70327076ed6f";
/// ext4's superblock magic, at byte 1080 of the device.
const EXT_MAGIC_OFFSET: usize = 1024 + 0x38;

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreState {
    /// A new, empty store was made.
    Created,
    /// An existing store was kept.
    Reused,
}

/// Makes sure `path` is an ext4 store, creating a sparse one of `size_mib`
/// MiB if the file does not exist.
pub fn ensure(path: &Path, size_mib: u64) -> Result<StoreState> {
    if path.exists() {
        return if is_ext4(path)? {
            Ok(StoreState::Reused)
        } else {
            Err(ImageError::Input(format!(
                "{} exists but holds no ext4 file system: move it away to get a new store",
                path.display()
            )))
        };
    }
    if !(64..=1 << 22).contains(&size_mib) {
        return Err(ImageError::Input(format!(
            "store size {size_mib} MiB is outside 64 MiB..4 TiB"
        )));
    }
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .ctx(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.as_file()
        .set_len(size_mib << 20)
        .ctx(|| format!("cannot size {}", tmp.path().display()))?;
    run_captured(
        Command::new(mkfs)
            .env("E2FSPROGS_FAKE_TIME", "1")
            .args(["-q", "-F", "-L", STORE_LABEL, "-U", STORE_UUID, "-m", "0"])
            .arg("-E")
            .arg(format!("hash_seed={STORE_UUID},root_owner=0:0,nodiscard"))
            .arg(tmp.path()),
    )?;
    tmp.persist_noclobber(path)
        .map_err(|e| e.error)
        .ctx(|| format!("cannot create {}", path.display()))?;
    tracing::info!(
        "created the store {} ({size_mib} MiB, ext4)",
        path.display()
    );
    Ok(StoreState::Created)
}

/// Whether the file starts with an ext2/3/4 superblock.
pub fn is_ext4(path: &Path) -> Result<bool> {
    let mut head = [0u8; EXT_MAGIC_OFFSET + 2];
    let mut file = std::fs::File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
    match file.read_exact(&mut head) {
        Ok(()) => Ok(head[EXT_MAGIC_OFFSET..] == [0x53, 0xef]),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e).ctx(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_and_reproducible() {
        if crate::util::find_tool("mkfs.ext4").is_none() {
            eprintln!("SKIPPED: mkfs.ext4 is not installed (apt-get install e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.ext4");
        assert_eq!(ensure(&a, 64).unwrap(), StoreState::Created);
        assert!(is_ext4(&a).unwrap());
        assert_eq!(ensure(&a, 64).unwrap(), StoreState::Reused);
        let b = dir.path().join("b.ext4");
        ensure(&b, 64).unwrap();
        assert_eq!(
            crate::kernel::sha256_file(&a).unwrap(),
            crate::kernel::sha256_file(&b).unwrap(),
            "two fresh stores differ"
        );
    }

    #[test]
    fn a_file_that_is_not_ext4_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store.ext4");
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        let err = ensure(&p, 64).unwrap_err();
        assert!(err.to_string().contains("no ext4"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 4096]);
    }
}
