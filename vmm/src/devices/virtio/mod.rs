//! virtio devices on the modern virtio-pci transport.
//!
//! Wiring and logic are apart (vmm-reference's pattern): [`transport`] is
//! the PCI function — registers, feature negotiation, queue setup, MSI-X or
//! INTx, ioeventfds — and each device is a [`VirtioBackend`] that only turns
//! descriptor chains into I/O, testable against plain guest memory.

pub mod blk;
pub mod iov;
pub mod net;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod transport;

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use event_manager::EventSet;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Feature bit: virtio 1.x (mandatory for the modern transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: descriptors may point at indirect tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/avail event indexes suppress notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Features every device here offers.
pub const COMMON_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX;

/// A set of queue indexes (bit `i` = queue `i`).
pub type QueueMask = u32;

/// Why a device stops working until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver broke the ring itself (an avail index beyond the queue
    /// size, rings outside memory): the spec's DEVICE_NEEDS_RESET.
    #[error("Virtqueue {queue} is corrupt: {reason}")]
    Queue {
        /// Which queue.
        queue: usize,
        /// What was wrong.
        reason: String,
    },
    /// The host side failed (disk gone, TAP closed).
    #[error("Backend failure: {0}")]
    Backend(String),
}

/// Why activation failed.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The backend could not start.
    #[error("Activating the device: {0}")]
    Backend(String),
}

/// The device-specific half of a virtio device.
pub trait VirtioBackend: Send + 'static {
    /// virtio device id (1 net, 2 block, 4 entropy).
    fn device_type(&self) -> u16;
    /// PCI class code (24 bits).
    fn pci_class(&self) -> u32;
    /// Maximum size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (including [`COMMON_FEATURES`]).
    fn features(&self) -> u64;
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with `features` acknowledged.
    fn activate(&mut self, _features: u64) -> Result<(), ActivateError> {
        Ok(())
    }
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Queue `index` was notified: process what is available. Returns the
    /// queues that got used buffers.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueMask, DeviceError>;
    /// Host fds to watch while active, with the events wanted now (asked
    /// again after each call, so interest can follow the queues' state).
    fn host_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// A host fd from [`VirtioBackend::host_fds`] is ready.
    fn host_fd_ready(
        &mut self,
        _fd: RawFd,
        _events: EventSet,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<QueueMask, DeviceError> {
        Ok(0)
    }
    /// Payload bytes moved so far: (to the guest, from the guest), for the
    /// VM's figures.
    fn bytes(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Whether feature `bit` is in `features`.
pub fn has_feature(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// The next chain the driver made available on `queue` (number `index`).
/// When none is left, notifications are turned back on — with event-index
/// that publishes `avail_event`, without which the driver never kicks again —
/// and the ring is looked at once more for a chain added meanwhile.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    index: usize,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, DeviceError> {
    loop {
        if let Some(chain) = pop_chain(queue, mem, index)? {
            return Ok(Some(chain));
        }
        if !queue
            .enable_notification(mem)
            .map_err(|e| queue_error(index, e))?
        {
            return Ok(None);
        }
    }
}

/// Takes the next available chain off `queue` (number `index`), if any.
///
/// The queue crate's iterator also ends, without moving on, when it cannot
/// read the ring entry naming the next head; `enable_notification` still
/// sees `avail.idx` ahead, so a caller that retries on that would retry
/// forever. An unreadable entry is a corrupt ring, hence an error. The entry
/// is what is checked rather than `avail.idx`, which a driver adding buffers
/// meanwhile moves legitimately.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    index: usize,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, DeviceError> {
    if let Some(chain) = queue.iter(mem).map_err(|e| queue_error(index, e))?.next() {
        return Ok(Some(chain));
    }
    let next = queue.next_avail();
    let readable = next
        .checked_rem(queue.size())
        .and_then(|slot| queue.avail_ring().checked_add(4 + 2 * u64::from(slot)))
        .is_some_and(|at| mem.load::<u16>(GuestAddress(at), Ordering::Relaxed).is_ok());
    if readable {
        Ok(None)
    } else {
        Err(DeviceError::Queue {
            queue: index,
            reason: format!("available ring entry {next} is outside guest memory"),
        })
    }
}

/// Converts a queue-crate error on the ring itself into a device error.
pub fn queue_error(queue: usize, e: virtio_queue::Error) -> DeviceError {
    DeviceError::Queue {
        queue,
        reason: e.to_string(),
    }
}
