//! Drives the device side (the back-end) with arbitrary region contents, as a
//! hostile front-end would write them. Used by the `cargo fuzz` target
//! (`fuzz/fuzz_targets/channel_device.rs`) and by a property test in CI. The
//! property: whatever the bytes, the device neither panics nor loops, and it
//! stays attached or resets cleanly.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Waker};

use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, watch};

use crate::device::DeviceLink;
use crate::event::EventChannel;
use crate::layout::{Layout, Status, field};
use crate::mux::{LinkState, Pump, Role};
use crate::region::Region;

/// An event channel that never rings: the harness drives the pump by hand.
#[derive(Debug)]
struct Silent;

impl EventChannel for Silent {
    fn notify(&self) -> io::Result<()> {
        Ok(())
    }
    async fn wait(&self) -> io::Result<()> {
        std::future::pending().await
    }
}

/// The writable parts of the region a front-end controls.
fn areas(l: &Layout) -> [(u64, u64); 7] {
    let qs = u64::from(l.queue_size);
    let q = l.queues;
    [
        (q[0].desc, 16 * qs),
        (q[0].avail, 6 + 2 * qs),
        (q[0].used, 6 + 8 * qs),
        (q[1].desc, 16 * qs),
        (q[1].avail, 6 + 2 * qs),
        (q[1].used, 6 + 8 * qs),
        (q[0].buffers, 2 * qs * u64::from(l.buf_size)),
    ]
}

/// Writes the first record of `data` into the region; returns the rest.
fn apply_record<'a>(region: &Region, data: &'a [u8]) -> &'a [u8] {
    let (area, off, len) = (data[0], u16::from_le_bytes([data[1], data[2]]), data[3]);
    let body = &data[4..][..usize::from(len).min(data.len() - 4)];
    let (base, size) = areas(region.layout())[usize::from(area) % 7];
    let at = u64::from(off) % size;
    let n = body.len().min((size - at) as usize);
    use vm_memory::Bytes;
    region
        .mem()
        .write_slice(&body[..n], vm_memory::GuestAddress(base + at))
        .expect("inside the region");
    &data[4 + body.len()..]
}

/// A front-end that performs the handshake by hand and then writes whatever
/// it is told into the rings: the hostile peer of end-to-end tests against a
/// real back-end process.
#[derive(Debug)]
pub struct RawDriver {
    region: Region,
    peer: std::os::fd::OwnedFd,
    generation: u32,
}

impl RawDriver {
    /// Takes over the driver end received from the broker.
    pub fn new(ep: &crate::Endpoint) -> io::Result<Self> {
        Ok(Self {
            region: ep.region.clone(),
            peer: ep.peer.try_clone()?,
            generation: ep.region.load_u32(field::DRIVER_GEN),
        })
    }

    /// Rings the device.
    pub fn kick(&self) {
        let _ = rustix::io::write(&self.peer, &1u64.to_ne_bytes());
    }

    /// Zeroes the rings under a new generation and waits for the device to
    /// attach; false on timeout.
    pub async fn attach(&mut self, timeout: std::time::Duration) -> bool {
        let r = &self.region;
        let l = *r.layout();
        r.store_u32(field::DRIVER_STATUS, Status::Resetting as u32);
        self.generation = self.generation.wrapping_add(1).max(1);
        r.store_u32(field::DRIVER_GEN, self.generation);
        self.kick();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        for q in l.queues {
            let span = q.used + 6 + 8 * u64::from(l.queue_size) - q.desc;
            use vm_memory::Bytes;
            r.mem()
                .write_slice(&vec![0u8; span as usize], vm_memory::GuestAddress(q.desc))
                .expect("rings inside the region");
        }
        r.store_u32(field::DRIVER_STATUS, Status::Ready as u32);
        self.kick();
        let g = self.generation;
        let wait = async {
            while r.load_u32(field::DEVICE_ATTACHED) != g {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Writes `data` into the rings and buffers as records (see [`run_device`]).
    pub fn scribble(&self, mut data: &[u8]) {
        while data.len() >= 4 {
            data = apply_record(&self.region, data);
        }
        self.kick();
    }

    /// Whether the device is still attached to this driver's generation.
    pub fn attached(&self) -> bool {
        self.region.load_u32(field::DEVICE_ATTACHED) == self.generation
    }

    /// The device's last reset reason code.
    pub fn reset_reason(&self) -> u32 {
        self.region.load_u32(field::DEVICE_REASON)
    }

    /// Gives the driver end up (status absent).
    pub fn leave(&self) {
        self.region
            .store_u32(field::DRIVER_STATUS, Status::Absent as u32);
        self.kick();
    }
}

/// Applies `data` as records `[area u8][offset u16 LE][len u8][bytes]` to the
/// region, running the device after each record. Returns how often the
/// device reset the channel.
pub fn run_device(data: &[u8]) -> u64 {
    let layout = Layout::new(8, 4096).expect("valid layout");
    let region = Region::create(layout).expect("memfd");
    let link = DeviceLink::start(region.clone());
    // The front-end's half of the handshake, done honestly once.
    region.store_u32(field::DRIVER_GEN, 1);
    region.store_u32(field::DRIVER_STATUS, Status::Ready as u32);
    let (accept, mut accepted) = mpsc::channel(crate::mux::MAX_SESSIONS);
    let (state, _) = watch::channel(LinkState::Down {
        reason: String::new(),
        resets: 0,
    });
    let mut pump = Pump::new(
        Role::Device,
        link,
        Silent,
        Arc::default(),
        Some(accept),
        state,
    );
    pump.turn();
    assert!(pump.attached(), "an honest handshake attaches");
    let mut cx = Context::from_waker(Waker::noop());
    let mut streams = Vec::new();
    let mut rest = data;
    let mut resets = 0;
    while rest.len() >= 4 {
        rest = apply_record(&region, rest);
        // Sessions the input opened get a reply, so the device also writes
        // into whatever receive chains the input described.
        while let Ok(s) = accepted.try_recv() {
            streams.push(s);
        }
        for s in &mut streams {
            let _ = Pin::new(s).poll_write(&mut cx, b"reply");
        }
        let was = pump.attached();
        // Bounded: each turn handles at most a budget of messages.
        for _ in 0..4 {
            pump.turn();
        }
        if was && !pump.attached() {
            resets += 1;
            // Let the "front-end" come back so later records hit a live device.
            let g = region.load_u32(field::DRIVER_GEN).wrapping_add(1).max(1);
            region.store_u32(field::DRIVER_GEN, g);
            pump.turn();
        }
    }
    resets
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn the_device_survives_any_region_contents(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            run_device(&data);
        }
    }

    #[test]
    fn garbage_in_the_avail_ring_resets() {
        // Area 1 = the to-device avail ring; idx (offset 2) := 0xffff.
        assert!(run_device(&[1, 2, 0, 2, 0xff, 0xff]) >= 1);
    }
}
