//! The device side (back-end, in the P2P service): both queues driven through
//! rust-vmm's `virtio-queue`, which validates ring indices, descriptor indices,
//! chain lengths (a loop ends after `queue_size` descriptors) and addresses (via
//! `vm-memory`, against the region). On top we check every message against the
//! layout; anything wrong is a [`Violation`] and the channel is reset.
//!
//! The link half ([`DeviceLink`]) follows the header's handshake: the device
//! bumps its generation and asks for a reset when it starts or when the driver
//! misbehaved, then attaches to the next generation the driver publishes.

use std::io::{Read, Write};
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use tracing::{info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress};

use crate::layout::{ResetReason, Status, TO_DEVICE, TO_DRIVER, field};
use crate::mux::{End, Link, Refresh, Violation};
use crate::region::Region;
use crate::wire::{HEADER_LEN, Header};

const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Both queues of an attached channel, as the device sees them.
#[derive(Debug)]
pub(crate) struct DeviceEnd {
    region: Region,
    queues: [Queue; 2],
    added: [bool; 2],
}

fn ring(e: impl std::fmt::Display) -> Violation {
    Violation::Ring(e.to_string())
}

impl DeviceEnd {
    fn attach(region: &Region) -> Result<Self, Violation> {
        let l = *region.layout();
        let mk = |q: usize| -> Result<Queue, Violation> {
            let ql = l.queues[q];
            let mut queue = Queue::new(l.queue_size).map_err(ring)?;
            queue.set_size(l.queue_size);
            queue
                .try_set_desc_table_address(GuestAddress(ql.desc))
                .map_err(ring)?;
            queue
                .try_set_avail_ring_address(GuestAddress(ql.avail))
                .map_err(ring)?;
            queue
                .try_set_used_ring_address(GuestAddress(ql.used))
                .map_err(ring)?;
            queue.set_event_idx(true);
            queue.set_ready(true);
            if !queue.is_valid(region.mem()) {
                return Err(Violation::Ring(format!(
                    "queue {q} does not fit the region"
                )));
            }
            Ok(queue)
        };
        Ok(Self {
            region: region.clone(),
            queues: [mk(TO_DEVICE)?, mk(TO_DRIVER)?],
            added: [false; 2],
        })
    }

    /// Chains the driver made available on queue `q` that we have not taken yet.
    fn pending(&self, q: usize) -> Result<u16, Violation> {
        let queue = &self.queues[q];
        let avail = queue
            .avail_idx(self.region.mem(), Ordering::Acquire)
            .map_err(ring)?;
        let n = (avail - Wrapping(queue.next_avail())).0;
        if n > queue.size() {
            return Err(Violation::Ring(format!(
                "queue {q}: avail index {} is {n} ahead of {} (queue size {})",
                avail.0,
                queue.next_avail(),
                queue.size()
            )));
        }
        Ok(n)
    }

    /// Our front-end sends one descriptor per message; anything else (NEXT,
    /// INDIRECT — a feature never offered — or a wrong direction) is refused
    /// before virtio-queue walks it, so no chain costs more than one buffer.
    fn check_single(&self, q: usize, head: u16, flags_wanted: u16) -> Result<(), Violation> {
        let l = self.region.layout();
        if head >= l.queue_size {
            return Err(Violation::Message(format!(
                "queue {q}: head index {head} out of range"
            )));
        }
        let flags: u16 = self
            .region
            .mem()
            .read_obj(GuestAddress(l.queues[q].desc_entry(head) + 12))
            .map_err(ring)?;
        if u16::from_le(flags) != flags_wanted {
            return Err(Violation::Ring(format!(
                "queue {q}: descriptor {head} has flags {flags:#x}; one {} descriptor per message is the contract",
                if flags_wanted == 0 {
                    "device-readable"
                } else {
                    "device-writable"
                }
            )));
        }
        Ok(())
    }

    fn read_one(&mut self) -> Result<Option<(Header, Bytes)>, Violation> {
        let mem = self.region.mem();
        let Some(chain) = self.queues[TO_DEVICE].pop_descriptor_chain(mem) else {
            return Ok(None);
        };
        let head = chain.head_index();
        self.check_single(TO_DEVICE, head, 0)?;
        let mut reader = chain.reader(mem).map_err(ring)?;
        let mut hb = [0u8; HEADER_LEN];
        reader
            .read_exact(&mut hb)
            .map_err(|_| Violation::Message(format!("chain {head} is shorter than a header")))?;
        let h = Header::decode(&hb).map_err(|e| Violation::Message(e.to_string()))?;
        let len = h.len as usize;
        if len > self.region.layout().max_payload() {
            return Err(Violation::Message(format!(
                "{len}-byte payload exceeds the buffer size"
            )));
        }
        if reader.available_bytes() < len {
            return Err(Violation::Message(format!(
                "chain {head} holds {} payload bytes, the header says {len}",
                reader.available_bytes()
            )));
        }
        let mut payload = BytesMut::zeroed(len);
        reader
            .read_exact(&mut payload)
            .map_err(|e| Violation::Ring(e.to_string()))?;
        self.queues[TO_DEVICE]
            .add_used(mem, head, 0)
            .map_err(ring)?;
        self.added[TO_DEVICE] = true;
        Ok(Some((h, payload.freeze())))
    }
}

impl End for DeviceEnd {
    fn recv(&mut self, budget: usize, out: &mut Vec<(Header, Bytes)>) -> Result<usize, Violation> {
        let n = usize::from(self.pending(TO_DEVICE)?).min(budget);
        for _ in 0..n {
            match self.read_one()? {
                Some(m) => out.push(m),
                None => break,
            }
        }
        Ok(n)
    }

    fn can_send(&mut self) -> Result<bool, Violation> {
        Ok(self.pending(TO_DRIVER)? > 0)
    }

    fn send(&mut self, h: &Header, payload: &[Bytes]) -> Result<(), Violation> {
        let mem = self.region.mem();
        let chain = self.queues[TO_DRIVER]
            .pop_descriptor_chain(mem)
            .ok_or_else(|| Violation::Ring("no valid receive chain".into()))?;
        let head = chain.head_index();
        self.check_single(TO_DRIVER, head, VIRTQ_DESC_F_WRITE)?;
        let mut writer = chain.writer(mem).map_err(ring)?;
        let need = HEADER_LEN + payload.iter().map(Bytes::len).sum::<usize>();
        if writer.available_bytes() < need {
            return Err(Violation::Ring(format!(
                "receive chain {head} holds {} bytes, a message needs {need}",
                writer.available_bytes()
            )));
        }
        writer
            .write_all(&h.encode())
            .map_err(|e| Violation::Ring(e.to_string()))?;
        for piece in payload {
            writer
                .write_all(piece)
                .map_err(|e| Violation::Ring(e.to_string()))?;
        }
        self.queues[TO_DRIVER]
            .add_used(mem, head, need as u32)
            .map_err(ring)?;
        self.added[TO_DRIVER] = true;
        Ok(())
    }

    fn publish(&mut self) -> Result<bool, Violation> {
        let mut kick = false;
        for q in [TO_DEVICE, TO_DRIVER] {
            if std::mem::take(&mut self.added[q]) {
                kick |= self.queues[q]
                    .needs_notification(self.region.mem())
                    .map_err(ring)?;
            }
        }
        Ok(kick)
    }

    fn arm(&mut self, want_space: bool) -> Result<bool, Violation> {
        let mem = self.region.mem();
        let mut more = self.queues[TO_DEVICE]
            .enable_notification(mem)
            .map_err(ring)?;
        if want_space {
            more |= self.queues[TO_DRIVER]
                .enable_notification(mem)
                .map_err(ring)?;
        }
        Ok(more)
    }

    fn has_input(&mut self) -> bool {
        self.pending(TO_DEVICE).map(|n| n > 0).unwrap_or(true)
    }

    fn max_payload(&self) -> usize {
        self.region.layout().max_payload()
    }
}

/// The device's half of the header handshake.
#[derive(Debug)]
pub(crate) struct DeviceLink {
    region: Region,
    generation: u32,
    /// The driver generation we serve (0: none).
    attached: u32,
    /// A driver generation we will not attach to (stale, or it misbehaved).
    refused: u32,
}

impl DeviceLink {
    pub fn start(region: Region) -> Self {
        let mut link = Self {
            refused: region.load_u32(field::DRIVER_GEN),
            region,
            generation: 0,
            attached: 0,
        };
        link.request_reset(ResetReason::Started);
        link
    }

    fn request_reset(&mut self, why: ResetReason) {
        let r = &self.region;
        self.generation = r.load_u32(field::DEVICE_GEN).wrapping_add(1).max(1);
        r.store_u32(field::DEVICE_ATTACHED, 0);
        r.store_u32(field::DEVICE_REASON, why as u32);
        r.store_u32(field::DEVICE_STATUS, Status::Resetting as u32);
        r.store_u32(field::DEVICE_GEN, self.generation);
    }
}

impl Link for DeviceLink {
    type End = DeviceEnd;

    fn refresh(&mut self, end: &mut Option<DeviceEnd>) -> Refresh {
        let r = &self.region;
        // Generation first: the driver writes "resetting" before a new
        // generation and "ready" only after initialising, so a generation
        // read before the status can never pair a new number with an old
        // "ready"; re-reading it catches a change in between.
        let dgen = r.load_u32(field::DRIVER_GEN);
        let status = Status::from_word(r.load_u32(field::DRIVER_STATUS));
        if r.load_u32(field::DRIVER_GEN) != dgen {
            return Refresh::Same;
        }
        if end.is_some() {
            if status == Status::Ready && dgen == self.attached {
                return Refresh::Same;
            }
            *end = None;
            self.attached = 0;
            r.store_u32(field::DEVICE_ATTACHED, 0);
            r.store_u32(field::DEVICE_STATUS, Status::Resetting as u32);
            info!(generation = dgen, "front-end re-initialised the channel");
            return Refresh::Down("the front-end reset the channel".into());
        }
        if status != Status::Ready || dgen == 0 || dgen == self.refused {
            return Refresh::Same;
        }
        match DeviceEnd::attach(r) {
            Ok(e) => {
                *end = Some(e);
                self.attached = dgen;
                r.store_u32(field::DEVICE_ATTACHED, dgen);
                r.store_u32(field::DEVICE_STATUS, Status::Ready as u32);
                info!(
                    driver_generation = dgen,
                    device_generation = self.generation,
                    "channel attached"
                );
                Refresh::Up
            }
            Err(v) => {
                warn!(reason = %v, "cannot attach to the channel");
                self.refused = dgen;
                self.request_reset(v.reason());
                Refresh::Changed
            }
        }
    }

    fn fail(&mut self, end: &mut Option<DeviceEnd>, v: &Violation) {
        *end = None;
        self.refused = self.attached;
        self.attached = 0;
        self.request_reset(v.reason());
    }

    fn stop(&mut self) {
        self.region.store_u32(field::DEVICE_ATTACHED, 0);
        self.region
            .store_u32(field::DEVICE_STATUS, Status::Absent as u32);
    }
}
