//! A descriptor chain as guest buffers, and vectored I/O straight between
//! those buffers and a file or TAP — one `preadv`/`pwritev`/`readv`/`writev`
//! per request, no bounce buffer.
//!
//! Why not the queue crate's `Reader`/`Writer`: they copy through a host
//! buffer, and under nested virtualization every copy in the VMM runs
//! emulated. Why `unsafe`: the kernel needs raw addresses; they come from
//! `VolatileSlice`s that borrow the guest memory for as long as the call.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Longest chain accepted, in descriptors (the largest queue is 256; an
/// indirect table may hold more, but no request of ours needs them).
pub const MAX_DESCRIPTORS: usize = 1024;

/// Why a chain was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A device-readable descriptor after a device-writable one.
    #[error("Readable descriptor after a writable one")]
    Order,
    /// A buffer outside guest memory.
    #[error("Buffer at {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Start.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// More descriptors, or more bytes, than any request may have.
    #[error("Chain too long")]
    TooLong,
}

/// Guest buffers of one direction, in chain order.
#[derive(Debug, Default, Clone)]
pub struct Bufs<'m> {
    slices: Vec<VolatileSlice<'m>>,
    len: usize,
}

/// A chain split into what the device reads and what it writes.
#[derive(Debug, Default)]
pub struct Chain<'m> {
    /// Device-readable buffers (the driver's request).
    pub readable: Bufs<'m>,
    /// Device-writable buffers (for the device's answer).
    pub writable: Bufs<'m>,
}

impl<'m> Chain<'m> {
    /// Resolves `descs` in `mem`. Zero-length descriptors are skipped.
    pub fn new(
        mem: &'m GuestMemoryMmap,
        descs: impl IntoIterator<Item = Descriptor>,
    ) -> Result<Self, ChainError> {
        let mut chain = Chain::default();
        let mut count = 0usize;
        for d in descs {
            count += 1;
            if count > MAX_DESCRIPTORS {
                return Err(ChainError::TooLong);
            }
            let out_of_range = ChainError::OutOfRange {
                addr: d.addr().0,
                len: d.len(),
            };
            if d.len() == 0 {
                continue;
            }
            let side = if d.is_write_only() {
                &mut chain.writable
            } else if chain.writable.len > 0 {
                return Err(ChainError::Order);
            } else {
                &mut chain.readable
            };
            d.addr()
                .0
                .checked_add(u64::from(d.len()))
                .ok_or(out_of_range.clone())?;
            for s in mem.get_slices(GuestAddress(d.addr().0), d.len() as usize) {
                side.slices.push(s.map_err(|_| out_of_range.clone())?);
            }
            side.len = side
                .len
                .checked_add(d.len() as usize)
                .ok_or(ChainError::TooLong)?;
        }
        Ok(chain)
    }
}

impl<'m> Bufs<'m> {
    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `at` bytes and the rest (`at` is clamped to the length).
    pub fn split_at(&self, at: usize) -> (Bufs<'m>, Bufs<'m>) {
        let at = at.min(self.len);
        let (mut head, mut tail) = (Bufs::default(), Bufs::default());
        let mut left = at;
        for s in &self.slices {
            if left >= s.len() {
                left -= s.len();
                head.push(*s);
            } else if left > 0 {
                // In bounds: 0 < left < s.len().
                if let Ok((a, b)) = s.split_at(left) {
                    head.push(a);
                    tail.push(b);
                }
                left = 0;
            } else {
                tail.push(*s);
            }
        }
        (head, tail)
    }

    fn push(&mut self, s: VolatileSlice<'m>) {
        self.len += s.len();
        self.slices.push(s);
    }

    /// Copies the first `out.len()` bytes out; returns how many there were.
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let mut done = 0;
        for s in &self.slices {
            if done == out.len() {
                break;
            }
            done += s.copy_to(&mut out[done..]);
        }
        done
    }

    /// Copies `data` in from the start; returns how many bytes fit.
    pub fn copy_from(&self, data: &[u8]) -> usize {
        let mut done = 0;
        for s in &self.slices {
            if done == data.len() {
                break;
            }
            let n = s.len().min(data.len() - done);
            s.copy_from(&data[done..done + n]);
            done += n;
        }
        done
    }

    fn iovecs(&self) -> Vec<libc::iovec> {
        self.slices
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect()
    }

    /// Fills every buffer from `file` at `offset` (short files are an error).
    pub fn read_exact_at(&self, file: &impl AsRawFd, mut offset: u64) -> io::Result<()> {
        let mut rest = self.clone();
        while !rest.is_empty() {
            let iov = rest.iovecs();
            let n = iov.len().min(libc::UIO_MAXIOV as usize);
            // SAFETY: every iovec is a `VolatileSlice` of guest memory that
            // `self` borrows for the duration of this call, so the kernel
            // writes only into mapped guest RAM within those bounds.
            let r =
                unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), n as i32, offset as i64) };
            let done = check(r)?;
            if done == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            offset += done as u64;
            rest = rest.split_at(done).1;
        }
        Ok(())
    }

    /// Writes every buffer to `file` at `offset`.
    pub fn write_all_at(&self, file: &impl AsRawFd, mut offset: u64) -> io::Result<()> {
        let mut rest = self.clone();
        while !rest.is_empty() {
            let iov = rest.iovecs();
            let n = iov.len().min(libc::UIO_MAXIOV as usize);
            // SAFETY: as in `read_exact_at`; the kernel only reads the slices.
            let r =
                unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), n as i32, offset as i64) };
            let done = check(r)?;
            if done == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            offset += done as u64;
            rest = rest.split_at(done).1;
        }
        Ok(())
    }

    /// Appends `other`'s buffers after these.
    pub fn extend(&mut self, other: &Bufs<'m>) {
        for s in &other.slices {
            self.push(*s);
        }
    }

    /// One `readv` (a TAP gives one packet per call, cut to the buffers).
    pub fn readv(&self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let iov = self.one_call_iovecs()?;
        // SAFETY: every iovec is a `VolatileSlice` of guest memory that
        // `self` borrows for the duration of this call, so the kernel writes
        // only into mapped guest RAM within those bounds.
        let r = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        check(r)
    }

    /// One `writev` (a TAP takes one packet per call).
    pub fn writev(&self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let iov = self.one_call_iovecs()?;
        // SAFETY: as in `write_all_at`.
        let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        check(r)
    }

    /// Whether these buffers can go in one `readv`/`writev`: the kernel
    /// takes at most UIO_MAXIOV pieces (EMSGSIZE beyond).
    pub fn fits_one_call(&self) -> bool {
        self.slices.len() <= libc::UIO_MAXIOV as usize
    }

    /// The iovecs of a packet, which must go in one call.
    fn one_call_iovecs(&self) -> io::Result<Vec<libc::iovec>> {
        if !self.fits_one_call() {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        Ok(self.iovecs())
    }
}

fn check(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap()
    }

    fn r(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }
    fn w(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    #[test]
    fn splits_directions_and_ranges() {
        let m = mem();
        let c = Chain::new(
            &m,
            [r(0x100, 16), r(0x200, 0), w(0x1000, 512), w(0x3000, 1)],
        )
        .unwrap();
        assert_eq!((c.readable.len(), c.writable.len()), (16, 513));
        let (data, status) = c.writable.split_at(512);
        assert_eq!((data.len(), status.len()), (512, 1));
        status.copy_from(&[7]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 7);
        // Split inside a slice.
        let (a, b) = c.writable.split_at(100);
        assert_eq!((a.len(), b.len()), (100, 413));
    }

    #[test]
    fn refuses_bad_chains() {
        let m = mem();
        assert_eq!(
            Chain::new(&m, [w(0x100, 4), r(0x200, 4)]).unwrap_err(),
            ChainError::Order
        );
        // Into the hole between the regions, past the end, wrapping.
        assert!(matches!(
            Chain::new(&m, [r(0xff00, 0x200)]),
            Err(ChainError::OutOfRange { .. })
        ));
        assert!(matches!(
            Chain::new(&m, [r(0x2_ffff, 2)]),
            Err(ChainError::OutOfRange { .. })
        ));
        assert!(matches!(
            Chain::new(&m, [r(u64::MAX - 1, 4)]),
            Err(ChainError::OutOfRange { .. })
        ));
        let many = vec![r(0, 1); MAX_DESCRIPTORS + 1];
        assert_eq!(Chain::new(&m, many).unwrap_err(), ChainError::TooLong);
    }

    #[test]
    fn vectored_file_io() {
        let m = mem();
        let f = tempfile::tempfile().unwrap();
        m.write_slice(b"hello ", GuestAddress(0x100)).unwrap();
        m.write_slice(b"world", GuestAddress(0x2_0000)).unwrap();
        let c = Chain::new(&m, [r(0x100, 6), r(0x2_0000, 5)]).unwrap();
        c.readable.write_all_at(&f, 3).unwrap();
        let out = Chain::new(&m, [w(0x5000, 4), w(0x2_1000, 7)]).unwrap();
        out.writable.read_exact_at(&f, 3).unwrap();
        let mut got = [0u8; 11];
        out.writable.copy_to(&mut got);
        assert_eq!(&got, b"hello world");
        // Past the end of the file: an error, not a silent short read.
        assert!(out.writable.read_exact_at(&f, 10).is_err());
    }
}
