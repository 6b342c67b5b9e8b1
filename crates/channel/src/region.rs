//! The shared region: a sealed memfd mapped with `MAP_SHARED`, accessed only
//! through `vm-memory`, which bounds-checks every access against the mapping.
//!
//! The supervisor creates the region and seals its size, so that neither side
//! can shrink it under the other's mapping (which would turn the peer's next
//! access into a SIGBUS). Whoever opens a region checks the seal first.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rustix::fs::{MemfdFlags, SealFlags};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::ChannelError;
use crate::layout::{Layout, MAGIC, VERSION, field};

/// One mapping of the shared region. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Region {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    mem: GuestMemoryMmap<()>,
    file: File,
    layout: Layout,
}

fn map(file: &File, offset: u64, size: u64) -> Result<GuestMemoryMmap<()>, ChannelError> {
    let file = file.try_clone().map_err(ChannelError::Io)?;
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(file, offset)),
    )])
    .map_err(|e| ChannelError::Map(e.into()))
}

/// Bytes of the memfd behind a region of `layout`: the layout's size rounded
/// up to a power of two, because in the VM backend the region is a PCI BAR
/// and BARs come in powers of two. The tail is never touched, so it costs no
/// memory.
pub fn file_size(layout: &Layout) -> u64 {
    layout.size.next_power_of_two()
}

impl Region {
    /// Creates a fresh region for `layout`: a sealed memfd with the header filled in.
    pub fn create(layout: Layout) -> Result<Self, ChannelError> {
        let fd = rustix::fs::memfd_create(
            "p2pvm-channel",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| ChannelError::Io(e.into()))?;
        let file = File::from(fd);
        let len = file_size(&layout);
        file.set_len(len).map_err(ChannelError::Io)?;
        rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| ChannelError::Io(e.into()))?;
        // Only the layout is mapped: a descriptor that points into the
        // padding is out of range like any other stray address.
        let mem = map(&file, 0, layout.size)?;
        let region = Self {
            inner: Arc::new(Inner { mem, file, layout }),
        };
        region.store_u64(field::MAGIC, MAGIC);
        region.store_u32(field::VERSION, VERSION);
        region.store_u32(field::QUEUE_SIZE, u32::from(layout.queue_size));
        region.store_u32(field::BUF_SIZE, layout.buf_size);
        region.store_u64(field::REGION_SIZE, layout.size);
        Ok(region)
    }

    /// Maps a region someone else created (received over the broker socket).
    ///
    /// The header's sizes are only trusted as far as they describe a valid layout
    /// that fits in the file; every later access is bounds-checked regardless.
    pub fn open(file: File) -> Result<Self, ChannelError> {
        let seals = rustix::fs::fcntl_get_seals(&file).map_err(|e| ChannelError::Io(e.into()))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(ChannelError::Layout(
                "the region is not sealed against shrinking".into(),
            ));
        }
        let len = file.metadata().map_err(ChannelError::Io)?.len();
        Self::open_at(file, 0, len)
    }

    /// Maps a region that is a device's memory: `len` bytes at `offset` of
    /// `file` — inside a VM, the channel device's shared-memory BAR through
    /// `/dev/mem` (offset = the BAR's physical address) or through its sysfs
    /// `resource2` file (offset 0). The VMM fixed the BAR's size, so there is
    /// no seal to check; the header is validated as for [`Region::open`].
    pub fn open_device(file: File, offset: u64, len: u64) -> Result<Self, ChannelError> {
        Self::open_at(file, offset, len)
    }

    fn open_at(file: File, offset: u64, len: u64) -> Result<Self, ChannelError> {
        if len < crate::layout::HEADER_BYTES {
            return Err(ChannelError::Layout(format!("region of {len} bytes")));
        }
        let mem = map(&file, offset, len)?;
        let read32 = |off| -> Result<u32, ChannelError> {
            mem.read_obj::<u32>(GuestAddress(off))
                .map_err(|e| ChannelError::Map(e.into()))
        };
        let magic: u64 = mem
            .read_obj(GuestAddress(field::MAGIC))
            .map_err(|e| ChannelError::Map(e.into()))?;
        if magic != MAGIC {
            return Err(ChannelError::Layout(format!("bad magic {magic:#x}")));
        }
        let version = read32(field::VERSION)?;
        if version != VERSION {
            return Err(ChannelError::Layout(format!(
                "layout version {version}, this build speaks {VERSION}"
            )));
        }
        let layout = Layout::new(read32(field::QUEUE_SIZE)?, read32(field::BUF_SIZE)?)?;
        if layout.size > len {
            return Err(ChannelError::Layout(format!(
                "layout needs {} bytes, the region has {len}",
                layout.size
            )));
        }
        // Keep only the layout's bytes mapped (see `create`).
        drop(mem);
        let mem = map(&file, offset, layout.size)?;
        Ok(Self {
            inner: Arc::new(Inner { mem, file, layout }),
        })
    }

    /// The memfd, to hand to the other side.
    pub fn file(&self) -> &File {
        &self.inner.file
    }

    /// The layout in use.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// Bounds-checked access to the whole region.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.inner.mem
    }

    /// Atomically loads a header word. The header page always exists.
    pub fn load_u32(&self, off: u64) -> u32 {
        self.inner
            .mem
            .load(GuestAddress(off), Ordering::Acquire)
            .expect("header words are inside the first page")
    }

    /// Atomically stores a header word.
    pub fn store_u32(&self, off: u64, v: u32) {
        self.inner
            .mem
            .store(v, GuestAddress(off), Ordering::Release)
            .expect("header words are inside the first page")
    }

    fn store_u64(&self, off: u64, v: u64) {
        self.inner
            .mem
            .write_obj(v, GuestAddress(off))
            .expect("header words are inside the first page")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_mapping_sees_the_first() {
        let a = Region::create(Layout::new(16, 4096).unwrap()).unwrap();
        let b = Region::open(a.file().try_clone().unwrap()).unwrap();
        assert_eq!(a.layout(), b.layout());
        a.store_u32(field::DRIVER_GEN, 7);
        assert_eq!(b.load_u32(field::DRIVER_GEN), 7);
    }

    #[test]
    fn the_file_is_a_power_of_two() {
        let layout = Layout::new(16, 4096).unwrap();
        let a = Region::create(layout).unwrap();
        let len = a.file().metadata().unwrap().len();
        assert!(len.is_power_of_two() && len >= layout.size, "{len}");
        assert_eq!(len, file_size(&layout));
    }

    #[test]
    fn a_device_mapping_at_an_offset() {
        // A file with the region 64 KiB in, as a BAR sits in /dev/mem.
        let a = Region::create(Layout::new(16, 4096).unwrap()).unwrap();
        let len = a.file().metadata().unwrap().len();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mut bytes = vec![0u8; 65536];
        let mut image = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(a.file(), &mut image, 0).unwrap();
        bytes.extend_from_slice(&image);
        std::fs::write(&path, &bytes).unwrap();
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        let b = Region::open_device(open(), 65536, len).unwrap();
        assert_eq!(a.layout(), b.layout());
        let e = Region::open_device(open(), 0, len).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn the_size_is_sealed() {
        let a = Region::create(Layout::new(16, 4096).unwrap()).unwrap();
        assert!(a.file().set_len(4096).is_err(), "shrinking must fail");
    }

    #[test]
    fn refuses_foreign_files() {
        let fd = rustix::fs::memfd_create("x", MemfdFlags::ALLOW_SEALING).unwrap();
        let f = File::from(fd);
        f.set_len(1 << 20).unwrap();
        assert!(matches!(
            Region::open(f.try_clone().unwrap()),
            Err(ChannelError::Layout(_))
        ));
        rustix::fs::fcntl_add_seals(&f, SealFlags::SHRINK).unwrap();
        let e = Region::open(f).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
