//! The boot sequence, top to bottom: a VM with its memory, the legacy
//! devices and the PCI root, the virtio devices, the kernel with its boot
//! structures and ACPI tables, and the vCPUs.
//!
//! [`build`] does all of it from a [`VmConfig`]; tests that run small
//! hand-written guests use [`MachineBuilder`]'s steps directly.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::Kvm;
use p2pvm_channel::pci::REGISTER_BAR_SIZE;
use p2pvm_channel::{Grant, Side};
use vm_allocator::{AddressAllocator, AllocPolicy};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{self, ports};
use crate::arch::x86_64::regs::EntryMode;
use crate::arch::x86_64::{acpi, boot, loader};
use crate::config::{VmConfig, derived_mac, parse_mac};
use crate::console::{Console, ConsoleOut, ConsoleServer};
use crate::devices::VmOps;
use crate::devices::bus::{Bus, lock};
use crate::devices::channel::ChannelDevice;
use crate::devices::legacy::acpi_pm::AcpiPm;
use crate::devices::legacy::boot_marker::BootMarker;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::pvpanic::PvPanic;
use crate::devices::legacy::rtc::Rtc;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::pci::root::{PciConfigIo, PciConfigMmio, PciHandle, PciRoot};
use crate::devices::virtio::transport::{BAR0_SIZE, VirtioPci};
use crate::devices::virtio::{VirtioBackend, blk::Block, net::Net, rng::Rng};
use crate::lifecycle::{BootTimes, ExitSignal};
use crate::vstate::memory::{self, GuestRam};
use crate::vstate::profile::GuestProfile;
use crate::vstate::vcpu::{ExitCounts, Vcpu, VcpuShared};
use crate::vstate::vm::Vm;

/// Subscribers of the device thread's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `/dev/kvm` is unusable.
    #[error(transparent)]
    Kvm(#[from] crate::vstate::kvm::KvmError),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The kernel, initramfs or command line could not be loaded.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// Boot structures could not be written.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// A device could not be created.
    #[error("Device {what}")]
    Device {
        /// Which device.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

fn device_err(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> BuildError {
    let what = what.into();
    move |source| BuildError::Device { what, source }
}

/// A built VM, ready to run.
pub struct Machine {
    /// The KVM VM.
    pub vm: Arc<Vm>,
    /// Its RAM (kept alive while the VM runs).
    pub ram: GuestRam,
    /// Configured vCPUs.
    pub vcpus: Vec<Vcpu>,
    /// The device thread's event loop.
    pub events: EventManager<Subscriber>,
    /// The run's end.
    pub exit: Arc<ExitSignal>,
    /// Exit counters.
    pub counts: Arc<ExitCounts>,
    /// Each device's counters, by the name its figures carry.
    pub devices: Vec<(String, Arc<crate::metrics::DeviceStats>)>,
    /// Boot milestones.
    pub boot: Arc<BootTimes>,
    /// The guest profile, if sampled (`P2PVMM_GUEST_PROFILE`).
    pub profile: Option<Arc<GuestProfile>>,
    /// Port bus (tests poke devices through it).
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

/// The steps of building a machine.
pub struct MachineBuilder {
    kvm: Kvm,
    vm: Arc<Vm>,
    ram: GuestRam,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    root: Arc<Mutex<PciRoot>>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    subscribers: Vec<Subscriber>,
    exit: Arc<ExitSignal>,
    counts: Arc<ExitCounts>,
    devices: Vec<(String, Arc<crate::metrics::DeviceStats>)>,
    boot: Arc<BootTimes>,
    profile: Option<Arc<GuestProfile>>,
    vcpu_count: u8,
}

impl std::fmt::Debug for MachineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineBuilder").finish_non_exhaustive()
    }
}

impl MachineBuilder {
    /// A VM with `mem_mib` MiB of RAM, `vcpus` vCPUs to come, the PCI root
    /// and its configuration mechanisms in place.
    pub fn new(mem_mib: u64, vcpus: u8, boot: Arc<BootTimes>) -> Result<Self, BuildError> {
        let kvm = crate::vstate::kvm::open()?;
        let vm = Arc::new(Vm::new(&kvm)?);
        let ram = memory::create(mem_mib << 20)?;
        vm.register_memory(&ram)?;
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(&mmio)));
        let err = |e: vm_allocator::Error| BuildError::Device {
            what: "MMIO allocator".into(),
            source: Box::new(e),
        };
        let mmio32 = AddressAllocator::new(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE)
            .map_err(err)?;
        let mmio64 = AddressAllocator::new(
            layout::pci_mmio64_start(mem_mib << 20),
            layout::PCI_MMIO64_SIZE,
        )
        .map_err(err)?;
        let b = Self {
            kvm,
            vm,
            ram,
            pio,
            mmio,
            root,
            mmio32,
            mmio64,
            subscribers: Vec::new(),
            exit: Arc::new(ExitSignal::new().map_err(|e| device_err("exit eventfd")(Box::new(e)))?),
            counts: Arc::new(ExitCounts::new()),
            devices: Vec::new(),
            boot,
            profile: None,
            vcpu_count: vcpus,
        };
        b.insert_pio(
            Arc::new(PciConfigIo(b.root.clone())),
            ports::PCI_CONFIG_ADDRESS,
            8,
            "PCI config ports",
        )?;
        b.mmio
            .insert(
                Arc::new(PciConfigMmio(b.root.clone())),
                layout::PCI_ECAM_START,
                layout::PCI_ECAM_SIZE,
            )
            .map_err(|e| device_err("ECAM")(Box::new(e)))?;
        Ok(b)
    }

    /// Guest memory.
    pub fn memory(&self) -> &vm_memory::GuestMemoryMmap {
        &self.ram.memory
    }

    /// The run's exit signal.
    pub fn exit(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    fn insert_pio(
        &self,
        dev: Arc<dyn crate::devices::bus::BusDevice>,
        port: u16,
        len: u64,
        what: &str,
    ) -> Result<(), BuildError> {
        self.pio
            .insert(dev, u64::from(port), len)
            .map_err(|e| device_err(what)(Box::new(e)))
    }

    /// The PC devices: COM1 printing to `console` (served on `listener` when
    /// given), CMOS RTC, i8042 reset, ACPI power management, pvpanic and the
    /// boot-marker port.
    pub fn add_legacy_devices(
        &mut self,
        console: Arc<Console>,
        listener: Option<UnixListener>,
    ) -> Result<(), BuildError> {
        let mk = |what: &'static str| move |e: std::io::Error| device_err(what)(Box::new(e));
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(mk("serial irq"))?;
        self.vm
            .register_irqfd(&irq, ports::COM1_IRQ)
            .map_err(mk("serial irq"))?;
        let input_room =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(mk("serial input"))?;
        let room_for_server = input_room.try_clone().map_err(mk("serial input"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            input_room,
            Box::new(ConsoleOut(console.clone())),
        )));
        self.insert_pio(serial.clone(), ports::COM1, 8, "COM1")?;
        if let Some(listener) = listener {
            let server = ConsoleServer::new(console, listener, serial, room_for_server)
                .map_err(mk("console socket"))?;
            self.subscribers.push(Arc::new(Mutex::new(server)));
        }
        self.insert_pio(Arc::new(Mutex::new(Rtc::default())), ports::RTC, 2, "RTC")?;
        self.insert_pio(
            Arc::new(Mutex::new(I8042::new(self.exit.clone()))),
            ports::I8042_DATA,
            5,
            "i8042",
        )?;
        self.insert_pio(
            Arc::new(Mutex::new(AcpiPm::new(self.exit.clone()))),
            ports::ACPI_PM,
            3,
            "ACPI PM",
        )?;
        self.insert_pio(
            Arc::new(Mutex::new(PvPanic::new(self.exit.clone()))),
            ports::PVPANIC,
            1,
            "pvpanic",
        )?;
        self.insert_pio(
            Arc::new(Mutex::new(BootMarker(self.boot.clone()))),
            ports::BOOT_MARKER,
            1,
            "boot marker",
        )?;
        Ok(())
    }

    /// Adds a virtio device in the next PCI slot; returns the slot.
    pub fn add_virtio<B: VirtioBackend>(
        &mut self,
        backend: B,
        what: &str,
    ) -> Result<u8, BuildError> {
        let bar = self
            .mmio32
            .allocate(BAR0_SIZE, BAR0_SIZE, AllocPolicy::FirstMatch)
            .map_err(|e| device_err(what)(Box::new(e)))?;
        let slot = self.free_slot(what)?;
        let vm: Arc<dyn VmOps> = self.vm.clone();
        let dev = VirtioPci::new(
            backend,
            self.ram.memory.clone(),
            vm,
            bar.start(),
            layout::pci_intx_gsi(slot),
        )
        .map_err(|e| device_err(what)(Box::new(e)))?;
        self.devices.push((what.to_owned(), dev.stats()));
        let dev = Arc::new(Mutex::new(dev));
        let handle: PciHandle = dev.clone();
        let placed = lock(&self.root)
            .add(handle)
            .map_err(|e| device_err(what)(Box::new(e)))?;
        debug_assert_eq!(placed, slot);
        self.subscribers.push(dev);
        tracing::debug!(
            what,
            slot,
            bar = format_args!("{:#x}", bar.start()),
            "PCI device"
        );
        Ok(slot)
    }

    /// The next free PCI slot for device `what`.
    fn free_slot(&self, what: &str) -> Result<u8, BuildError> {
        lock(&self.root)
            .next_slot()
            .ok_or_else(|| device_err(what)("no free PCI slot".into()))
    }

    /// Adds the inter-VM channel's function for `side`, wired to the
    /// region and event channels of `grant`; returns the slot.
    pub fn add_channel(&mut self, grant: Grant, side: Side) -> Result<u8, BuildError> {
        let what = "channel device";
        let len = grant
            .region
            .metadata()
            .map_err(|e| device_err(what)(Box::new(e)))?
            .len();
        let bar0 = self
            .mmio32
            .allocate(
                REGISTER_BAR_SIZE,
                REGISTER_BAR_SIZE,
                AllocPolicy::FirstMatch,
            )
            .map_err(|e| device_err(what)(Box::new(e)))?;
        let bar2 = self
            .mmio64
            .allocate(len.max(0x1000), len.max(0x1000), AllocPolicy::FirstMatch)
            .map_err(|e| device_err(what)(Box::new(e)))?;
        let slot = self.free_slot(what)?;
        let vm: Arc<dyn VmOps> = self.vm.clone();
        let dev = ChannelDevice::new(
            grant,
            side,
            vm,
            bar0.start(),
            bar2.start(),
            layout::pci_intx_gsi(slot),
        )
        .map_err(|e| device_err(what)(Box::new(e)))?;
        let dev = Arc::new(Mutex::new(dev));
        let handle: PciHandle = dev.clone();
        lock(&self.root)
            .add(handle)
            .map_err(|e| device_err(what)(Box::new(e)))?;
        self.subscribers.push(dev);
        tracing::debug!(
            slot,
            ?side,
            region = format_args!("{:#x}+{len:#x}", bar2.start()),
            "channel device"
        );
        Ok(slot)
    }

    /// Loads the kernel, initramfs and command line, writes the ACPI tables
    /// and the boot structure; returns how the boot vCPU enters.
    pub fn load_linux(
        &mut self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
    ) -> Result<EntryMode, BuildError> {
        let mem = &self.ram.memory;
        let loaded = loader::load_kernel(mem, kernel)?;
        let cmdline_size = loader::load_cmdline(mem, cmdline)?;
        let low_ram_end = layout::ram_ranges(self.ram.size)[0].1;
        let initrd = match initrd {
            Some(path) => {
                let addr_max = match loaded.kind {
                    loader::KernelKind::Linux64 { header, .. } if header.initrd_addr_max != 0 => {
                        u64::from(header.initrd_addr_max)
                    }
                    _ => u64::MAX,
                };
                Some(loader::load_initrd(
                    mem,
                    path,
                    low_ram_end,
                    loaded.kernel_end,
                    addr_max,
                )?)
            }
            None => None,
        };
        let tables = acpi::build(acpi::Platform {
            vcpus: self.vcpu_count,
            mmio64_start: layout::pci_mmio64_start(self.ram.size),
        })?;
        acpi::write(mem, &tables)?;
        boot::write_reset_stub(mem).map_err(|e| device_err("reset vector")(Box::new(e)))?;
        let e820 = boot::e820_map(self.ram.size);
        let boot_struct = match loaded.kind {
            loader::KernelKind::Pvh { .. } => {
                boot::write_pvh(mem, &e820, layout::CMDLINE_START, initrd, tables.rsdp())?
            }
            loader::KernelKind::Linux64 { header, .. } => boot::write_zero_page(
                mem,
                header,
                &e820,
                layout::CMDLINE_START,
                cmdline_size,
                initrd,
                tables.rsdp(),
            )?,
        };
        Ok(loaded.kind.entry_mode(boot_struct))
    }

    /// Puts `code` at `at` for a vCPU entering it in flat 32-bit protected
    /// mode (the PVH entry state, without a start info): for small
    /// hand-written guests.
    pub fn load_raw(&mut self, code: &[u8], at: u64) -> Result<EntryMode, BuildError> {
        use vm_memory::{Bytes, GuestAddress};
        self.ram
            .memory
            .write_slice(code, GuestAddress(at))
            .map_err(|e| device_err("raw guest code")(Box::new(e)))?;
        Ok(EntryMode::Pvh {
            entry: at,
            start_info: 0,
        })
    }

    /// Samples where the vCPUs are into `profile` while the machine runs.
    pub fn profile_guest(&mut self, profile: Arc<GuestProfile>) {
        self.profile = Some(profile);
    }

    /// Creates the vCPUs; the first enters at `entry`.
    pub fn finish(self, entry: EntryMode) -> Result<Machine, BuildError> {
        let shared = VcpuShared {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exit: self.exit.clone(),
            counts: self.counts.clone(),
            profile: self.profile.clone(),
        };
        let mut vcpus = Vec::with_capacity(self.vcpu_count as usize);
        for id in 0..self.vcpu_count {
            let e = (id == 0).then_some(entry);
            vcpus.push(Vcpu::new(
                &self.kvm,
                &self.vm,
                id,
                self.vcpu_count,
                &self.ram.memory,
                e,
                shared.clone(),
            )?);
        }
        let mut events = EventManager::new().map_err(|e| {
            device_err("event loop")(Box::new(std::io::Error::other(format!("{e:?}"))))
        })?;
        for s in self.subscribers {
            events.add_subscriber(s);
        }
        Ok(Machine {
            vm: self.vm,
            ram: self.ram,
            vcpus,
            events,
            exit: self.exit,
            counts: self.counts,
            devices: self.devices,
            boot: self.boot,
            profile: self.profile,
            pio: self.pio,
            mmio: self.mmio,
        })
    }
}

/// Builds the VM `config` describes; `profile`: sample its vCPUs into it.
pub fn build(
    config: &VmConfig,
    console: Arc<Console>,
    listener: Option<UnixListener>,
    boot: Arc<BootTimes>,
    profile: Option<Arc<GuestProfile>>,
) -> Result<Machine, BuildError> {
    config.validate()?;
    let t = std::time::Instant::now();
    let step = |what: &str| tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "build: {what}");
    let mut b = MachineBuilder::new(config.mem_mib, config.vcpus, boot)?;
    if let Some(p) = profile {
        b.profile_guest(p);
    }
    step("VM and memory");
    b.add_legacy_devices(console, listener)?;
    for (i, d) in config.disks.iter().enumerate() {
        let what = format!("disk {}", d.path.display());
        let blk = Block::open(&d.path, d.read_only).map_err(|e| device_err(&what)(Box::new(e)))?;
        b.add_virtio(blk, &format!("virtio-blk {i}"))?;
    }
    for n in &config.nets {
        let mac = match &n.mac {
            Some(m) => parse_mac(m)?,
            None => derived_mac(&config.name, &n.tap),
        };
        let tap: File = crate::devices::virtio::net::tap::open(&n.tap)
            .map_err(|e| device_err(format!("TAP {}", n.tap))(Box::new(e)))?;
        let what = format!("virtio-net {}", n.tap);
        let mut net = Net::new(tap, mac);
        if n.moderation {
            net = net
                .with_moderation()
                .map_err(|e| device_err(&what)(Box::new(e)))?;
        }
        b.add_virtio(net, &what)?;
    }
    if config.rng {
        b.add_virtio(Rng::default(), "virtio-rng")?;
    }
    if let Some(ch) = &config.channel {
        let broker = ch
            .broker
            .as_deref()
            .ok_or_else(|| device_err("channel device")("no broker socket given".into()))?;
        let grant = p2pvm_channel::receive(broker, ch.side.into())
            .map_err(|e| device_err(format!("channel broker {}", broker.display()))(Box::new(e)))?;
        b.add_channel(grant, ch.side.into())?;
    }
    step("devices");
    let entry = b.load_linux(&config.kernel, config.initrd.as_deref(), &config.cmdline)?;
    step("kernel loaded");
    let m = b.finish(entry)?;
    step("vCPUs");
    Ok(m)
}
