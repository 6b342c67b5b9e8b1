//! The modern virtio-pci transport (virtio 1.2 §4.1): one PCI function per
//! device, its registers in BAR 0, queue notifications as ioeventfds, and
//! interrupts by MSI-X (or INTx with the ISR register when MSI-X is off).
//!
//! BAR 0, one page per structure:
//!
//! | offset | structure |
//! |---|---|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications, 4 bytes per queue |
//! | 0x4000 | MSI-X table |
//! | 0x6000 | MSI-X pending bits |

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    COMMON_FEATURES, DeviceError, QueueMask, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioBackend, has_feature,
};
use crate::devices::pci::config::{Bar, BarKind, ConfigSpace, Header, reg};
use crate::devices::pci::intx::Intx;
use crate::devices::pci::msix::{self, Msix};
use crate::devices::pci::root::PciDevice;
use crate::devices::{VmOps, le_value};

/// BAR 0's size.
pub const BAR0_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues run.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Why a queue's rings were refused.
const RINGS_INVALID: &str = "rings outside guest memory or misaligned";

/// "No MSI-X vector" in the vector registers.
const NO_VECTOR: u16 = 0xffff;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// PCI capability id of vendor-specific capabilities.
const CAP_VENDOR: u8 = 0x09;

/// Why the function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Configuration space had no room.
    #[error("Building the configuration space")]
    Config(#[from] crate::devices::pci::config::ConfigError),
    /// MSI-X vectors could not be set up.
    #[error("Setting up MSI-X")]
    Msix(#[from] msix::MsixError),
    /// An eventfd or the INTx line could not be made.
    #[error("Setting up eventfds")]
    Io(#[from] std::io::Error),
    /// The backend's queue sizes are invalid.
    #[error("Invalid queue")]
    Queue(#[source] virtio_queue::Error),
}

#[derive(Debug, Default)]
struct Common {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    msix_config: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
}

/// A virtio device as a PCI function.
pub struct VirtioPci<B: VirtioBackend> {
    config: ConfigSpace,
    common: Common,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    /// One per queue; registered as ioeventfds on the notify addresses.
    queue_events: Vec<EventFd>,
    msix: Msix,
    intx: Intx,
    isr: u8,
    backend: B,
    mem: GuestMemoryMmap,
    vm: Arc<dyn VmOps>,
    /// Where BAR 0 decodes, if anywhere (for the ioeventfds).
    bar0: Option<u64>,
    active: bool,
    /// Queues whose enabling was refused for their rings before DRIVER_OK.
    refused: QueueMask,
    /// Signalled when the device thread must re-sync what it watches.
    resync: EventFd,
    /// Host fds of the backend the device thread watches now.
    watched: BTreeMap<RawFd, EventSet>,
    pci_cfg_cap: usize,
    msix_cap: usize,
    /// Notifications taken and interrupts raised (`crate::metrics`).
    stats: Arc<crate::metrics::DeviceStats>,
}

impl<B: VirtioBackend> std::fmt::Debug for VirtioPci<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("type", &self.backend.device_type())
            .field("status", &self.common.status)
            .field("active", &self.active)
            .finish()
    }
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len();
    let mut c = vec![CAP_VENDOR, 0, len as u8, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl<B: VirtioBackend> VirtioPci<B> {
    /// What the device counts, for the VM's figures.
    pub fn stats(&self) -> Arc<crate::metrics::DeviceStats> {
        self.stats.clone()
    }

    /// Wraps `backend` as a function whose BAR 0 sits at `bar0_addr` (in the
    /// 32-bit window) and whose INTx line is `intx_gsi`.
    pub fn new(
        backend: B,
        mem: GuestMemoryMmap,
        vm: Arc<dyn VmOps>,
        bar0_addr: u64,
        intx_gsi: u32,
    ) -> Result<Self, TransportError> {
        let nq = backend.queue_max_sizes().len();
        let queues = backend
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(TransportError::Queue))
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = ConfigSpace::new(Header {
            vendor: 0x1af4,
            device: 0x1040 + backend.device_type(),
            revision: 1,
            class: backend.pci_class(),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
            interrupt_pin: 1,
        });
        config.add_bar(
            0,
            Bar {
                size: BAR0_SIZE,
                kind: BarKind::Mem32,
                prefetchable: false,
            },
            bar0_addr,
        )?;
        // Memory decoding on, as firmware leaves a device it placed.
        config.write(
            reg::COMMAND,
            &crate::devices::pci::config::COMMAND_MEMORY.to_le_bytes(),
        );
        config.set_interrupt_line(intx_gsi as u8);

        let msix = Msix::new(nq as u16 + 1, vm.clone())?;
        let (cap, mask) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&cap, &mask)?;
        let ro = |c: &[u8]| vec![0u8; c.len()];
        for c in [
            vendor_cap(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            vendor_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                u64::from(NOTIFY_MULTIPLIER) * nq as u64,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            vendor_cap(CAP_ISR, ISR_OFFSET, 1, &[]),
            vendor_cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE, &[]),
        ] {
            config.add_capability(&c, &ro(&c))?;
        }
        // The PCI configuration access capability: bar, offset, length and
        // the data window are the driver's to write.
        let pci_cfg = vendor_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut writable = vec![0u8; pci_cfg.len()];
        writable[4] = 0xff;
        writable[8..20].fill(0xff);
        let pci_cfg_cap = config.add_capability(&pci_cfg, &writable)?;

        let intx = Intx::new(intx_gsi, &vm)?;
        let queue_events = (0..nq)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            common: Common {
                msix_config: NO_VECTOR,
                ..Default::default()
            },
            queues,
            queue_vectors: vec![NO_VECTOR; nq],
            queue_events,
            msix,
            intx,
            isr: 0,
            backend,
            mem,
            vm,
            bar0: None,
            active: false,
            refused: 0,
            resync: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            watched: BTreeMap::new(),
            pci_cfg_cap,
            msix_cap,
            stats: Arc::default(),
        })
    }

    /// The backend (tests inspect it).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.common.status
    }

    fn offered(&self) -> u64 {
        self.backend.features() | COMMON_FEATURES
    }

    fn selected(&self) -> Option<usize> {
        let q = self.common.queue_select as usize;
        (q < self.queues.len()).then_some(q)
    }

    /// The common configuration structure as the driver would read it now.
    fn common_image(&self) -> [u8; COMMON_SIZE as usize] {
        let c = &self.common;
        let q = self.selected();
        let queue = q.map(|q| &self.queues[q]);
        let mut b = [0u8; COMMON_SIZE as usize];
        let mut put = |at: usize, v: u64, len: usize| {
            b[at..at + len].copy_from_slice(&v.to_le_bytes()[..len])
        };
        put(0x00, c.device_feature_select.into(), 4);
        let device_features = match c.device_feature_select {
            0 => self.offered() & 0xffff_ffff,
            1 => self.offered() >> 32,
            _ => 0,
        };
        put(0x04, device_features, 4);
        put(0x08, c.driver_feature_select.into(), 4);
        let driver_features = match c.driver_feature_select {
            0 => c.driver_features & 0xffff_ffff,
            1 => c.driver_features >> 32,
            _ => 0,
        };
        put(0x0c, driver_features, 4);
        put(0x10, c.msix_config.into(), 2);
        put(0x12, self.queues.len() as u64, 2);
        put(0x14, c.status.into(), 1);
        put(0x15, c.config_generation.into(), 1);
        put(0x16, c.queue_select.into(), 2);
        put(0x18, queue.map_or(0, |q| q.size().into()), 2);
        put(
            0x1a,
            q.map_or(NO_VECTOR, |q| self.queue_vectors[q]).into(),
            2,
        );
        put(0x1c, queue.map_or(0, |q| q.ready().into()), 2);
        put(0x1e, q.map_or(0, |q| q as u64), 2);
        put(0x20, queue.map_or(0, |q| q.desc_table()), 8);
        put(0x28, queue.map_or(0, |q| q.avail_ring()), 8);
        put(0x30, queue.map_or(0, |q| q.used_ring()), 8);
        b
    }

    /// Reads any span of the common configuration (drivers use each field's
    /// own width; wider reads get the bytes of the fields they cover).
    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let image = self.common_image();
        let start = offset as usize;
        let end = (start + data.len()).min(image.len());
        if start < end {
            data[..end - start].copy_from_slice(&image[start..end]);
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = le_value(data);
        let features_locked = self.common.status & status::FEATURES_OK != 0;
        match offset {
            0x00 => self.common.device_feature_select = v as u32,
            0x08 => self.common.driver_feature_select = v as u32,
            0x0c if !features_locked => {
                let f = &mut self.common.driver_features;
                match self.common.driver_feature_select {
                    0 => *f = (*f & !0xffff_ffff) | (v & 0xffff_ffff),
                    1 => *f = (*f & 0xffff_ffff) | (v & 0xffff_ffff) << 32,
                    _ => {}
                }
            }
            0x10 => self.common.msix_config = self.valid_vector(v as u16),
            0x14 => self.status_write(v as u8),
            0x16 => self.common.queue_select = v as u16,
            _ => self.queue_write(offset, v, data.len()),
        }
    }

    /// A vector the device can use, or NO_VECTOR (which the driver reads back
    /// to learn its choice was refused).
    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix.len() { v } else { NO_VECTOR }
    }

    fn queue_write(&mut self, offset: u64, v: u64, len: usize) {
        let Some(q) = self.selected() else { return };
        if offset == 0x1a {
            self.queue_vectors[q] = self.valid_vector(v as u16);
            return;
        }
        // A running queue's layout is fixed until reset.
        if self.queues[q].ready() {
            return;
        }
        if offset == 0x1c {
            if v == 1 {
                self.enable_queue(q);
            }
            return;
        }
        let queue = &mut self.queues[q];
        // A 64-bit field written whole (8 bytes) or as its halves (Linux).
        let merge = |old: u64, high: bool| match (high, len) {
            (false, 8) => v,
            (false, _) => (old & !0xffff_ffff) | (v & 0xffff_ffff),
            (true, _) => (old & 0xffff_ffff) | (v & 0xffff_ffff) << 32,
        };
        // Invalid values (sizes, misaligned rings) are refused by the
        // `try_` setters and leave the register as it was, which the driver
        // reads back; nothing is logged, since a guest can repeat it at will.
        let _ = match offset {
            0x18 => queue.try_set_size(v as u16),
            0x20 | 0x24 => {
                let a = merge(queue.desc_table(), offset == 0x24);
                queue.try_set_desc_table_address(GuestAddress(a))
            }
            0x28 | 0x2c => {
                let a = merge(queue.avail_ring(), offset == 0x2c);
                queue.try_set_avail_ring_address(GuestAddress(a))
            }
            0x30 | 0x34 => {
                let a = merge(queue.used_ring(), offset == 0x34);
                queue.try_set_used_ring_address(GuestAddress(a))
            }
            _ => Ok(()),
        };
    }

    /// Starts queue `q` only if its rings lie in guest memory, since the
    /// ring accessors skip what they cannot read and the backends would
    /// then find work they can never reach. Activation checks the queues
    /// ready at DRIVER_OK; this catches those enabled after it.
    fn enable_queue(&mut self, q: usize) {
        let queue = &mut self.queues[q];
        queue.set_ready(true);
        if queue.is_valid(&self.mem) {
            self.refused &= !(1 << q);
            return;
        }
        // Refused: the driver reads queue_enable back as 0.
        queue.set_ready(false);
        if self.active {
            self.fail(DeviceError::Queue {
                queue: q,
                reason: RINGS_INVALID.into(),
            });
        } else {
            // Failed at DRIVER_OK, unless the driver fixes the rings first.
            self.refused |= 1 << q;
        }
    }

    fn status_write(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.common.status;
        let mut new = new | (old & status::NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let accepted = self.common.driver_features;
            let ok = accepted & !self.offered() == 0 && has_feature(accepted, VIRTIO_F_VERSION_1);
            if !ok {
                crate::warn_limited!(
                    accepted,
                    offered = self.offered(),
                    "driver accepted features the device does not offer"
                );
                new &= !status::FEATURES_OK;
            }
        }
        // DRIVER_OK without FEATURES_OK is a driver bug; the device stays off.
        let start = new & status::DRIVER_OK != 0
            && old & status::DRIVER_OK == 0
            && new & status::FEATURES_OK != 0;
        self.common.status = new;
        if start {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let features = self.common.driver_features;
        let event_idx = has_feature(features, VIRTIO_RING_F_EVENT_IDX);
        for (i, q) in self.queues.iter_mut().enumerate() {
            if self.refused & (1 << i) != 0 || q.ready() && !q.is_valid(&self.mem) {
                self.fail(DeviceError::Queue {
                    queue: i,
                    reason: RINGS_INVALID.into(),
                });
                return;
            }
            q.set_event_idx(event_idx);
        }
        if let Err(e) = self.backend.activate(features) {
            self.fail(DeviceError::Backend(e.to_string()));
            return;
        }
        self.active = true;
        tracing::debug!(device = self.backend.device_type(), features = format_args!("{features:#x}"), msix = self.msix.enabled(), vectors = ?self.queue_vectors, "virtio device activated");
        let _ = self.resync.write(1);
        // Buffers made available before DRIVER_OK are served now.
        for q in 0..self.queues.len() {
            let _ = self.queue_events[q].write(1);
        }
    }

    fn reset(&mut self) {
        self.backend.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.common = Common {
            msix_config: NO_VECTOR,
            config_generation: self.common.config_generation.wrapping_add(1),
            ..Default::default()
        };
        self.isr = 0;
        self.intx.deassert(&mut self.config);
        self.active = false;
        self.refused = 0;
        let _ = self.resync.write(1);
    }

    /// Stops the device until the driver resets it (DEVICE_NEEDS_RESET).
    fn fail(&mut self, e: DeviceError) {
        crate::warn_limited!(device = self.backend.device_type(), error = %e, "virtio device needs a reset");
        self.active = false;
        self.common.status |= status::NEEDS_RESET;
        self.common.config_generation = self.common.config_generation.wrapping_add(1);
        self.signal_config();
        let _ = self.resync.write(1);
    }

    fn signal(&mut self, vector: u16, isr_bit: u8) {
        tracing::trace!(
            device = self.backend.device_type(),
            vector,
            msix = self.msix.enabled(),
            "interrupt"
        );
        if self.msix.enabled() {
            if vector != NO_VECTOR {
                self.msix.trigger(vector);
                self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            // Counted when the line goes up, not for each reason it stays up.
            if self.isr == 0 {
                self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            }
            self.isr |= isr_bit;
            self.intx.assert(&mut self.config);
        }
    }

    fn signal_queue(&mut self, q: usize) {
        self.signal(self.queue_vectors[q], 1);
    }

    fn signal_config(&mut self) {
        self.signal(self.common.msix_config, 2);
    }

    /// Interrupts the guest for each queue in `used` that wants it.
    fn notify_used(&mut self, used: QueueMask) {
        for q in 0..self.queues.len() {
            if used & (1 << q) == 0 {
                continue;
            }
            match self.queues[q].needs_notification(&self.mem) {
                Ok(false) => {}
                // On a read error of the ring, interrupt anyway: the driver
                // then finds out for itself.
                Ok(true) | Err(_) => self.signal_queue(q),
            }
        }
    }

    fn run_queue(&mut self, q: usize) {
        if !self.active {
            return;
        }
        self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(device = self.backend.device_type(), q, "queue notified");
        match self.backend.process_queue(q, &mut self.queues, &self.mem) {
            Ok(used) => self.notify_used(used),
            Err(e) => self.fail(e),
        }
        self.count_bytes();
    }

    fn host_ready(&mut self, fd: RawFd, events: EventSet) {
        if !self.active {
            return;
        }
        match self
            .backend
            .host_fd_ready(fd, events, &mut self.queues, &self.mem)
        {
            Ok(used) => self.notify_used(used),
            Err(e) => self.fail(e),
        }
        self.count_bytes();
    }

    /// Copies the backend's byte counts to the figures.
    fn count_bytes(&self) {
        let (to, from) = self.backend.bytes();
        self.stats.bytes_to_guest.store(to, Ordering::Relaxed);
        self.stats.bytes_from_guest.store(from, Ordering::Relaxed);
    }

    /// Aligns the backend fds the event loop watches with what it wants now.
    fn sync_watched(&mut self, ops: &mut EventOps) {
        let want: BTreeMap<RawFd, EventSet> = if self.active {
            self.backend.host_fds().into_iter().collect()
        } else {
            BTreeMap::new()
        };
        for (&fd, &old) in &self.watched {
            match want.get(&fd) {
                None => {
                    let _ = ops.remove(Events::empty_raw(fd));
                }
                Some(&new) if new != old => {
                    let _ = ops.modify(Events::new_raw(fd, new));
                }
                _ => {}
            }
        }
        for (&fd, &new) in &want {
            if !self.watched.contains_key(&fd)
                && let Err(e) = ops.add(Events::new_raw(fd, new))
            {
                tracing::error!(fd, error = ?e, "cannot watch a device fd");
            }
        }
        self.watched = want;
    }

    fn move_ioevents(&mut self, old: Option<u64>, new: Option<u64>) {
        for (q, fd) in self.queue_events.iter().enumerate() {
            let at = |base: u64| base + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Some(base) = old {
                let _ = self.vm.unregister_ioevent(fd, at(base));
            }
            if let Some(base) = new
                && let Err(e) = self.vm.register_ioevent(fd, at(base))
            {
                // Notifications still arrive as MMIO exits (see `bar_write`).
                crate::warn_limited!(error = %e, "queue notification ioeventfd not registered");
            }
        }
        self.bar0 = new;
    }

    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let c = self.pci_cfg_cap;
        (
            self.config.byte(c + 4),
            u64::from(self.config.dword(c + 8)),
            self.config.dword(c + 12) as usize,
        )
    }
}

impl<B: VirtioBackend> PciDevice for VirtioPci<B> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_read(&mut self, offset: usize) -> u32 {
        let data_reg = self.pci_cfg_cap + 16;
        if offset == data_reg {
            // Access to BAR 0 through configuration space.
            let (bar, at, len) = self.pci_cfg_window();
            if bar == 0 && matches!(len, 1 | 2 | 4) {
                let mut buf = [0u8; 4];
                self.bar_read(0, at, &mut buf[..len]);
                return u32::from_le_bytes(buf);
            }
            return 0;
        }
        self.config.read(offset)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let before = self.config.word(self.msix_cap + 2);
        let effect = self.config.write(offset, data);
        if effect.command {
            self.intx.command_written(&self.config);
        }
        if let Some(start) = offset.checked_sub(self.msix_cap)
            && let Some(control) = msix::control_from_write(start, data, before)
        {
            let _ = control;
            self.msix
                .control_written(self.config.word(self.msix_cap + 2));
        }
        let data_reg = self.pci_cfg_cap + 16;
        if offset >= data_reg && offset < data_reg + 4 {
            let (bar, at, len) = self.pci_cfg_window();
            if bar == 0 && matches!(len, 1 | 2 | 4) {
                let bytes = self.config.read(data_reg).to_le_bytes();
                self.bar_write(0, at, &bytes[..len]);
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.common_read(o, data),
            ISR_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = self.isr;
                }
                self.isr = 0;
                self.intx.deassert(&mut self.config);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.backend.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + self.msix.pba_size()).contains(&o) => {
                self.msix.pba_read(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let notify_end = NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * self.queues.len() as u64;
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.common_write(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.backend.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..notify_end).contains(&o) => {
                // Reached only where no ioeventfd caught the write.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                let _ = self.queue_events[q].write(1);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.table_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar == 0 {
            self.move_ioevents(old, new);
        }
    }
}

impl<B: VirtioBackend> MutEventSubscriber for VirtioPci<B> {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<RawFd> = self.queue_events.iter().map(|e| e.as_raw_fd()).collect();
        fds.push(self.intx.resample_fd().as_raw_fd());
        fds.push(self.resync.as_raw_fd());
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(error = ?e, "cannot watch a virtio eventfd");
            }
        }
        self.sync_watched(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(q) = self.queue_events.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_events[q].read();
            self.run_queue(q);
        } else if fd == self.intx.resample_fd().as_raw_fd() {
            self.intx.resampled(&self.config);
        } else if fd == self.resync.as_raw_fd() {
            let _ = self.resync.read();
        } else if self.watched.contains_key(&fd) {
            self.host_ready(fd, events.event_set());
        }
        self.sync_watched(ops);
    }
}

#[cfg(test)]
mod tests;
