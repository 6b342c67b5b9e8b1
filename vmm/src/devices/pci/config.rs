//! A PCI function's 256-byte configuration space: header, BARs, capability
//! list, and which bits a guest may change.
//!
//! Every register has a write mask. BAR sizing then needs no special case:
//! the address bits a BAR of size `n` decodes are the only writable ones, so
//! the guest's all-ones write reads back as `!(n - 1)` with the type bits
//! below, as on hardware.

/// Bytes of conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
const REGS: usize = CONFIG_SPACE_SIZE / 4;

/// Register offsets used here and by devices.
pub mod reg {
    /// Vendor and device id.
    pub const ID: usize = 0x00;
    /// Command (low half) and status (high half).
    pub const COMMAND: usize = 0x04;
    /// Revision and class code.
    pub const CLASS: usize = 0x08;
    /// Cache line size, latency, header type, BIST.
    pub const HEADER: usize = 0x0c;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor and id.
    pub const SUBSYSTEM: usize = 0x2c;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line (low byte) and pin (next byte).
    pub const INTERRUPT: usize = 0x3c;
    /// Where capabilities start.
    pub const CAP_START: usize = 0x40;
}

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering (DMA).
pub const COMMAND_MASTER: u16 = 1 << 2;
/// Command register: INTx emulation disabled (PCI 2.3).
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: INTx pending (PCI 2.3).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status register: the capability list exists.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Command bits a guest may set: I/O, memory, master, parity response,
/// SERR, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;

/// A BAR's address width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR (takes this register and the next).
    Mem64,
}

/// A memory BAR the function decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Bytes decoded (a power of two, at least 4 KiB here).
    pub size: u64,
    /// Width.
    pub kind: BarKind,
    /// Prefetchable (no side effects on reads).
    pub prefetchable: bool,
}

/// Identity of a function, for its header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class, subclass, programming interface (24 bits).
    pub class: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
    /// Interrupt pin (1 = INTA#, 0 = none).
    pub interrupt_pin: u8,
}

/// Why a BAR or capability could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Index out of range or already used.
    #[error("BAR {0} is taken or does not exist")]
    BarSlot(usize),
    /// Not a power of two of at least 4 KiB.
    #[error("BAR size {0:#x} is not a power of two of at least 4 KiB")]
    BarSize(u64),
    /// No room left for a capability.
    #[error("No room for a {0}-byte capability")]
    CapabilityRoom(usize),
}

/// What a write changed, for the owner to act on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteEffect {
    /// The command register was written.
    pub command: bool,
    /// A BAR register was written.
    pub bar: bool,
}

/// The configuration space of one function.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    regs: [u32; REGS],
    wmask: [u32; REGS],
    bars: [Option<Bar>; 6],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl ConfigSpace {
    /// A type-0 header for `h`, no BARs, no capabilities.
    pub fn new(h: Header) -> Self {
        let mut c = Self {
            regs: [0; REGS],
            wmask: [0; REGS],
            bars: [None; 6],
            last_cap: None,
            next_cap: reg::CAP_START,
        };
        c.regs[reg::ID / 4] = u32::from(h.vendor) | u32::from(h.device) << 16;
        c.regs[reg::CLASS / 4] = u32::from(h.revision) | (h.class & 0xff_ffff) << 8;
        c.regs[reg::SUBSYSTEM / 4] = u32::from(h.subsystem_vendor) | u32::from(h.subsystem) << 16;
        c.regs[reg::INTERRUPT / 4] = u32::from(h.interrupt_pin) << 8;
        c.wmask[reg::COMMAND / 4] = COMMAND_WRITABLE;
        // Cache line size and latency timer are plain storage.
        c.wmask[reg::HEADER / 4] = 0x0000_ffff;
        // Interrupt line is written by the OS for its own records.
        c.wmask[reg::INTERRUPT / 4] = 0xff;
        c
    }

    /// Declares BAR `index` at `addr`.
    pub fn add_bar(&mut self, index: usize, bar: Bar, addr: u64) -> Result<(), ConfigError> {
        let slots = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        if index + slots > 6 || (index..index + slots).any(|i| self.bar_slot_used(i)) {
            return Err(ConfigError::BarSlot(index));
        }
        if !bar.size.is_power_of_two() || bar.size < 0x1000 {
            return Err(ConfigError::BarSize(bar.size));
        }
        let r = reg::BAR0 / 4 + index;
        let type_bits = match bar.kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 => 0b100,
        } | if bar.prefetchable { 0b1000 } else { 0 };
        let mask = !(bar.size - 1);
        self.regs[r] = (addr as u32 & mask as u32) | type_bits;
        self.wmask[r] = mask as u32 & !0xf;
        if bar.kind == BarKind::Mem64 {
            self.regs[r + 1] = (addr >> 32) as u32;
            self.wmask[r + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    fn bar_slot_used(&self, i: usize) -> bool {
        self.bars[i].is_some()
            || (i > 0 && matches!(self.bars[i - 1], Some(b) if b.kind == BarKind::Mem64))
    }

    /// The BAR declared at `index`.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Indexes of declared BARs.
    pub fn bar_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..6).filter(|&i| self.bars[i].is_some())
    }

    /// The address BAR `index` is programmed with.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let r = reg::BAR0 / 4 + index;
        let low = u64::from(self.regs[r] & !0xf);
        Some(match bar.kind {
            BarKind::Mem32 => low,
            BarKind::Mem64 => low | u64::from(self.regs[r + 1]) << 32,
        })
    }

    /// Appends a capability. `body` starts with the capability id; its
    /// "next" byte is filled in here. `writable` masks the bytes the guest may
    /// change (same length as `body`). Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len().next_multiple_of(4);
        let at = self.next_cap;
        if body.len() < 2 || at + len > CONFIG_SPACE_SIZE || writable.len() != body.len() {
            return Err(ConfigError::CapabilityRoom(body.len()));
        }
        for (i, (&b, &w)) in body.iter().zip(writable).enumerate() {
            self.set_byte(at + i, b);
            self.set_mask_byte(at + i, w);
        }
        // Chain it: the previous capability (or the header) points here.
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, at as u8),
            None => {
                self.set_byte(reg::CAP_PTR, at as u8);
                self.regs[reg::COMMAND / 4] |= u32::from(STATUS_CAP_LIST) << 16;
            }
        }
        self.set_byte(at + 1, 0);
        self.last_cap = Some(at);
        self.next_cap = at + len;
        Ok(at)
    }

    /// A dword register (`offset` is rounded down to 4).
    pub fn read(&self, offset: usize) -> u32 {
        self.regs.get(offset / 4).copied().unwrap_or(0)
    }

    /// One byte.
    pub fn byte(&self, offset: usize) -> u8 {
        (self.read(offset) >> ((offset % 4) * 8)) as u8
    }

    /// A little-endian u16 at `offset`.
    pub fn word(&self, offset: usize) -> u16 {
        u16::from(self.byte(offset)) | u16::from(self.byte(offset + 1)) << 8
    }

    /// A little-endian u32 at `offset` (need not be aligned).
    pub fn dword(&self, offset: usize) -> u32 {
        u32::from(self.word(offset)) | u32::from(self.word(offset + 2)) << 16
    }

    /// Sets a byte regardless of the write mask (device side).
    pub fn set_byte(&mut self, offset: usize, v: u8) {
        if let Some(r) = self.regs.get_mut(offset / 4) {
            let shift = (offset % 4) * 8;
            *r = (*r & !(0xff << shift)) | u32::from(v) << shift;
        }
    }

    /// Sets a little-endian u16 regardless of the write mask.
    pub fn set_word(&mut self, offset: usize, v: u16) {
        self.set_byte(offset, v as u8);
        self.set_byte(offset + 1, (v >> 8) as u8);
    }

    /// Sets a little-endian u32 regardless of the write mask.
    pub fn set_dword(&mut self, offset: usize, v: u32) {
        self.set_word(offset, v as u16);
        self.set_word(offset + 2, (v >> 16) as u16);
    }

    fn set_mask_byte(&mut self, offset: usize, v: u8) {
        if let Some(r) = self.wmask.get_mut(offset / 4) {
            let shift = (offset % 4) * 8;
            *r = (*r & !(0xff << shift)) | u32::from(v) << shift;
        }
    }

    /// A guest write of `data` at `offset`: only writable bits change.
    /// Accesses past the end or crossing a dword are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> WriteEffect {
        let mut effect = WriteEffect::default();
        if data.is_empty()
            || data.len() > 4
            || offset % 4 + data.len() > 4
            || offset >= CONFIG_SPACE_SIZE
        {
            return effect;
        }
        let r = offset / 4;
        let shift = (offset % 4) * 8;
        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (8 * i);
        }
        let lanes = if data.len() == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * data.len())) - 1) << shift
        };
        let mask = self.wmask[r] & lanes;
        self.regs[r] = (self.regs[r] & !mask) | ((value << shift) & mask);
        effect.command = r == reg::COMMAND / 4 && shift < 16;
        effect.bar = (reg::BAR0 / 4..reg::BAR0 / 4 + 6).contains(&r);
        effect
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.word(reg::COMMAND)
    }

    /// Whether memory BARs are decoded.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Whether the guest disabled INTx.
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// Reflects the INTx line's state in the status register.
    pub fn set_interrupt_status(&mut self, pending: bool) {
        let status = self.word(reg::COMMAND + 2);
        let status = if pending {
            status | STATUS_INTERRUPT
        } else {
            status & !STATUS_INTERRUPT
        };
        self.set_word(reg::COMMAND + 2, status);
    }

    /// Sets the interrupt line register (the GSI firmware would report).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.set_byte(reg::INTERRUPT, line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
            interrupt_pin: 1,
        }
    }

    fn write32(c: &mut ConfigSpace, off: usize, v: u32) -> WriteEffect {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn header_fields() {
        let c = ConfigSpace::new(header());
        assert_eq!(c.read(reg::ID), 0x1042_1af4);
        assert_eq!(c.read(reg::CLASS), 0x0180_0001);
        assert_eq!(c.byte(reg::INTERRUPT + 1), 1);
        // Identity is read-only.
        let mut c2 = c.clone();
        write32(&mut c2, reg::ID, 0);
        write32(&mut c2, reg::CLASS, 0);
        assert_eq!(c2.read(reg::ID), c.read(reg::ID));
        assert_eq!(c2.read(reg::CLASS), c.read(reg::CLASS));
    }

    #[test]
    fn bar32_sizing() {
        let mut c = ConfigSpace::new(header());
        let bar = Bar {
            size: 0x8000,
            kind: BarKind::Mem32,
            prefetchable: false,
        };
        c.add_bar(0, bar, 0xc000_0000).unwrap();
        assert_eq!(c.read(reg::BAR0), 0xc000_0000);
        let e = write32(&mut c, reg::BAR0, 0xffff_ffff);
        assert!(e.bar);
        assert_eq!(c.read(reg::BAR0), 0xffff_8000, "size read back");
        write32(&mut c, reg::BAR0, 0xc001_2345);
        assert_eq!(c.bar_address(0), Some(0xc001_0000), "low bits not decoded");
    }

    #[test]
    fn bar64_sizing_and_flags() {
        let mut c = ConfigSpace::new(header());
        let bar = Bar {
            size: 1 << 33,
            kind: BarKind::Mem64,
            prefetchable: true,
        };
        c.add_bar(2, bar, 0x40_0000_0000).unwrap();
        assert_eq!(c.read(reg::BAR0 + 8) & 0xf, 0b1100, "64-bit, prefetchable");
        write32(&mut c, reg::BAR0 + 8, 0xffff_ffff);
        write32(&mut c, reg::BAR0 + 12, 0xffff_ffff);
        assert_eq!(
            c.read(reg::BAR0 + 8),
            0b1100,
            "no low address bits for 8 GiB"
        );
        assert_eq!(c.read(reg::BAR0 + 12), 0xffff_fffe);
        write32(&mut c, reg::BAR0 + 12, 0x12);
        write32(&mut c, reg::BAR0 + 8, 0);
        assert_eq!(c.bar_address(2), Some(0x12_0000_0000));
        // The upper half is not a BAR of its own.
        assert_eq!(
            c.add_bar(
                3,
                Bar {
                    size: 0x1000,
                    kind: BarKind::Mem32,
                    prefetchable: false
                },
                0
            ),
            Err(ConfigError::BarSlot(3))
        );
        assert_eq!(c.add_bar(5, bar, 0), Err(ConfigError::BarSlot(5)));
        assert!(
            c.add_bar(
                0,
                Bar {
                    size: 0x1800,
                    ..bar
                },
                0
            )
            .is_err()
        );
    }

    #[test]
    fn command_and_status_bits() {
        let mut c = ConfigSpace::new(header());
        let e = c.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert!(e.command);
        assert_eq!(c.command(), 0x0547);
        assert!(c.memory_enabled() && c.intx_disabled());
        // Status is read-only to the guest; the device reports INTx in it.
        c.write(reg::COMMAND + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.word(reg::COMMAND + 2), 0);
        c.set_interrupt_status(true);
        assert_eq!(
            c.word(reg::COMMAND + 2) & STATUS_INTERRUPT,
            STATUS_INTERRUPT
        );
        // A write to the status half does not count as a command write.
        assert!(!c.write(reg::COMMAND + 2, &[0, 0]).command);
    }

    #[test]
    fn capability_chain() {
        let mut c = ConfigSpace::new(header());
        let a = c
            .add_capability(&[0x11, 0xaa, 1, 2], &[0, 0, 0xff, 0])
            .unwrap();
        let b = c
            .add_capability(&[0x09, 0xbb, 16, 1, 0, 0, 0, 0], &[0; 8])
            .unwrap();
        assert_eq!(c.byte(reg::CAP_PTR), a as u8);
        assert_eq!(c.byte(a + 1), b as u8);
        assert_eq!(c.byte(b + 1), 0);
        assert_ne!(c.word(reg::COMMAND + 2) & STATUS_CAP_LIST, 0);
        c.write(a + 2, &[0x55, 0x55]);
        assert_eq!(
            (c.byte(a + 2), c.byte(a + 3)),
            (0x55, 2),
            "only the writable byte"
        );
        assert!(c.add_capability(&[0; 200], &[0; 200]).is_err());
    }

    #[test]
    fn odd_accesses_are_dropped() {
        let mut c = ConfigSpace::new(header());
        let before = c.clone().regs;
        c.write(0x3e, &[1, 2, 3, 4]);
        c.write(300, &[1]);
        c.write(0, &[]);
        assert_eq!(before, c.regs);
        assert_eq!(c.read(4096), 0);
    }
}
