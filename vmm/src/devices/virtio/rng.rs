//! virtio-rng: fills the guest's buffers from the host's `getrandom(2)`.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::iov::Chain;
use super::{DeviceError, QueueMask, VirtioBackend, next_chain, queue_error};

/// Bytes given per request at most: a guest asking for more gets a short
/// answer and asks again, so one request cannot hold the device thread long.
const MAX_BYTES_PER_REQUEST: usize = 64 << 10;
/// Entropy device's queue size.
const QUEUE_SIZE: u16 = 64;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    buf: Vec<u8>,
    /// Bytes handed out so far (for tests and metrics).
    pub bytes_served: u64,
}

impl VirtioBackend for Rng {
    fn bytes(&self) -> (u64, u64) {
        (self.bytes_served, 0)
    }

    fn device_type(&self) -> u16 {
        4
    }
    fn pci_class(&self) -> u32 {
        0xff_00_00
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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
                Ok(c) => self.fill(&c),
                Err(e) => {
                    tracing::debug!(error = %e, "virtio-rng: bad chain");
                    0
                }
            };
            queue
                .add_used(mem, head, len)
                .map_err(|e| queue_error(index, e))?;
            used = 1 << index;
        }
        Ok(used)
    }
}

impl Rng {
    fn fill(&mut self, chain: &Chain<'_>) -> u32 {
        let n = chain.writable.len().min(MAX_BYTES_PER_REQUEST);
        self.buf.resize(n, 0);
        if rustix::rand::getrandom(&mut self.buf[..], rustix::rand::GetRandomFlags::empty())
            .map(|k| k == n)
            != Ok(true)
        {
            // Hand out nothing rather than anything not random.
            return 0;
        }
        let written = chain.writable.copy_from(&self.buf);
        self.bytes_served += written as u64;
        written as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn fills_writable_buffers() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [RawDescriptor::from(Descriptor::new(
            0x8000,
            100,
            VRING_DESC_F_WRITE as u16,
            0,
        ))];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut rng = Rng::default();
        let used = rng
            .process_queue(0, std::slice::from_mut(&mut queue), &m)
            .unwrap();
        assert_eq!(used, 1);
        assert_eq!(rng.bytes_served, 100);
        let used_len: u32 = m.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        assert_eq!(used_len, 100);
        let mut bytes = [0u8; 100];
        m.read_slice(&mut bytes, GuestAddress(0x8000)).unwrap();
        assert!(bytes.iter().any(|b| *b != 0));
    }

    #[test]
    fn event_index_follows_consumption() {
        // With event-index on, a device that drains the ring must publish
        // where it stopped, or the driver never notifies it again.
        let mut d = crate::devices::virtio::testing::Driver::new(16);
        d.enable_event_idx();
        let mut rng = Rng::default();
        for round in 1..=3u16 {
            d.push(&[crate::devices::virtio::testing::W(0x8000, 16)]);
            d.run(&mut rng);
            assert_eq!(d.used_idx(), round);
            assert_eq!(d.avail_event(0), round);
        }
    }

    #[test]
    fn readable_only_and_bad_buffers_get_nothing() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(Descriptor::new(0x8000, 64, 0, 0)),
            RawDescriptor::from(Descriptor::new(
                0xffff_0000,
                64,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut rng = Rng::default();
        rng.process_queue(0, std::slice::from_mut(&mut queue), &m)
            .unwrap();
        assert_eq!(rng.bytes_served, 0);
        let used_idx: u16 = m.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 2, "both chains returned");
    }

    #[test]
    fn an_unreadable_ring_entry_is_an_error_not_a_spin() {
        use crate::devices::virtio::testing::{Driver, within_5s};
        let mut d = Driver::new(16);
        d.put_avail_ring_past_the_end(0);
        let mut rng = Rng::default();
        let r = within_5s(move || d.run_queue(&mut rng, 0));
        assert!(
            matches!(r, Err(DeviceError::Queue { queue: 0, .. })),
            "{r:?}"
        );
    }
}
