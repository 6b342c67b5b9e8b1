//! The driver side (front-end, in the client): our own split-virtqueue driver.
//!
//! Each queue has one single-descriptor chain per buffer, and descriptor `i`
//! always points at buffer `i`, so the driver never allocates. The to-device
//! queue sends one message per chain; the to-driver queue keeps every buffer
//! posted and reposts each as soon as its message is copied out.
//!
//! The driver trusts the device less than a kernel driver would: used entries
//! are checked (index, in-flight, length) before anything is read, so a broken
//! back-end makes the front-end reset the channel rather than misbehave.

use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{info, warn};
use vm_memory::{Bytes as _, GuestAddress};

use crate::layout::{Layout, QueueLayout, ResetReason, Status, TO_DEVICE, TO_DRIVER, field};
use crate::mux::{End, Link, Refresh, Violation};
use crate::region::Region;
use crate::wire::{HEADER_LEN, Header};

const VIRTQ_DESC_F_WRITE: u16 = 2;
/// How long a re-initialising driver waits for a live device to let go of the
/// old rings before it rewrites them anyway (a dead device never answers).
const DETACH_WAIT: Duration = Duration::from_millis(200);
/// How long a published generation may wait for a live device to attach.
const ATTACH_WAIT: Duration = Duration::from_secs(1);

/// virtio's `vring_need_event`: did `new` pass `event` since `old`?
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[derive(Debug)]
struct DriverQueue {
    q: QueueLayout,
    /// Our avail index (entries written).
    avail: u16,
    /// The avail index the device has seen (last published).
    published: u16,
    /// Used entries consumed.
    used_seen: u16,
    in_flight: Vec<bool>,
}

/// An initialised pair of queues, as the driver sees them.
#[derive(Debug)]
pub(crate) struct DriverEnd {
    region: Region,
    layout: Layout,
    tx: DriverQueue,
    rx: DriverQueue,
    free: Vec<u16>,
}

fn mem_err(e: impl std::fmt::Display) -> Violation {
    Violation::Ring(e.to_string())
}

impl DriverEnd {
    /// Zeroes both rings and posts every receive buffer.
    fn init(region: &Region) -> Self {
        let layout = *region.layout();
        let mem = region.mem();
        let qs = layout.queue_size;
        for q in &layout.queues {
            let span = (q.used + 6 + 8 * u64::from(qs)) - q.desc;
            mem.write_slice(&vec![0u8; span as usize], GuestAddress(q.desc))
                .expect("rings lie inside the region");
        }
        let qd = |q: usize, i: u16, flags: u16, len: u32| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&layout.buffer(q, i).to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&d, GuestAddress(layout.queues[q].desc_entry(i)))
                .expect("descriptors lie inside the region");
        };
        for i in 0..qs {
            qd(TO_DEVICE, i, 0, 0);
            qd(TO_DRIVER, i, VIRTQ_DESC_F_WRITE, layout.buf_size);
            mem.write_obj(
                i.to_le(),
                GuestAddress(layout.queues[TO_DRIVER].avail_entry(i)),
            )
            .expect("avail ring inside the region");
        }
        fence(Ordering::Release);
        mem.store(
            qs.to_le(),
            GuestAddress(layout.queues[TO_DRIVER].avail_idx()),
            Ordering::Release,
        )
        .expect("avail ring inside the region");
        let dq = |q: QueueLayout, posted: u16, all: bool| DriverQueue {
            q,
            avail: posted,
            published: posted,
            used_seen: 0,
            in_flight: vec![all; usize::from(qs)],
        };
        Self {
            region: region.clone(),
            layout,
            tx: dq(layout.queues[TO_DEVICE], 0, false),
            rx: dq(layout.queues[TO_DRIVER], qs, true),
            free: (0..qs).rev().collect(),
        }
    }

    fn load16(&self, off: u64) -> u16 {
        u16::from_le(
            self.region
                .mem()
                .load(GuestAddress(off), Ordering::Acquire)
                .expect("ring words inside the region"),
        )
    }

    fn store16(&self, off: u64, v: u16) {
        self.region
            .mem()
            .store(v.to_le(), GuestAddress(off), Ordering::Release)
            .expect("ring words inside the region");
    }

    fn used_entry(&self, q: &DriverQueue) -> Result<(u16, u32), Violation> {
        let off = q.q.used_entry(q.used_seen % self.layout.queue_size);
        let raw: [u8; 8] = self
            .region
            .mem()
            .read_obj(GuestAddress(off))
            .map_err(mem_err)?;
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        if id >= u32::from(self.layout.queue_size) || !q.in_flight[id as usize] {
            return Err(Violation::Ring(format!(
                "used entry names descriptor {id}, not in flight"
            )));
        }
        Ok((id as u16, len))
    }

    /// Takes back to-device buffers the device has consumed.
    fn reclaim(&mut self) -> Result<(), Violation> {
        let used = self.load16(self.tx.q.used_idx());
        if used.wrapping_sub(self.tx.used_seen) > self.tx.avail.wrapping_sub(self.tx.used_seen) {
            return Err(Violation::Ring(format!(
                "to-device used index {used} is ahead of what was sent"
            )));
        }
        while self.tx.used_seen != used {
            let (id, _) = self.used_entry(&self.tx)?;
            self.tx.in_flight[usize::from(id)] = false;
            self.free.push(id);
            self.tx.used_seen = self.tx.used_seen.wrapping_add(1);
        }
        Ok(())
    }

    fn take_message(&mut self, id: u16, len: u32) -> Result<(Header, Bytes), Violation> {
        let mem = self.region.mem();
        if (len as usize) < HEADER_LEN || len > self.layout.buf_size {
            return Err(Violation::Ring(format!("used length {len} out of range")));
        }
        let at = self.layout.buffer(TO_DRIVER, id);
        let mut hb = [0u8; HEADER_LEN];
        mem.read_slice(&mut hb, GuestAddress(at)).map_err(mem_err)?;
        let h = Header::decode(&hb).map_err(|e| Violation::Message(e.to_string()))?;
        if HEADER_LEN + h.len as usize > len as usize {
            return Err(Violation::Message(format!(
                "payload of {} bytes in a {len}-byte buffer",
                h.len
            )));
        }
        // Copied straight into fresh capacity: no zero-fill pass first.
        let mut payload = Vec::with_capacity(h.len as usize);
        mem.write_all_volatile_to(
            GuestAddress(at + HEADER_LEN as u64),
            &mut payload,
            h.len as usize,
        )
        .map_err(mem_err)?;
        Ok((h, Bytes::from(payload)))
    }

    fn publish_queue(&mut self, tx: bool) -> bool {
        let (q, event_at) = if tx {
            (
                &self.tx,
                self.tx.q.used + 4 + 8 * u64::from(self.layout.queue_size),
            )
        } else {
            (
                &self.rx,
                self.rx.q.used + 4 + 8 * u64::from(self.layout.queue_size),
            )
        };
        if q.avail == q.published {
            return false;
        }
        let (new, old, idx_at) = (q.avail, q.published, q.q.avail_idx());
        fence(Ordering::Release);
        self.store16(idx_at, new);
        // The device may have enabled notifications just now: order our index
        // store before reading its avail_event (the classic store-load race).
        fence(Ordering::SeqCst);
        let event = self.load16(event_at);
        if tx {
            self.tx.published = new;
        } else {
            self.rx.published = new;
        }
        need_event(event, new, old)
    }

    fn used_event_at(&self, q: &DriverQueue) -> u64 {
        q.q.avail + 4 + 2 * u64::from(self.layout.queue_size)
    }
}

impl End for DriverEnd {
    fn recv(&mut self, budget: usize, out: &mut Vec<(Header, Bytes)>) -> Result<usize, Violation> {
        self.reclaim()?;
        let used = self.load16(self.rx.q.used_idx());
        let ahead = used.wrapping_sub(self.rx.used_seen);
        if ahead > self.layout.queue_size {
            return Err(Violation::Ring(format!(
                "to-driver used index {used} is {ahead} ahead"
            )));
        }
        let mut n = 0;
        while self.rx.used_seen != used && n < budget {
            let (id, len) = self.used_entry(&self.rx)?;
            // Not in flight until reposted: the same id used twice is caught.
            self.rx.in_flight[usize::from(id)] = false;
            let m = self.take_message(id, len)?;
            out.push(m);
            // Repost the buffer at once: its message is copied out.
            let slot = self
                .rx
                .q
                .avail_entry(self.rx.avail % self.layout.queue_size);
            self.region
                .mem()
                .write_obj(id.to_le(), GuestAddress(slot))
                .map_err(mem_err)?;
            self.rx.in_flight[usize::from(id)] = true;
            self.rx.avail = self.rx.avail.wrapping_add(1);
            self.rx.used_seen = self.rx.used_seen.wrapping_add(1);
            n += 1;
        }
        Ok(n)
    }

    fn can_send(&mut self) -> Result<bool, Violation> {
        if self.free.is_empty() {
            self.reclaim()?;
        }
        Ok(!self.free.is_empty())
    }

    fn send(&mut self, h: &Header, payload: &[Bytes]) -> Result<(), Violation> {
        let id = self
            .free
            .pop()
            .ok_or_else(|| Violation::Ring("no free buffer".into()))?;
        let mem = self.region.mem();
        let at = self.layout.buffer(TO_DEVICE, id);
        mem.write_slice(&h.encode(), GuestAddress(at))
            .map_err(mem_err)?;
        let mut len = 0;
        for piece in payload {
            mem.write_slice(piece, GuestAddress(at + (HEADER_LEN + len) as u64))
                .map_err(mem_err)?;
            len += piece.len();
        }
        let desc = self.tx.q.desc_entry(id);
        mem.write_obj(at.to_le(), GuestAddress(desc))
            .map_err(mem_err)?;
        mem.write_obj(((HEADER_LEN + len) as u32).to_le(), GuestAddress(desc + 8))
            .map_err(mem_err)?;
        mem.write_obj(0u32, GuestAddress(desc + 12))
            .map_err(mem_err)?;
        let slot = self
            .tx
            .q
            .avail_entry(self.tx.avail % self.layout.queue_size);
        mem.write_obj(id.to_le(), GuestAddress(slot))
            .map_err(mem_err)?;
        self.tx.in_flight[usize::from(id)] = true;
        self.tx.avail = self.tx.avail.wrapping_add(1);
        Ok(())
    }

    fn publish(&mut self) -> Result<bool, Violation> {
        let a = self.publish_queue(true);
        let b = self.publish_queue(false);
        Ok(a || b)
    }

    fn arm(&mut self, want_space: bool) -> Result<bool, Violation> {
        self.store16(self.used_event_at(&self.rx), self.rx.used_seen);
        if want_space {
            self.store16(self.used_event_at(&self.tx), self.tx.used_seen);
        }
        fence(Ordering::SeqCst);
        let input = self.load16(self.rx.q.used_idx()) != self.rx.used_seen;
        let space = want_space && self.load16(self.tx.q.used_idx()) != self.tx.used_seen;
        Ok(input || space)
    }

    fn has_input(&mut self) -> bool {
        self.load16(self.rx.q.used_idx()) != self.rx.used_seen
    }

    fn max_payload(&self) -> usize {
        self.layout.max_payload()
    }
}

#[derive(Debug)]
enum Phase {
    /// Re-initialising: waiting for the device to let go of the old rings.
    Detaching { since: Instant },
    /// Rings initialised and published; waiting for the device to attach.
    Waiting(Box<DriverEnd>, Instant),
    /// Serving.
    Attached,
}

/// The driver's half of the header handshake.
#[derive(Debug)]
pub(crate) struct DriverLink {
    region: Region,
    generation: u32,
    device_gen: u32,
    phase: Phase,
}

impl DriverLink {
    pub fn start(region: Region) -> Self {
        let mut link = Self {
            generation: region.load_u32(field::DRIVER_GEN),
            device_gen: 0,
            region,
            phase: Phase::Attached,
        };
        link.begin_reset();
        link
    }

    fn begin_reset(&mut self) {
        let r = &self.region;
        // Device generation first: a device starting right now refuses the
        // generation it sees, and then bumps its own, which we must notice.
        self.device_gen = r.load_u32(field::DEVICE_GEN);
        r.store_u32(field::DRIVER_STATUS, Status::Resetting as u32);
        self.generation = self.generation.wrapping_add(1).max(1);
        r.store_u32(field::DRIVER_GEN, self.generation);
        self.phase = Phase::Detaching {
            since: Instant::now(),
        };
    }

    fn reason(&self) -> String {
        let why = match self.region.load_u32(field::DEVICE_REASON) {
            x if x == ResetReason::Started as u32 => "the service side restarted",
            x if x == ResetReason::BadRing as u32 => {
                "the service side reset the channel: invalid ring"
            }
            x if x == ResetReason::BadMessage as u32 => {
                "the service side reset the channel: invalid message"
            }
            x if x == ResetReason::FlowControl as u32 => {
                "the service side reset the channel: flow control"
            }
            _ => "the service side reset the channel",
        };
        why.to_owned()
    }
}

impl Link for DriverLink {
    type End = DriverEnd;

    fn refresh(&mut self, end: &mut Option<DriverEnd>) -> Refresh {
        let r = &self.region;
        let dgen = r.load_u32(field::DEVICE_GEN);
        let dstatus = Status::from_word(r.load_u32(field::DEVICE_STATUS));
        let attached = r.load_u32(field::DEVICE_ATTACHED);
        match &self.phase {
            Phase::Attached => {
                if dgen == self.device_gen
                    && dstatus == Status::Ready
                    && attached == self.generation
                {
                    return Refresh::Same;
                }
                let why = if dgen != self.device_gen {
                    self.reason()
                } else {
                    "the service side detached".to_owned()
                };
                *end = None;
                warn!(reason = %why, "channel down; re-initialising");
                self.begin_reset();
                Refresh::Down(why)
            }
            Phase::Detaching { since } => {
                let let_go = attached == 0 || dstatus != Status::Ready;
                if let_go || since.elapsed() > DETACH_WAIT {
                    let fresh = DriverEnd::init(r);
                    r.store_u32(field::DRIVER_STATUS, Status::Ready as u32);
                    self.phase = Phase::Waiting(Box::new(fresh), Instant::now());
                    return Refresh::Changed;
                }
                Refresh::Same
            }
            Phase::Waiting(_, since) => {
                // The device restarted (or reset) before attaching, or a live
                // device has not taken this generation for a long while (it
                // may have refused it): start over with a fresh generation.
                if dgen != self.device_gen
                    || (dstatus != Status::Absent && since.elapsed() > ATTACH_WAIT)
                {
                    self.begin_reset();
                    return Refresh::Changed;
                }
                if dstatus == Status::Ready && attached == self.generation {
                    let Phase::Waiting(fresh, _) =
                        std::mem::replace(&mut self.phase, Phase::Attached)
                    else {
                        unreachable!("matched above");
                    };
                    *end = Some(*fresh);
                    info!(generation = self.generation, "channel attached");
                    return Refresh::Up;
                }
                Refresh::Same
            }
        }
    }

    fn fail(&mut self, end: &mut Option<DriverEnd>, _v: &Violation) {
        *end = None;
        self.begin_reset();
    }

    fn stop(&mut self) {
        self.region
            .store_u32(field::DRIVER_STATUS, Status::Absent as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn need_event_matches_virtio() {
        // Crossing the event index asks for a notification; not crossing does not.
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 5, 4));
        assert!(need_event(0xffff, 0, 0xfffe));
        assert!(!need_event(10, 9, 3));
    }
}
