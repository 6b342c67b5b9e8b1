//! Where everything sits in the shared region. `docs/channel.md` is the prose
//! version of this file; the two must agree.
//!
//! ```text
//! 0x0000  header (one page): identity, sizes, then the driver's and the device's
//!         status words on separate cache lines
//! ...     queue 0 (to device): descriptor table | avail ring | used ring
//! ...     queue 1 (to driver): descriptor table | avail ring | used ring
//! ...     buffers of queue 0, then buffers of queue 1 (queue_size × buf_size each)
//! ```
//!
//! Every ring part starts on its own page so that sizes can change without the
//! alignment rules of the virtio spec ever being at risk.

use crate::ChannelError;

/// "P2PVMCH1" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"P2PVMCH1");
/// Layout version; a mismatch refuses to attach.
pub const VERSION: u32 = 1;
/// Bytes of the header page.
pub const HEADER_BYTES: u64 = 4096;
const PAGE: u64 = 4096;

/// Byte offsets of the header fields. Identity fields are written once by
/// whoever creates the region; status fields are written by one side only.
pub mod field {
    /// u64: [`super::MAGIC`].
    pub const MAGIC: u64 = 0x00;
    /// u32: [`super::VERSION`].
    pub const VERSION: u64 = 0x08;
    /// u32: descriptors per queue.
    pub const QUEUE_SIZE: u64 = 0x0c;
    /// u32: bytes per buffer.
    pub const BUF_SIZE: u64 = 0x10;
    /// u64: total bytes of the layout.
    pub const REGION_SIZE: u64 = 0x18;
    /// u32, driver-owned: [`super::Status`] of the front-end.
    pub const DRIVER_STATUS: u64 = 0x40;
    /// u32, driver-owned: bumped each time the front-end (re)initialises the rings.
    pub const DRIVER_GEN: u64 = 0x44;
    /// u32, device-owned: [`super::Status`] of the back-end.
    pub const DEVICE_STATUS: u64 = 0x80;
    /// u32, device-owned: bumped each time the back-end starts or resets the channel.
    pub const DEVICE_GEN: u64 = 0x84;
    /// u32, device-owned: the driver generation the device is attached to (0: none).
    pub const DEVICE_ATTACHED: u64 = 0x88;
    /// u32, device-owned: why the device last reset the channel ([`super::ResetReason`]).
    pub const DEVICE_REASON: u64 = 0x8c;
}

/// A side's status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Not running (never started, or exited cleanly).
    Absent = 0,
    /// The device asks the driver to re-initialise; the driver is re-initialising.
    Resetting = 1,
    /// Rings are initialised (driver) / attached and serving (device).
    Ready = 2,
}

impl Status {
    /// Reads a status word; unknown values (a hostile peer) read as `Absent`.
    pub fn from_word(w: u32) -> Self {
        match w {
            1 => Status::Resetting,
            2 => Status::Ready,
            _ => Status::Absent,
        }
    }
}

/// Why the device reset the channel, published for the driver's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ResetReason {
    /// No reset yet.
    None = 0,
    /// The device (re)started.
    Started = 1,
    /// A ring index, descriptor or address was invalid.
    BadRing = 2,
    /// A message was malformed or broke the session protocol.
    BadMessage = 3,
    /// A session sent beyond its flow-control window.
    FlowControl = 4,
}

/// Offsets of one split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Descriptor table (16 bytes per descriptor).
    pub desc: u64,
    /// Available ring: flags, idx, ring[size], used_event.
    pub avail: u64,
    /// Used ring: flags, idx, ring[size] of (id, len), avail_event.
    pub used: u64,
    /// First buffer; buffer `i` is at `buffers + i * buf_size`.
    pub buffers: u64,
}

impl QueueLayout {
    /// Offset of `avail.ring[i]`.
    pub fn avail_entry(&self, i: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(i)
    }
    /// Offset of `avail.idx`.
    pub fn avail_idx(&self) -> u64 {
        self.avail + 2
    }
    /// Offset of `used.ring[i]`.
    pub fn used_entry(&self, i: u16) -> u64 {
        self.used + 4 + 8 * u64::from(i)
    }
    /// Offset of `used.idx`.
    pub fn used_idx(&self) -> u64 {
        self.used + 2
    }
    /// Offset of descriptor `i`.
    pub fn desc_entry(&self, i: u16) -> u64 {
        self.desc + 16 * u64::from(i)
    }
}

/// Index of the queue that carries messages from the front-end to the back-end.
pub const TO_DEVICE: usize = 0;
/// Index of the queue that carries messages from the back-end to the front-end.
pub const TO_DRIVER: usize = 1;

/// The complete layout, derived from two numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Descriptors (and buffers) per queue; a power of two.
    pub queue_size: u16,
    /// Bytes per buffer; one message (header + payload) fits in one buffer.
    pub buf_size: u32,
    /// [`TO_DEVICE`] and [`TO_DRIVER`].
    pub queues: [QueueLayout; 2],
    /// Total bytes.
    pub size: u64,
}

/// Smallest and largest buffers we accept.
pub const MIN_BUF: u32 = 4096;
/// Larger buffers only waste memory: a message is copied out whole anyway.
pub const MAX_BUF: u32 = 1 << 20;

fn page_up(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

impl Layout {
    /// The default: 256 buffers of 64 KiB each way (32 MiB).
    pub fn standard() -> Self {
        Self::new(256, 64 * 1024).expect("the standard layout is valid")
    }

    /// Computes the layout, refusing sizes that the spec or our limits forbid.
    pub fn new(queue_size: u32, buf_size: u32) -> Result<Self, ChannelError> {
        if !(2..=32768).contains(&queue_size) || !queue_size.is_power_of_two() {
            return Err(ChannelError::Layout(format!(
                "queue size {queue_size} is not a power of two in 2..=32768"
            )));
        }
        if !(MIN_BUF..=MAX_BUF).contains(&buf_size) || !buf_size.is_multiple_of(64) {
            return Err(ChannelError::Layout(format!(
                "buffer size {buf_size} is not a multiple of 64 in {MIN_BUF}..={MAX_BUF}"
            )));
        }
        let qs = u64::from(queue_size);
        let mut at = HEADER_BYTES;
        let mut rings = [(0, 0, 0); 2];
        for r in &mut rings {
            let desc = at;
            at = page_up(at + 16 * qs);
            let avail = at;
            at = page_up(at + 6 + 2 * qs);
            let used = at;
            at = page_up(at + 6 + 8 * qs);
            *r = (desc, avail, used);
        }
        let per_queue = qs * u64::from(buf_size);
        let queues = [0, 1].map(|i| {
            let (desc, avail, used) = rings[i];
            QueueLayout {
                desc,
                avail,
                used,
                buffers: at + i as u64 * per_queue,
            }
        });
        Ok(Self {
            queue_size: queue_size as u16,
            buf_size,
            queues,
            size: at + 2 * per_queue,
        })
    }

    /// Bytes of payload one message can carry.
    pub fn max_payload(&self) -> usize {
        self.buf_size as usize - crate::wire::HEADER_LEN
    }

    /// Offset of buffer `i` of queue `q`.
    pub fn buffer(&self, q: usize, i: u16) -> u64 {
        self.queues[q].buffers + u64::from(i) * u64::from(self.buf_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_do_not_overlap_and_fit() {
        for (qs, bs) in [(2, 4096), (256, 65536), (1024, 4096), (32768, 4096)] {
            let l = Layout::new(qs, bs).unwrap();
            let q = l.queues;
            let spans = [
                (0, HEADER_BYTES),
                (q[0].desc, 16 * u64::from(qs)),
                (q[0].avail, 6 + 2 * u64::from(qs)),
                (q[0].used, 6 + 8 * u64::from(qs)),
                (q[1].desc, 16 * u64::from(qs)),
                (q[1].avail, 6 + 2 * u64::from(qs)),
                (q[1].used, 6 + 8 * u64::from(qs)),
                (q[0].buffers, u64::from(qs) * u64::from(bs)),
                (q[1].buffers, u64::from(qs) * u64::from(bs)),
            ];
            for (i, a) in spans.iter().enumerate() {
                assert!(a.0 + a.1 <= l.size, "{qs}/{bs}: part {i} past the end");
                for b in &spans[i + 1..] {
                    assert!(a.0 + a.1 <= b.0, "{qs}/{bs}: parts overlap: {a:?} {b:?}");
                }
            }
            // The virtio spec's alignment: 16 for descriptors, 2 avail, 4 used.
            assert_eq!(q[1].desc % 16, 0);
            assert_eq!(q[1].used % 4, 0);
        }
    }

    #[test]
    fn refuses_bad_sizes() {
        assert!(Layout::new(0, 65536).is_err());
        assert!(Layout::new(3, 65536).is_err());
        assert!(Layout::new(65536, 65536).is_err());
        assert!(Layout::new(256, 100).is_err());
        assert!(Layout::new(256, 4097).is_err());
        assert!(Layout::new(256, 2 << 20).is_err());
    }
}
