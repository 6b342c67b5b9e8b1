//! The VM backend's device layer, as guest userspace sees it: the channel
//! device is a PCI function whose memory BAR *is* the shared region and whose
//! register BAR holds a doorbell; its interrupt reaches userspace through
//! UIO — as an MSI-X message with our module `p2pvm_channel` (built by
//! `p2pvm-images` and loaded by the images' init), else as INTx with Linux's
//! stock `uio_pci_generic`. Rings, sessions and the API above are the
//! same as in the sandbox backend — only [`Region`] mapping and the
//! [`EventChannel`] differ.
//!
//! ```text
//!  guest A: notify() ─ store to BAR0 doorbell ─► ioeventfd (VMM A, no exit)
//!                                                     │ eventfd shared by the two VMMs
//!  guest B: wait() ◄─ /dev/uioN ◄─ MSI-X: the same eventfd as KVM's irqfd
//!                                    (or INTx, raised by VMM B)
//! ```
//!
//! With MSI-X, taking an interrupt touches no register: `wait` is one read of
//! `/dev/uioN`, and the guest makes no exit to its VMM for it.
//!
//! Registers follow the ivshmem device's BAR 0 (QEMU's
//! `docs/specs/ivshmem-spec.rst`), whose vendor and device id the function
//! carries: interrupt mask, interrupt status (cleared by reading it), the
//! function's position (0: service VM, the device side; 1: client VM, the
//! driver side) and the doorbell.
//!
//! Interrupt flow with `uio_pci_generic` (a guest without our module): its handler sets the PCI 2.3
//! interrupt-disable bit (command register bit 10); `wait` then returns after
//! clearing that bit again through the function's sysfs `config` file, which
//! the VMM also takes as the acknowledgment (reading the interrupt status
//! does the same, and is how `open` clears a stale one). A doorbell that
//! arrives in between waits in the VMM and raises the line again as soon as
//! it is acknowledged: no notification is lost.
//!
//! Mapping the region: sysfs `resource2` maps it uncached, which is correct
//! but slow for rings that are read and written by the byte; `/dev/mem`
//! without `O_SYNC` maps it write-back (the kernel allows it because no driver
//! claims the BAR). [`RegionMapping::Auto`] takes `/dev/mem` and falls back to
//! `resource2`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::ChannelError;
use crate::event::EventChannel;
use crate::region::Region;

/// PCI vendor id of the channel device (Red Hat's, as ivshmem's).
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device id of the channel device (ivshmem's).
pub const DEVICE_ID: u16 = 0x1110;
/// Class code: memory controller, "other" (as ivshmem).
pub const CLASS_CODE: u32 = 0x05_80_00;
/// The BAR holding the registers.
pub const REGISTER_BAR: usize = 0;
/// Size of the register BAR.
pub const REGISTER_BAR_SIZE: u64 = 0x1000;
/// The BAR that is the shared region.
pub const REGION_BAR: usize = 2;

/// Register offsets in BAR 0 (32-bit registers).
pub mod reg {
    /// Bit 0 enables the device's interrupt.
    pub const INTR_MASK: u64 = 0x00;
    /// Bit 0: the peer rang since the last read. Reading clears it.
    pub const INTR_STATUS: u64 = 0x04;
    /// Which end this VM is: [`super::POSITION_DEVICE`] or [`super::POSITION_DRIVER`].
    pub const IV_POSITION: u64 = 0x08;
    /// Any write rings the peer.
    pub const DOORBELL: u64 = 0x0c;
}

/// `IVPosition` of the service VM's function (the channel's device side).
pub const POSITION_DEVICE: u32 = 0;
/// `IVPosition` of the client VM's function (the channel's driver side).
pub const POSITION_DRIVER: u32 = 1;

/// Command register: INTx disabled (PCI 2.3).
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Offset of the command register in configuration space.
const CONFIG_COMMAND: u64 = 0x04;

/// How long binding `uio_pci_generic` may take to produce `/dev/uioN`.
const BIND_TIMEOUT: Duration = Duration::from_secs(5);

/// Our guest module's PCI driver name.
pub const MSIX_DRIVER: &str = "p2pvm_channel";

/// How the function's interrupt reaches userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupts {
    /// An MSI-X message, through our module `p2pvm_channel`: nothing to
    /// acknowledge.
    Msix,
    /// INTx through `uio_pci_generic`, re-enabled after each interrupt.
    Intx,
}

impl Interrupts {
    /// `msix` or `intx`, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Msix => "msix",
            Self::Intx => "intx",
        }
    }
}

/// How guest userspace maps the region BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegionMapping {
    /// `/dev/mem`, falling back to sysfs `resource2`.
    #[default]
    Auto,
    /// `/dev/mem` at the BAR's physical address: write-back.
    DevMem,
    /// sysfs `resource2`: uncached.
    Sysfs,
}

/// A region mapping other than `auto`, `devmem` or `sysfs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected auto, devmem or sysfs")]
pub struct UnknownMapping(pub String);

impl std::str::FromStr for RegionMapping {
    type Err = UnknownMapping;
    fn from_str(s: &str) -> Result<Self, UnknownMapping> {
        match s {
            "auto" => Ok(Self::Auto),
            "devmem" => Ok(Self::DevMem),
            "sysfs" => Ok(Self::Sysfs),
            _ => Err(UnknownMapping(s.to_owned())),
        }
    }
}

fn dev_err(dev: &Path, what: &str, e: impl std::fmt::Display) -> ChannelError {
    ChannelError::Device(format!("{}: {what}: {e}", dev.display()))
}

fn read_hex(path: &Path) -> io::Result<u32> {
    let text = std::fs::read_to_string(path)?;
    let t = text.trim();
    u32::from_str_radix(t.trim_start_matches("0x"), 16)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{t:?}: {e}")))
}

/// The channel function under `sysfs` (normally `/sys/bus/pci/devices`):
/// the first function with the channel's vendor and device id.
pub fn find(sysfs: &Path) -> Result<PathBuf, ChannelError> {
    let entries = std::fs::read_dir(sysfs).map_err(|e| dev_err(sysfs, "listing", e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            read_hex(&p.join("vendor")).ok() == Some(u32::from(VENDOR_ID))
                && read_hex(&p.join("device")).ok() == Some(u32::from(DEVICE_ID))
        })
        .collect();
    found.sort();
    found.into_iter().next().ok_or_else(|| {
        ChannelError::Device(format!(
            "no channel device ({VENDOR_ID:04x}:{DEVICE_ID:04x}) under {}",
            sysfs.display()
        ))
    })
}

/// Returns the function's `/dev/uioN` and how its interrupts come: our
/// module's if it has bound the function (MSI-X), else `uio_pci_generic`'s
/// (INTx), bound here unless it already is. `dev` is a sysfs device
/// directory.
pub fn bind_uio(dev: &Path) -> Result<(PathBuf, Interrupts), ChannelError> {
    let driver = std::fs::read_link(dev.join("driver")).ok();
    if driver.as_deref().is_some_and(|d| d.ends_with(MSIX_DRIVER)) {
        return Ok((uio_node(dev)?, Interrupts::Msix));
    }
    let drivers = Path::new("/sys/bus/pci/drivers/uio_pci_generic");
    let bound = driver.is_some_and(|d| d.ends_with("uio_pci_generic"));
    if !bound {
        if !drivers.exists() {
            return Err(dev_err(
                dev,
                "binding uio_pci_generic",
                "the driver is not loaded (insmod uio.ko and uio_pci_generic.ko first)",
            ));
        }
        // new_id binds every matching unbound function; EEXIST means the id is
        // known already, and then an explicit bind does it.
        let id = format!("{VENDOR_ID:04x} {DEVICE_ID:04x}");
        if let Err(e) = std::fs::write(drivers.join("new_id"), &id)
            && e.raw_os_error() != Some(rustix::io::Errno::EXIST.raw_os_error())
        {
            return Err(dev_err(dev, "writing uio_pci_generic/new_id", e));
        }
        let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_millis(500);
        while dev.join("driver").symlink_metadata().is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if dev.join("driver").symlink_metadata().is_err() {
            std::fs::write(drivers.join("bind"), name)
                .map_err(|e| dev_err(dev, "binding uio_pci_generic", e))?;
        }
    }
    Ok((uio_node(dev)?, Interrupts::Intx))
}

/// The `/dev/uioN` of a function bound to a UIO driver (waits for it to appear).
fn uio_node(dev: &Path) -> Result<PathBuf, ChannelError> {
    let deadline = Instant::now() + BIND_TIMEOUT;
    loop {
        if let Ok(mut entries) = std::fs::read_dir(dev.join("uio"))
            && let Some(Ok(e)) = entries.next()
        {
            let node = Path::new("/dev").join(e.file_name());
            if node.exists() {
                return Ok(node);
            }
        }
        if Instant::now() >= deadline {
            return Err(dev_err(dev, "waiting for /dev/uioN", "it did not appear"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Start and size of BAR `bar` from the function's sysfs `resource` file.
fn bar_range(dev: &Path, bar: usize) -> Result<(u64, u64), ChannelError> {
    let text = std::fs::read_to_string(dev.join("resource"))
        .map_err(|e| dev_err(dev, "reading resource", e))?;
    let line = text
        .lines()
        .nth(bar)
        .ok_or_else(|| dev_err(dev, "resource", format!("no BAR {bar}")))?;
    let mut nums = line
        .split_whitespace()
        .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16));
    match (nums.next(), nums.next()) {
        (Some(Ok(start)), Some(Ok(end))) if end > start => Ok((start, end - start + 1)),
        _ => Err(dev_err(dev, "resource", format!("BAR {bar} is not mapped"))),
    }
}

fn open_rw(path: &Path, flags: rustix::fs::OFlags) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
}

/// Maps the region BAR of the function at `dev`; also says which mapping it
/// took ([`RegionMapping::DevMem`] or [`RegionMapping::Sysfs`]).
pub fn map_region(dev: &Path, how: RegionMapping) -> Result<(Region, RegionMapping), ChannelError> {
    let (phys, len) = bar_range(dev, REGION_BAR)?;
    let devmem = || -> Result<Region, ChannelError> {
        let f = open_rw(Path::new("/dev/mem"), rustix::fs::OFlags::CLOEXEC)
            .map_err(|e| dev_err(dev, "opening /dev/mem", e))?;
        Region::open_device(f, phys, len)
    };
    let sysfs = || -> Result<Region, ChannelError> {
        let path = dev.join(format!("resource{REGION_BAR}"));
        let f = open_rw(&path, rustix::fs::OFlags::CLOEXEC)
            .map_err(|e| dev_err(dev, "opening resource2", e))?;
        Region::open_device(f, 0, len)
    };
    let uncached = || sysfs().map(|r| (r, RegionMapping::Sysfs));
    match how {
        RegionMapping::DevMem => devmem().map(|r| (r, RegionMapping::DevMem)),
        RegionMapping::Sysfs => uncached(),
        RegionMapping::Auto => devmem()
            .map(|r| (r, RegionMapping::DevMem))
            .or_else(|e| {
                tracing::warn!(error = %e, "no write-back mapping of the region; using the uncached sysfs one");
                uncached()
            }),
    }
}

/// The event channel over the channel device: the doorbell register to
/// notify, `/dev/uioN` to wait.
#[derive(Debug)]
pub struct UioEvents {
    regs: GuestMemoryMmap<()>,
    uio: AsyncFd<File>,
    config: File,
    interrupts: Interrupts,
    /// Moving average of what acknowledging an interrupt costs here, ns.
    ack_ns: std::sync::atomic::AtomicU64,
    /// Interrupts acknowledged (the cost is reported once, after a few).
    acks: std::sync::atomic::AtomicU64,
    /// The command register with INTx enabled, as read at open.
    command: std::sync::atomic::AtomicU16,
    /// Whether to poll for expected answers: only over a write-back mapping,
    /// where a look at the ring is a cache hit, not a bus cycle.
    poll_answers: bool,
}

impl UioEvents {
    /// Opens the registers, `uio` (the function's `/dev/uioN`) and its
    /// configuration space; enables the device's interrupt and clears any
    /// stale one. Needs a tokio runtime.
    pub fn open(dev: &Path, uio: &Path, interrupts: Interrupts) -> Result<Self, ChannelError> {
        let regs_file = open_rw(
            &dev.join(format!("resource{REGISTER_BAR}")),
            rustix::fs::OFlags::CLOEXEC,
        )
        .map_err(|e| dev_err(dev, "opening resource0", e))?;
        let regs = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            REGISTER_BAR_SIZE as usize,
            Some(FileOffset::new(regs_file, 0)),
        )])
        .map_err(|e| dev_err(dev, "mapping resource0", e))?;
        let config = open_rw(&dev.join("config"), rustix::fs::OFlags::CLOEXEC)
            .map_err(|e| dev_err(dev, "opening config", e))?;
        let uio_file = open_rw(
            uio,
            rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NONBLOCK,
        )
        .map_err(|e| dev_err(dev, "opening its uio node", e))?;
        // `new` is deprecated because a `T` that does not own its descriptor
        // could close it while registered; a `File` moved in cannot be.
        #[allow(deprecated)]
        let uio = AsyncFd::new(uio_file).map_err(ChannelError::Io)?;
        let events = Self {
            regs,
            uio,
            config,
            interrupts,
            ack_ns: std::sync::atomic::AtomicU64::new(0),
            acks: std::sync::atomic::AtomicU64::new(0),
            command: std::sync::atomic::AtomicU16::new(0),
            poll_answers: false,
        };
        events.store(reg::INTR_MASK, 1);
        events
            .acknowledge()
            .map_err(|e| dev_err(dev, "acknowledging its interrupt", e))?;
        Ok(events)
    }

    /// How interrupts come.
    pub fn interrupts(&self) -> Interrupts {
        self.interrupts
    }

    /// This VM's end: [`POSITION_DEVICE`] or [`POSITION_DRIVER`].
    pub fn position(&self) -> u32 {
        self.load(reg::IV_POSITION)
    }

    fn load(&self, off: u64) -> u32 {
        self.regs
            .load(GuestAddress(off), Ordering::Acquire)
            .expect("registers are inside BAR 0")
    }

    fn store(&self, off: u64, v: u32) {
        self.regs
            .store(v, GuestAddress(off), Ordering::Release)
            .expect("registers are inside BAR 0")
    }

    /// Folds one acknowledgment's duration into the average.
    fn record_ack(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let old = self.ack_ns.load(Ordering::Relaxed);
        self.ack_ns
            .store(moving_average(old, ns), Ordering::Relaxed);
        if self.acks.fetch_add(1, Ordering::Relaxed) == 64 {
            // What a notification costs here shows in this one figure: on
            // hardware KVM a few µs, in the nested test host hundreds.
            tracing::info!(
                ack_us = self.ack_ns.load(Ordering::Relaxed) / 1000,
                "channel interrupts: acknowledging one costs this much here"
            );
        }
    }

    /// Clears the device's interrupt status, then lets INTx through again
    /// (at open: whatever state the last user left).
    fn acknowledge(&self) -> io::Result<()> {
        let _ = self.load(reg::INTR_STATUS);
        if self.interrupts == Interrupts::Msix {
            return Ok(());
        }
        let mut cmd = [0u8; 2];
        self.config.read_exact_at(&mut cmd, CONFIG_COMMAND)?;
        let cmd = u16::from_le_bytes(cmd) & !COMMAND_INTX_DISABLE;
        self.command.store(cmd, Ordering::Relaxed);
        self.enable_intx()
    }

    /// After an interrupt: uio_pci_generic's handler disabled INTx; enabling
    /// it again also acknowledges the interrupt in the VMM (one register
    /// round trip, where reading the status first would be two).
    fn enable_intx(&self) -> io::Result<()> {
        let cmd = self.command.load(Ordering::Relaxed);
        self.config.write_all_at(&cmd.to_le_bytes(), CONFIG_COMMAND)
    }
}

impl EventChannel for UioEvents {
    fn notify(&self) -> io::Result<()> {
        self.store(reg::DOORBELL, 1);
        Ok(())
    }

    fn poll_for_answers(&self) -> bool {
        self.poll_answers
    }

    async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.uio.readable().await?;
            let mut count = [0u8; 4];
            match rustix::io::read(self.uio.get_ref().as_fd(), &mut count) {
                Ok(_) if self.interrupts == Interrupts::Msix => return Ok(()),
                Ok(_) => {
                    let t = Instant::now();
                    let r = self.enable_intx();
                    self.record_ack(t.elapsed());
                    return r;
                }
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The channel device of this VM, ready: the region mapped and the event
/// channel open.
#[derive(Debug)]
pub struct VmChannel {
    /// The shared region.
    pub region: Region,
    /// Doorbell and interrupt.
    pub events: UioEvents,
    /// The function's sysfs directory.
    pub device: PathBuf,
}

/// An exponential moving average of weight 1/8 (the first sample is taken
/// as it is): one slow acknowledgment (a preempted vCPU) moves it little.
fn moving_average(old: u64, sample: u64) -> u64 {
    if old == 0 {
        sample
    } else {
        old - old / 8 + sample / 8
    }
}

/// Finds the channel function (or takes `device`), binds `uio_pci_generic`,
/// maps the region and opens the event channel, and checks the function is
/// the `expected` end ([`POSITION_DEVICE`] or [`POSITION_DRIVER`]).
pub fn open(
    device: Option<&Path>,
    how: RegionMapping,
    expected: u32,
) -> Result<VmChannel, ChannelError> {
    let device = match device {
        Some(d) => d.to_path_buf(),
        None => find(Path::new("/sys/bus/pci/devices"))?,
    };
    let (uio, interrupts) = bind_uio(&device)?;
    let mut events = UioEvents::open(&device, &uio, interrupts)?;
    tracing::info!(
        interrupts = interrupts.name(),
        device = %device.display(),
        "channel device open"
    );
    let position = events.position();
    if position != expected {
        return Err(dev_err(
            &device,
            "wrong end",
            format!(
                "the VMM made this VM position {position}, this program serves position {expected}"
            ),
        ));
    }
    let (region, mapped) = map_region(&device, how)?;
    events.poll_answers = mapped == RegionMapping::DevMem;
    Ok(VmChannel {
        region,
        events,
        device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_cost_average_follows_slowly() {
        assert_eq!(moving_average(0, 800), 800);
        // One outlier moves it by an eighth of the difference.
        assert_eq!(moving_average(800, 80_000), 800 - 100 + 10_000);
        let mut avg = 80_000;
        for _ in 0..64 {
            avg = moving_average(avg, 800);
        }
        assert!(avg < 900, "{avg}");
    }

    fn fake_function(root: &Path, name: &str, vendor: &str, device: &str) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
        d
    }

    #[test]
    fn finds_the_function_by_id() {
        let dir = tempfile::tempdir().unwrap();
        fake_function(dir.path(), "0000:00:01.0", "0x1af4", "0x1042");
        let want = fake_function(dir.path(), "0000:00:03.0", "0x1af4", "0x1110");
        fake_function(dir.path(), "0000:00:00.0", "0x1b36", "0x0008");
        assert_eq!(find(dir.path()).unwrap(), want);
        let empty = tempfile::tempdir().unwrap();
        let e = find(empty.path()).unwrap_err();
        assert!(e.to_string().contains("1af4:1110"), "{e}");
    }

    #[test]
    fn bar_ranges_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let d = fake_function(dir.path(), "f", "0x1af4", "0x1110");
        std::fs::write(
            d.join("resource"),
            "0x00000000c0001000 0x00000000c0001fff 0x0000000000040200\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000000100000000 0x0000000103ffffff 0x000000000014220c\n",
        )
        .unwrap();
        assert_eq!(bar_range(&d, 0).unwrap(), (0xc000_1000, 0x1000));
        assert_eq!(bar_range(&d, 2).unwrap(), (0x1_0000_0000, 64 << 20));
        assert!(bar_range(&d, 1).is_err(), "unassigned");
        assert!(bar_range(&d, 5).is_err(), "absent");
    }

    #[test]
    fn mapping_names() {
        assert_eq!("devmem".parse::<RegionMapping>(), Ok(RegionMapping::DevMem));
        assert!("uncached".parse::<RegionMapping>().is_err());
    }
}
