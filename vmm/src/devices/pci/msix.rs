//! MSI-X: the capability, the vector table and pending-bit array in a BAR,
//! and delivery through KVM — each vector owns a GSI whose MSI route follows
//! the table entry, and an irqfd the device thread writes to interrupt the
//! guest without an exit.
//!
//! Masking is done here, not in KVM: a masked vector (or a masked function)
//! only sets its pending bit, and unmasking delivers what is pending.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::{MsiMessage, VmOps, put_le_value};

/// Capability id of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// Why MSI-X could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    /// The VM ran out of GSIs.
    #[error("No GSI left for an MSI-X vector")]
    NoGsi,
    /// An eventfd or irqfd could not be made.
    #[error("Setting up an MSI-X vector's irqfd")]
    Irqfd(#[source] std::io::Error),
}

#[derive(Debug)]
struct Vector {
    msg: MsiMessage,
    control: u32,
    pending: bool,
    /// The route in KVM differs from `msg`.
    stale_route: bool,
    gsi: u32,
    irqfd: EventFd,
}

/// The MSI-X state of one function.
pub struct Msix {
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    vm: Arc<dyn VmOps>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.vectors.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl Msix {
    /// `count` vectors, all masked (the state at reset), each with a GSI and
    /// an irqfd registered in `vm`.
    pub fn new(count: u16, vm: Arc<dyn VmOps>) -> Result<Self, MsixError> {
        let mut vectors = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let gsi = vm.allocate_msi_gsi().ok_or(MsixError::NoGsi)?;
            let irqfd =
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MsixError::Irqfd)?;
            vm.register_irqfd(&irqfd, gsi).map_err(MsixError::Irqfd)?;
            vectors.push(Vector {
                msg: MsiMessage::default(),
                control: VECTOR_MASKED,
                pending: false,
                stale_route: true,
                gsi,
                irqfd,
            });
        }
        Ok(Self {
            vectors,
            enabled: false,
            function_masked: false,
            vm,
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.vectors.len() as u16
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The capability's bytes and write mask: table and PBA in `bar` at the
    /// given offsets (8-byte aligned).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let control = self.len().saturating_sub(1) & 0x7ff;
        let mut body = vec![CAP_ID, 0];
        body.extend_from_slice(&control.to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        // Only enable and function mask (the top bits of message control) are writable.
        let mask = vec![0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0];
        (body, mask)
    }

    /// Bytes of the table.
    pub fn table_size(&self) -> u64 {
        u64::from(self.len()) * ENTRY_SIZE
    }

    /// Bytes of the PBA (whole qwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.len()).div_ceil(64) * 8
    }

    /// The guest wrote message control (its high byte holds both bits).
    pub fn control_written(&mut self, control: u16) {
        let was_active = self.enabled && !self.function_masked;
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_MASK != 0;
        if !was_active && self.enabled && !self.function_masked {
            for v in 0..self.vectors.len() {
                if self.vectors[v].control & VECTOR_MASKED == 0 {
                    self.deliver_pending(v);
                }
            }
        }
    }

    /// Whether MSI-X is on (the function then does not use INTx).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A read in the table.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((v, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.vectors[v];
        let entry = [
            e.msg.address as u32,
            (e.msg.address >> 32) as u32,
            e.msg.data,
            e.control,
        ];
        let mut raw = [0u8; 16];
        for (i, w) in entry.iter().enumerate() {
            raw[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        data.copy_from_slice(&raw[field..field + data.len()]);
    }

    /// A write in the table.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let Some((v, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &mut self.vectors[v];
        let was_masked = e.control & VECTOR_MASKED != 0;
        let mut raw = [0u8; 16];
        let entry = [
            e.msg.address as u32,
            (e.msg.address >> 32) as u32,
            e.msg.data,
            e.control,
        ];
        for (i, w) in entry.iter().enumerate() {
            raw[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        raw[field..field + data.len()].copy_from_slice(data);
        let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let msg = MsiMessage {
            address: u64::from(word(0)) | u64::from(word(4)) << 32,
            data: word(8),
        };
        if msg != e.msg {
            e.msg = msg;
            e.stale_route = true;
        }
        // Only the mask bit of vector control is defined.
        e.control = word(12) & VECTOR_MASKED;
        let masked = e.control & VECTOR_MASKED != 0;
        // Drivers mask a vector while they rewrite it, so the route is
        // updated when it becomes usable, not at each dword.
        if !masked && (was_masked || e.stale_route) {
            self.deliver_pending(v);
        }
    }

    /// A read in the PBA.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        // The qword holding `offset`: vectors 64 × (offset / 8) onwards.
        let first = (offset as usize / 8) * 64;
        let mut value = 0u64;
        for bit in 0..64 {
            let v = first + bit;
            if self.vectors.get(v).is_some_and(|e| e.pending) {
                value |= 1 << bit;
            }
        }
        put_le_value(data, value >> ((offset % 8) * 8));
    }

    /// Maps a table access to (vector, byte within entry); `None` for
    /// accesses outside the table or crossing an entry.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let v = usize::try_from(offset / ENTRY_SIZE).ok()?;
        let field = (offset % ENTRY_SIZE) as usize;
        (v < self.vectors.len()
            && (len == 4 || len == 8)
            && field + len <= 16
            && field.is_multiple_of(len))
        .then_some((v, field))
    }

    fn refresh_route(&mut self, v: usize) {
        let e = &mut self.vectors[v];
        if e.stale_route {
            match self.vm.set_msi_route(e.gsi, e.msg) {
                Ok(()) => e.stale_route = false,
                Err(err) => {
                    crate::warn_limited!(error = %err, gsi = e.gsi, "MSI route update failed")
                }
            }
        }
    }

    fn deliver_pending(&mut self, v: usize) {
        self.refresh_route(v);
        if self.vectors[v].pending {
            self.vectors[v].pending = false;
            self.trigger(v as u16);
        }
    }

    /// Signals vector `v`: delivered now, or left pending while masked.
    /// Returns whether it was delivered.
    pub fn trigger(&mut self, v: u16) -> bool {
        let active = self.enabled && !self.function_masked;
        let Some(e) = self.vectors.get_mut(v as usize) else {
            return false;
        };
        if !active || e.control & VECTOR_MASKED != 0 {
            e.pending = true;
            return false;
        }
        if e.stale_route {
            self.refresh_route(v as usize);
        }
        // A full eventfd counter still means "interrupt pending"; nothing is lost.
        let _ = self.vectors[v as usize].irqfd.write(1);
        true
    }

    /// The GSI a message for vector `v` goes out on, when the guest can take
    /// one now (enabled, neither function nor vector masked, route current);
    /// `None` while it must be held back here. A device may then hand an
    /// eventfd of its own to KVM as an irqfd on that GSI, so that the
    /// message needs no trip through this process; it must take the
    /// eventfd back as soon as this turns `None`.
    pub fn deliverable_gsi(&mut self, v: u16) -> Option<u32> {
        let active = self.enabled && !self.function_masked;
        let e = self.vectors.get(v as usize)?;
        if !active || e.control & VECTOR_MASKED != 0 {
            return None;
        }
        self.refresh_route(v as usize);
        let e = &self.vectors[v as usize];
        (!e.stale_route).then_some(e.gsi)
    }

    /// Back to the reset state (all masked, disabled, nothing pending).
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_masked = false;
        for e in &mut self.vectors {
            e.control = VECTOR_MASKED;
            e.pending = false;
            e.msg = MsiMessage::default();
            e.stale_route = true;
        }
    }

    /// Whether vector `v` holds a message back (its PBA bit).
    pub fn pending(&self, v: u16) -> bool {
        self.vectors.get(v as usize).is_some_and(|e| e.pending)
    }

    /// The irqfd of vector `v` (tests watch it).
    pub fn irqfd(&self, v: u16) -> Option<&EventFd> {
        self.vectors.get(v as usize).map(|e| &e.irqfd)
    }
}

/// Reads a message-control value from a config write of `data` at byte
/// `at` relative to the capability start (covers 16- and 32-bit writes).
pub fn control_from_write(at: usize, data: &[u8], current: u16) -> Option<u16> {
    let end = at + data.len();
    if at > 3 || end <= 2 {
        return None;
    }
    let mut bytes = current.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        let pos = at + i;
        if (2..4).contains(&pos) {
            bytes[pos - 2] = *b;
        }
    }
    Some(u16::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fake::FakeVm;

    fn setup(n: u16) -> (Msix, Arc<FakeVm>) {
        let vm = Arc::new(FakeVm::default());
        (Msix::new(n, vm.clone()).unwrap(), vm)
    }

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32) {
        m.table_write(v * 16, &(addr as u32).to_le_bytes());
        m.table_write(v * 16 + 4, &((addr >> 32) as u32).to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
        m.table_write(v * 16 + 12, &0u32.to_le_bytes());
    }

    fn fired(m: &Msix, v: u16) -> bool {
        m.irqfd(v).unwrap().read().is_ok()
    }

    #[test]
    fn capability_layout() {
        let (m, vm) = setup(3);
        let (cap, mask) = m.capability(0, 0x4000, 0x6000);
        assert_eq!(cap[0], CAP_ID);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 2, "table size - 1");
        assert_eq!(u32::from_le_bytes(cap[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(mask[3], 0xc0);
        assert_eq!(vm.irqfds.lock().unwrap().len(), 3);
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
    }

    #[test]
    fn masked_vectors_pend_then_deliver() {
        let (mut m, vm) = setup(2);
        // Disabled: pending.
        assert!(!m.trigger(1));
        m.control_written(CONTROL_ENABLE);
        // Enabled but the vector is masked (reset state): still pending.
        assert!(!m.trigger(1));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        // A byte read inside the qword sees the same bits.
        let mut b = [0u8; 1];
        m.pba_read(0, &mut b);
        assert_eq!(b[0], 0b10);
        let mut hi = [0xffu8; 4];
        m.pba_read(4, &mut hi);
        assert_eq!(hi, [0; 4]);
        // Unmasking delivers it, through the route just programmed.
        program(&mut m, 1, 0xfee0_0000, 0x41);
        assert!(fired(&m, 1));
        assert_eq!(
            vm.routes.lock().unwrap()[&25],
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }
        );
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        assert!(m.trigger(1));
        assert!(fired(&m, 1));
        // Function mask holds everything back until cleared.
        m.control_written(CONTROL_ENABLE | CONTROL_MASK);
        assert!(!m.trigger(1));
        assert!(!fired(&m, 1));
        m.control_written(CONTROL_ENABLE);
        assert!(fired(&m, 1));
    }

    #[test]
    fn table_reads_back_and_ignores_bad_accesses() {
        let (mut m, _) = setup(2);
        program(&mut m, 0, 0x1_fee0_1000, 0x7);
        let mut q = [0u8; 8];
        m.table_read(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        let mut d = [0u8; 4];
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "unmasked");
        // Outside the table, misaligned, odd sizes: no effect, zeros.
        m.table_write(32, &[1, 2, 3, 4]);
        m.table_write(2, &[1, 2, 3, 4]);
        m.table_write(0, &[1, 2]);
        m.table_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_1000);
        m.table_read(1000, &mut d);
        assert_eq!(d, [0; 4]);
        assert!(!m.trigger(7));
    }

    #[test]
    fn control_word_from_config_writes() {
        assert_eq!(control_from_write(2, &[0x00, 0x80], 0x0002), Some(0x8000));
        assert_eq!(
            control_from_write(0, &[0x11, 0, 0x02, 0xc0], 0x0002),
            Some(0xc002)
        );
        assert_eq!(control_from_write(3, &[0x40], 0x8002), Some(0x4002));
        assert_eq!(control_from_write(0, &[0x11, 0x50], 7), None);
        assert_eq!(control_from_write(4, &[0; 4], 7), None);
    }

    #[test]
    fn reset_masks_everything() {
        let (mut m, _) = setup(1);
        m.control_written(CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 1);
        m.reset();
        assert!(!m.enabled());
        assert!(!m.trigger(0));
    }
}
