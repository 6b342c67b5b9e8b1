//! virtio-blk on a raw image file: reads and writes go between the file and
//! guest memory in one vectored call each; a flush is an `fdatasync`, so a
//! guest's `fsync` reaches the disk before it returns.
//!
//! Every request is checked before it touches the file: header present and
//! readable, status byte writable, data a whole number of sectors inside the
//! disk, no writes to a read-only disk. A bad request gets an error status
//! (or nothing, when not even its status byte is usable); the device keeps
//! serving the others.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::iov::{Bufs, Chain};
use super::{DeviceError, QueueMask, VirtioBackend, next_chain, queue_error};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size. Linux sizes its request queue from it.
const QUEUE_SIZE: u16 = 256;
/// Data segments per request the guest may use (queue size minus header and
/// status descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Feature bits (virtio 1.2 §5.2.3).
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Request types.
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status.
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes of a request header (type, reserved, sector).
const HEADER_SIZE: usize = 16;
/// Bytes of the id GET_ID returns.
const ID_BYTES: usize = 20;

/// Why the disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening or sizing the image failed.
    #[error("Opening the disk image {path}")]
    Open {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A block device backed by a raw image.
#[derive(Debug)]
pub struct Block {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// Requests completed, by outcome (tests and metrics).
    pub stats: BlockStats,
}

/// Counters of completed requests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    /// Served with OK.
    pub ok: u64,
    /// Refused or failed (IOERR, UNSUPP).
    pub failed: u64,
    /// Dropped: no usable status byte.
    pub malformed: u64,
    /// Flushes (fdatasync) done.
    pub flushes: u64,
    /// Bytes read into the guest.
    pub read_bytes: u64,
    /// Bytes the guest wrote.
    pub written_bytes: u64,
}

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Read { sector: u64 },
    Write { sector: u64 },
    Flush,
    GetId,
    Unsupported(u32),
}

impl Block {
    /// Opens the raw image at `path` (read-only if asked). Its size is
    /// rounded down to whole sectors.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let err = |source| BlockError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        let mut id = [0u8; ID_BYTES];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            file,
            capacity_sectors: size / SECTOR_SIZE,
            read_only,
            id,
            stats: BlockStats::default(),
        })
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Serves one chain; returns the bytes written into its writable buffers
    /// (the used length), or `None` when it had no usable status byte.
    fn serve(&mut self, chain: &Chain<'_>) -> Option<u32> {
        if chain.writable.is_empty() {
            return None;
        }
        let (data_out, status) = chain.writable.split_at(chain.writable.len() - 1);
        let (header, data_in) = chain.readable.split_at(HEADER_SIZE);
        let (code, len) = match self.parse(&header) {
            Some(req) => self.execute(req, &data_in, &data_out),
            None => (VIRTIO_BLK_S_IOERR, 0),
        };
        status.copy_from(&[code]);
        if code == VIRTIO_BLK_S_OK {
            self.stats.ok += 1;
        } else {
            self.stats.failed += 1;
        }
        Some(len as u32 + 1)
    }

    fn parse(&self, header: &Bufs<'_>) -> Option<Request> {
        let mut h = [0u8; HEADER_SIZE];
        if header.copy_to(&mut h) != HEADER_SIZE {
            return None;
        }
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        Some(match kind {
            VIRTIO_BLK_T_IN => Request::Read { sector },
            VIRTIO_BLK_T_OUT => Request::Write { sector },
            VIRTIO_BLK_T_FLUSH => Request::Flush,
            VIRTIO_BLK_T_GET_ID => Request::GetId,
            k => Request::Unsupported(k),
        })
    }

    /// The byte offset of a transfer of `len` bytes at `sector`, if it is
    /// whole sectors inside the disk.
    fn span(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        let sectors = len / SECTOR_SIZE;
        (len.is_multiple_of(SECTOR_SIZE) && sector.checked_add(sectors)? <= self.capacity_sectors)
            .then(|| sector * SECTOR_SIZE)
    }

    /// Runs `req`; returns (status, bytes written to the guest before the status).
    fn execute(&mut self, req: Request, data_in: &Bufs<'_>, data_out: &Bufs<'_>) -> (u8, usize) {
        match req {
            Request::Read { sector } => match self.span(sector, data_out.len()) {
                Some(offset) => match data_out.read_exact_at(&self.file, offset) {
                    Ok(()) => {
                        self.stats.read_bytes += data_out.len() as u64;
                        (VIRTIO_BLK_S_OK, data_out.len())
                    }
                    Err(e) => {
                        crate::warn_limited!(error = %e, sector, "virtio-blk read failed");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                },
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            Request::Write { sector } => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match self.span(sector, data_in.len()) {
                    Some(offset) => match data_in.write_all_at(&self.file, offset) {
                        Ok(()) => {
                            self.stats.written_bytes += data_in.len() as u64;
                            (VIRTIO_BLK_S_OK, 0)
                        }
                        Err(e) => {
                            crate::warn_limited!(error = %e, sector, "virtio-blk write failed");
                            (VIRTIO_BLK_S_IOERR, 0)
                        }
                    },
                    None => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            Request::Flush => {
                if self.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                self.stats.flushes += 1;
                match self.file.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        crate::warn_limited!(error = %e, "virtio-blk flush failed");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            Request::GetId => {
                let n = data_out.copy_from(&self.id);
                (VIRTIO_BLK_S_OK, n)
            }
            Request::Unsupported(kind) => {
                tracing::debug!(kind, "virtio-blk request type not supported");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }
}

impl VirtioBackend for Block {
    fn bytes(&self) -> (u64, u64) {
        (self.stats.read_bytes, self.stats.written_bytes)
    }

    fn device_type(&self) -> u16 {
        2
    }

    fn pci_class(&self) -> u32 {
        // Mass storage, "other".
        0x01_80_00
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64), size_max (le32),
        // seg_max (le32); the rest reads as zero.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        data.fill(0);
        let start = (offset as usize).min(config.len());
        let end = (start + data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueMask, DeviceError> {
        let queue = &mut queues[index];
        let mut used = 0;
        while let Some(chain) = next_chain(queue, mem, index)? {
            let head = chain.head_index();
            let len = match Chain::new(mem, chain) {
                Ok(c) => self.serve(&c),
                Err(e) => {
                    tracing::debug!(error = %e, "virtio-blk: bad chain");
                    None
                }
            };
            if len.is_none() {
                self.stats.malformed += 1;
            }
            queue
                .add_used(mem, head, len.unwrap_or(0))
                .map_err(|e| queue_error(index, e))?;
            used = 1 << index;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests;
