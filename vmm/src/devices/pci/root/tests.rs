//! The root with a test function: enumeration over 0xcf8/0xcfc and ECAM,
//! BAR sizing, and BARs following the guest's programming on the MMIO bus.

use super::*;
use crate::devices::pci::config::{Bar, BarKind, COMMAND_MEMORY};

struct TestFn {
    config: ConfigSpace,
    moves: Vec<(usize, Option<u64>, Option<u64>)>,
    last_write: Option<(usize, u64, Vec<u8>)>,
}

impl PciDevice for TestFn {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(bar as u8 + offset as u8);
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.last_write = Some((bar, offset, data.to_vec()));
    }
    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        self.moves.push((bar, old, new));
    }
}

fn test_fn() -> Arc<Mutex<TestFn>> {
    let mut config = ConfigSpace::new(Header {
        vendor: 0x1af4,
        device: 0x1044,
        revision: 1,
        class: 0xff_00,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
        interrupt_pin: 1,
    });
    config
        .add_bar(
            0,
            Bar {
                size: 0x8000,
                kind: BarKind::Mem32,
                prefetchable: false,
            },
            0xc000_0000,
        )
        .unwrap();
    config
        .add_bar(
            2,
            Bar {
                size: 1 << 20,
                kind: BarKind::Mem64,
                prefetchable: true,
            },
            0x1_0000_0000,
        )
        .unwrap();
    config.write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
    Arc::new(Mutex::new(TestFn {
        config,
        moves: vec![],
        last_write: None,
    }))
}

struct Machine {
    mmio: Arc<Bus>,
    io: PciConfigIo,
    ecam: PciConfigMmio,
    dev: Arc<Mutex<TestFn>>,
}

fn machine() -> Machine {
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(Mutex::new(PciRoot::new(&mmio)));
    let dev = test_fn();
    assert_eq!(lock(&root).add(dev.clone()).unwrap(), 1);
    Machine {
        mmio,
        io: PciConfigIo(root.clone()),
        ecam: PciConfigMmio(root),
        dev,
    }
}

fn cfg_read(m: &Machine, slot: u8, reg: u32) -> u32 {
    m.io.write(
        0,
        &(0x8000_0000 | u32::from(slot) << 11 | reg).to_le_bytes(),
    );
    let mut d = [0u8; 4];
    m.io.read(4, &mut d);
    u32::from_le_bytes(d)
}

fn cfg_write(m: &Machine, slot: u8, reg: u32, v: u32) {
    m.io.write(
        0,
        &(0x8000_0000 | u32::from(slot) << 11 | reg).to_le_bytes(),
    );
    m.io.write(4, &v.to_le_bytes());
}

#[test]
fn enumeration_over_cf8() {
    let m = machine();
    // Host bridge at 00:00.0, our function at 00:01.0, nothing else.
    assert_eq!(cfg_read(&m, 0, 0), 0x0008_1b36);
    assert_eq!(cfg_read(&m, 0, 8) >> 8, 0x06_00_00);
    assert_eq!(cfg_read(&m, 1, 0), 0x1044_1af4);
    assert_eq!(cfg_read(&m, 2, 0), u32::MAX);
    assert_eq!(cfg_read(&m, 31, 0), u32::MAX);
    // Function 1 of a present slot does not exist.
    m.io.write(0, &(0x8000_0000u32 | 1 << 11 | 1 << 8).to_le_bytes());
    let mut d = [0u8; 2];
    m.io.read(4, &mut d);
    assert_eq!(d, [0xff, 0xff]);
    // The enable bit is required, and the latch reads back.
    m.io.write(0, &0x0000_0800u32.to_le_bytes());
    let mut d = [0u8; 4];
    m.io.read(4, &mut d);
    assert_eq!(u32::from_le_bytes(d), u32::MAX);
    m.io.read(0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x0000_0800);
    // Byte and word reads at offsets inside the data port.
    m.io.write(0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
    let mut w = [0u8; 2];
    m.io.read(6, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x1044);
}

#[test]
fn ecam_matches_cf8() {
    let m = machine();
    for (slot, r) in [(0u8, 0u32), (1, 0), (1, 8), (1, 0x10), (1, 0x2c), (3, 0)] {
        let mut d = [0u8; 4];
        m.ecam.read(u64::from(slot) << 15 | u64::from(r), &mut d);
        assert_eq!(
            u32::from_le_bytes(d),
            cfg_read(&m, slot, r),
            "slot {slot} reg {r:#x}"
        );
    }
    let mut d = [0u8; 4];
    m.ecam.read(1 << 15 | 0x100, &mut d);
    assert_eq!(d, [0; 4], "no extended space");
}

#[test]
fn bar_sizing_and_relocation() {
    let m = machine();
    let mut d = [0u8; 4];
    assert!(m.mmio.read(0xc000_0010, &mut d));
    assert_eq!(d, [0x10; 4]);
    // Linux sizes with decoding off: the BAR leaves the bus meanwhile.
    cfg_write(&m, 1, 4, 0);
    assert!(!m.mmio.read(0xc000_0000, &mut d));
    cfg_write(&m, 1, 0x10, u32::MAX);
    assert_eq!(cfg_read(&m, 1, 0x10), 0xffff_8000);
    cfg_write(&m, 1, 0x18, u32::MAX);
    cfg_write(&m, 1, 0x1c, u32::MAX);
    assert_eq!(cfg_read(&m, 1, 0x18), 0xfff0_000c);
    assert_eq!(cfg_read(&m, 1, 0x1c), u32::MAX);
    // New addresses, decoding back on: the device answers there only.
    cfg_write(&m, 1, 0x10, 0xd000_0000);
    cfg_write(&m, 1, 0x18, 0);
    cfg_write(&m, 1, 0x1c, 0x2);
    cfg_write(&m, 1, 4, u32::from(COMMAND_MEMORY));
    assert!(!m.mmio.read(0xc000_0000, &mut d));
    assert!(m.mmio.read(0xd000_0004, &mut d));
    assert_eq!(d, [4; 4]);
    assert!(m.mmio.write(0x2_0000_0008, &[9]));
    assert_eq!(lock(&m.dev).last_write, Some((2, 8, vec![9])));
    let moves = lock(&m.dev).moves.clone();
    assert!(moves.contains(&(0, Some(0xc000_0000), None)));
    assert!(moves.contains(&(0, None, Some(0xd000_0000))));
    assert!(moves.contains(&(2, None, Some(0x2_0000_0000))));
}

#[test]
fn overlapping_bar_is_left_unmapped() {
    let m = machine();
    // Something else already sits where the guest moves BAR 0.
    struct Other;
    impl BusDevice for Other {
        fn read(&self, _: u64, d: &mut [u8]) {
            d.fill(0xee)
        }
        fn write(&self, _: u64, _: &[u8]) {}
    }
    m.mmio.insert(Arc::new(Other), 0xd000_0000, 0x1000).unwrap();
    cfg_write(&m, 1, 0x10, 0xd000_0000);
    let mut d = [0u8; 1];
    assert!(m.mmio.read(0xd000_0000, &mut d));
    assert_eq!(d, [0xee], "the other device keeps its range");
    assert!(!m.mmio.read(0xc000_0000, &mut d), "and the BAR is nowhere");
}

#[test]
fn a_refused_bar_is_placed_once_its_range_frees_up() {
    // Two functions; the guest moves the second's BAR 0 onto the first's,
    // then moves the first away: the second appears where it asked to be.
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(Mutex::new(PciRoot::new(&mmio)));
    let a = test_fn();
    let b = test_fn();
    {
        let mut bc = lock(&b);
        bc.config.write(reg::BAR0, &0xc100_0000u32.to_le_bytes());
        bc.config.write(reg::BAR0 + 8, &0u32.to_le_bytes());
        bc.config.write(reg::BAR0 + 12, &0x3u32.to_le_bytes());
    }
    lock(&root).add(a.clone()).unwrap();
    lock(&root).add(b.clone()).unwrap();
    let io = PciConfigIo(root.clone());
    let cfg = |slot: u32, reg: u32, v: u32| {
        io.write(0, &(0x8000_0000 | slot << 11 | reg).to_le_bytes());
        io.write(4, &v.to_le_bytes());
    };
    cfg(2, 0x10, 0xc000_0000);
    let mut d = [0u8; 4];
    assert!(mmio.read(0xc000_0000, &mut d));
    assert!(
        !mmio.read(0xc100_0000, &mut d),
        "slot 2's BAR is unmapped while refused"
    );
    cfg(1, 0x10, 0xd000_0000);
    assert!(
        mmio.read(0xc000_0000, &mut d),
        "slot 2's BAR took the freed range"
    );
    assert!(mmio.read(0xd000_0000, &mut d));
}

#[test]
fn the_root_does_not_keep_the_bus_alive() {
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(Mutex::new(PciRoot::new(&mmio)));
    let dev = test_fn();
    lock(&root).add(dev.clone()).unwrap();
    mmio.insert(Arc::new(PciConfigMmio(root.clone())), 0xe000_0000, 1 << 20)
        .unwrap();
    let weak_dev = Arc::downgrade(&dev);
    drop((root, dev));
    drop(mmio);
    assert!(
        weak_dev.upgrade().is_none(),
        "the bus/root cycle kept the device alive"
    );
}
