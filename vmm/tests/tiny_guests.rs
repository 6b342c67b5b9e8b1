//! Tiny guests on this host's own `/dev/kvm`: the real KVM API (VM, vCPU,
//! in-kernel IO-APIC and LAPIC, ioeventfd, irqfd, MSI routing) with our
//! devices, driven by a few hundred instructions of guest code built here.
//!
//! These machines' `/dev/kvm` is the PVM software hypervisor: it emulates
//! ring-0 guest code (about a microsecond per instruction), which is plenty
//! for guests this small, and it cannot run Linux (the nested tests do that).
//!
//! The guest is a little interpreter of "driver steps" (MMIO and port reads
//! and writes, waiting for an interrupt) that the test writes into guest
//! memory, so each test reads as the driver sequence it performs. The guest
//! records what it read; the test checks it after the guest powers off
//! through the ACPI sleep register.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::builder::MachineBuilder;
use vmm::console::Console;
use vmm::devices::virtio::rng::Rng;
use vmm::lifecycle::{BootTimes, ExitReason};
use vmm::runner::{self, NoSetup};
use vmm::vstate::profile::{GuestProfile, Mode};

const CODE: u64 = 0x1_0000;
const STEPS: u64 = 0x3_0000;
const RESULTS: u64 = 0x4_0000;
const IRQ_COUNT: u64 = 0x4_1000;
const IDT: u64 = 0x4_2000;
const IDTR: u64 = 0x4_3000;
const STACK_TOP: u32 = 0xf000;
/// Vector the tests' MSI-X messages use.
const VECTOR: u8 = 0x40;
const BAR0: u32 = 0xc000_0000;
const LAPIC: u32 = 0xfee0_0000;

/// One driver step.
#[derive(Clone, Copy, Debug)]
enum Step {
    Mmio32(u32, u32),
    Mmio16(u32, u16),
    Mmio8(u32, u8),
    ReadMmio32(u32),
    Out32(u16, u32),
    In32(u16),
    Out8(u16, u8),
    /// Enable interrupts, halt until one arrived, record how many did.
    WaitIrq,
}

impl Step {
    fn encode(self) -> [u32; 3] {
        match self {
            Step::Mmio32(a, v) => [1, a, v],
            Step::Mmio16(a, v) => [2, a, u32::from(v)],
            Step::Mmio8(a, v) => [3, a, u32::from(v)],
            Step::ReadMmio32(a) => [4, a, 0],
            Step::Out32(p, v) => [5, u32::from(p), v],
            Step::In32(p) => [6, u32::from(p), 0],
            Step::Out8(p, v) => [7, u32::from(p), u32::from(v)],
            Step::WaitIrq => [8, 0, 0],
        }
    }
}

/// The interpreter, assembled at [`CODE`].
struct Program {
    code: Vec<u8>,
    /// The interrupt handler's address.
    handler: u64,
    /// Where a vCPU waiting for an interrupt is: the wait loop's addresses.
    waiting: std::ops::Range<u64>,
}

fn guest_program() -> Program {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut next = a.create_label();
    let mut done = a.create_label();
    let mut handler = a.create_label();
    let mut ops: Vec<CodeLabel> = (0..9).map(|_| a.create_label()).collect();
    let mut wait_loop = a.create_label();
    let mut got_irq = a.create_label();

    a.mov(esp, STACK_TOP).unwrap();
    a.lidt(ptr(IDTR as u32)).unwrap();
    a.mov(esi, STEPS as u32).unwrap();
    a.mov(edi, RESULTS as u32).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(eax, dword_ptr(esi)).unwrap();
    a.mov(edx, dword_ptr(esi + 4)).unwrap();
    a.mov(ecx, dword_ptr(esi + 8)).unwrap();
    a.add(esi, 12).unwrap();
    a.cmp(eax, 0).unwrap();
    a.je(done).unwrap();
    for (kind, label) in ops.iter().enumerate().skip(1) {
        a.cmp(eax, kind as u32).unwrap();
        a.je(*label).unwrap();
    }
    a.jmp(next).unwrap();
    // 1..3: MMIO writes.
    a.set_label(&mut ops[1]).unwrap();
    a.mov(dword_ptr(edx), ecx).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut ops[2]).unwrap();
    a.mov(word_ptr(edx), cx).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut ops[3]).unwrap();
    a.mov(byte_ptr(edx), cl).unwrap();
    a.jmp(next).unwrap();
    // 4: MMIO read, recorded.
    a.set_label(&mut ops[4]).unwrap();
    a.mov(eax, dword_ptr(edx)).unwrap();
    a.mov(dword_ptr(edi), eax).unwrap();
    a.add(edi, 4).unwrap();
    a.jmp(next).unwrap();
    // 5: out dword.
    a.set_label(&mut ops[5]).unwrap();
    a.mov(eax, ecx).unwrap();
    a.out(dx, eax).unwrap();
    a.jmp(next).unwrap();
    // 6: in dword, recorded.
    a.set_label(&mut ops[6]).unwrap();
    a.in_(eax, dx).unwrap();
    a.mov(dword_ptr(edi), eax).unwrap();
    a.add(edi, 4).unwrap();
    a.jmp(next).unwrap();
    // 7: out byte.
    a.set_label(&mut ops[7]).unwrap();
    a.mov(eax, ecx).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(next).unwrap();
    // 8: wait for an interrupt. `sti; hlt` cannot lose a wakeup: interrupts
    // are only taken after the instruction following `sti`.
    a.set_label(&mut ops[8]).unwrap();
    a.nop().unwrap();
    a.set_label(&mut wait_loop).unwrap();
    a.cli().unwrap();
    a.cmp(dword_ptr(IRQ_COUNT as u32), 0).unwrap();
    a.jne(got_irq).unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.jmp(wait_loop).unwrap();
    a.set_label(&mut got_irq).unwrap();
    a.mov(eax, dword_ptr(IRQ_COUNT as u32)).unwrap();
    a.mov(dword_ptr(edi), eax).unwrap();
    a.add(edi, 4).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut done).unwrap();
    a.hlt().unwrap();
    a.jmp(done).unwrap();
    // The interrupt handler: count, EOI the local APIC, and go on with the
    // next step instead of returning. Interrupts only arrive in the wait
    // loop, and PVM's instruction emulator cannot execute `iretd`, so the
    // handler drops the frame (EIP, CS, EFLAGS) and jumps.
    a.set_label(&mut handler).unwrap();
    a.inc(dword_ptr(IRQ_COUNT as u32)).unwrap();
    a.mov(dword_ptr(LAPIC + 0xb0), 0u32).unwrap();
    a.add(esp, 12).unwrap();
    a.jmp(got_irq).unwrap();

    let r = a
        .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    Program {
        handler: r.label_ip(&handler).unwrap(),
        waiting: r.label_ip(&wait_loop).unwrap()..r.label_ip(&got_irq).unwrap(),
        code: r.inner.code_buffer,
    }
}

/// Writes the program, an IDT whose every vector goes to the handler, and
/// the steps, with a power-off appended.
fn load(mem: &GuestMemoryMmap, steps: &[Step]) -> Vec<u8> {
    let Program { code, handler, .. } = guest_program();
    for v in 0..256u64 {
        // 32-bit interrupt gate, selector 8 (the boot code segment).
        let gate: u64 = (handler & 0xffff) | (8 << 16) | (0x8e00 << 32) | ((handler >> 16) << 48);
        mem.write_obj(gate, GuestAddress(IDT + v * 8)).unwrap();
    }
    mem.write_obj(0x7ffu16, GuestAddress(IDTR)).unwrap();
    mem.write_obj(IDT as u32, GuestAddress(IDTR + 2)).unwrap();
    let mut all = steps.to_vec();
    // Power off: SLP_TYP = 5, SLP_EN.
    all.push(Step::Out8(0x600, (5 << 2) | (1 << 5)));
    for (i, s) in all.iter().enumerate() {
        for (j, w) in s.encode().iter().enumerate() {
            mem.write_obj(*w, GuestAddress(STEPS + i as u64 * 12 + j as u64 * 4))
                .unwrap();
        }
    }
    mem.write_obj([0u32; 3], GuestAddress(STEPS + all.len() as u64 * 12))
        .unwrap();
    code
}

struct Run {
    mem: GuestMemoryMmap,
    reason: ExitReason,
}

impl Run {
    fn result(&self, i: u64) -> u32 {
        self.mem.read_obj(GuestAddress(RESULTS + 4 * i)).unwrap()
    }
}

fn kvm_or_explain() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED: tiny guests need /dev/kvm, and this host has none");
    false
}

/// Builds a machine (legacy devices, a virtio-rng at 00:01.0 with BAR 0 at
/// 0xc000_0000), runs `steps`, and returns guest memory after power-off.
fn run(
    steps: &[Step],
    prepare: impl FnOnce(&GuestMemoryMmap),
    listener: Option<std::os::unix::net::UnixListener>,
) -> Run {
    run_with(
        steps,
        prepare,
        listener,
        Arc::new(NoSetup),
        Extras::default(),
    )
}

/// What some tests add to a run.
#[derive(Default)]
struct Extras {
    /// Sample the vCPU into this profile.
    profile: Option<Arc<GuestProfile>>,
    /// Stop the VM after this long (instead of waiting for its power-off).
    stop_after: Option<Duration>,
}

/// [`run`] with the vCPU and device threads set up by `setup` (seccomp).
fn run_with(
    steps: &[Step],
    prepare: impl FnOnce(&GuestMemoryMmap),
    listener: Option<std::os::unix::net::UnixListener>,
    setup: Arc<dyn vmm::runner::ThreadSetup>,
    extras: Extras,
) -> Run {
    vmm::vstate::vcpu::install_kick_handler().unwrap();
    let boot = Arc::new(BootTimes::new(Instant::now()));
    let console = Console::new(None, false, boot.clone()).unwrap();
    let mut b = MachineBuilder::new(64, 1, boot).expect("a VM on /dev/kvm");
    b.add_legacy_devices(console, listener).unwrap();
    assert_eq!(b.add_virtio(Rng::default(), "virtio-rng").unwrap(), 1);
    let mem = b.memory().clone();
    let code = load(&mem, steps);
    prepare(&mem);
    let entry = b.load_raw(&code, CODE).unwrap();
    if let Some(p) = extras.profile {
        b.profile_guest(p);
    }
    let machine = b.finish(entry).unwrap();
    let exit = machine.exit.clone();
    // A guest that never powers off must not hang the test.
    let watchdog = std::thread::spawn(move || {
        let limit = extras.stop_after.unwrap_or(Duration::from_secs(120));
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && !exit.stopping() {
            std::thread::sleep(Duration::from_millis(10));
        }
        exit.request(match extras.stop_after {
            Some(_) => ExitReason::Stopped,
            None => ExitReason::Error("test watchdog: the guest did not power off in 120 s".into()),
        });
    });
    let vm = Arc::downgrade(&machine.vm);
    let outcome = runner::run(machine, setup, None, None).unwrap();
    watchdog.join().unwrap();
    // Everything of the machine is gone once it ran: a guest that resets in
    // a loop must not pile up VMs (the KVM VM fd, devices, RAM mappings).
    assert!(vm.upgrade().is_none(), "the VM outlived its run");
    Run {
        mem,
        reason: outcome.reason,
    }
}

fn cf8(slot: u32, reg: u32) -> u32 {
    0x8000_0000 | slot << 11 | reg
}

#[test]
fn pci_enumeration_and_bar_sizing_over_cf8() {
    if !kvm_or_explain() {
        return;
    }
    let steps = [
        // Vendor/device of slots 0..3.
        Step::Out32(0xcf8, cf8(0, 0)),
        Step::In32(0xcfc),
        Step::Out32(0xcf8, cf8(1, 0)),
        Step::In32(0xcfc),
        Step::Out32(0xcf8, cf8(2, 0)),
        Step::In32(0xcfc),
        Step::Out32(0xcf8, cf8(3, 0)),
        Step::In32(0xcfc),
        // Class of 00:01.0.
        Step::Out32(0xcf8, cf8(1, 8)),
        Step::In32(0xcfc),
        // Size BAR 0 of 00:01.0 with decoding off, as Linux does, then put it back.
        Step::Out32(0xcf8, cf8(1, 4)),
        Step::Out32(0xcfc, 0),
        Step::Out32(0xcf8, cf8(1, 0x10)),
        Step::Out32(0xcfc, 0xffff_ffff),
        Step::In32(0xcfc),
        Step::Out32(0xcfc, BAR0),
        Step::In32(0xcfc),
        Step::Out32(0xcf8, cf8(1, 4)),
        Step::Out32(0xcfc, 0x2),
        // With decoding back on, the device answers at its BAR:
        // virtio common config, num_queues (offset 0x12) and status.
        Step::ReadMmio32(BAR0 + 0x10),
    ];
    let r = run(&steps, |_| {}, None);
    assert_eq!(r.reason, ExitReason::PowerOff);
    assert_eq!(r.result(0), 0x0008_1b36, "host bridge at 00:00.0");
    assert_eq!(r.result(1), 0x1044_1af4, "virtio-rng at 00:01.0");
    assert_eq!(r.result(2), 0xffff_ffff, "nothing at 00:02.0");
    assert_eq!(r.result(3), 0xffff_ffff, "nothing at 00:03.0");
    assert_eq!(r.result(4) >> 8, 0xff_00_00, "class");
    assert_eq!(
        r.result(5),
        0xffff_8000,
        "BAR 0 decodes 32 KiB, 32-bit memory"
    );
    assert_eq!(r.result(6), BAR0);
    assert_eq!(r.result(7) >> 16, 1, "one queue behind the BAR");
}

#[test]
fn virtio_rng_queue_completes_with_its_msix_interrupt() {
    if !kvm_or_explain() {
        return;
    }
    const DESC: u32 = 0x5_0000;
    const AVAIL: u32 = 0x5_1000;
    const USED: u32 = 0x5_2000;
    const BUF: u64 = 0x6_0000;
    let common = |off: u32| BAR0 + off;
    let msix_entry = BAR0 + 0x4000 + 16;
    let steps = [
        // Bus master on; MSI-X on (message control's enable bit via the dword at 0x40).
        Step::Out32(0xcf8, cf8(1, 4)),
        Step::Out32(0xcfc, 0x6),
        Step::Out32(0xcf8, cf8(1, 0x40)),
        Step::Out32(0xcfc, 0x8000_0000),
        // Vector 1 (queue 0) → this CPU's LAPIC, vector 0x40, unmasked.
        Step::Mmio32(msix_entry, LAPIC),
        Step::Mmio32(msix_entry + 4, 0),
        Step::Mmio32(msix_entry + 8, u32::from(VECTOR)),
        Step::Mmio32(msix_entry + 12, 0),
        // The local APIC on (spurious vector register, software enable).
        Step::Mmio32(LAPIC + 0xf0, 0x1ff),
        // virtio: ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK.
        Step::Mmio8(common(0x14), 1),
        Step::Mmio8(common(0x14), 3),
        Step::Mmio32(common(0x08), 1),
        Step::Mmio32(common(0x0c), 1),
        Step::Mmio8(common(0x14), 0xb),
        // Queue 0: 16 entries, vector 1, rings, enable; DRIVER_OK.
        Step::Mmio16(common(0x16), 0),
        Step::Mmio16(common(0x18), 16),
        Step::Mmio16(common(0x1a), 1),
        Step::Mmio32(common(0x20), DESC),
        Step::Mmio32(common(0x24), 0),
        Step::Mmio32(common(0x28), AVAIL),
        Step::Mmio32(common(0x2c), 0),
        Step::Mmio32(common(0x30), USED),
        Step::Mmio32(common(0x34), 0),
        Step::Mmio16(common(0x1c), 1),
        Step::Mmio8(common(0x14), 0xf),
        // Kick queue 0 (its notify address: ioeventfd, no exit), wait.
        Step::Mmio16(BAR0 + 0x3000, 0),
        Step::WaitIrq,
        Step::ReadMmio32(common(0x14)),
    ];
    // With the production seccomp filters, and a 64 KiB request: the device
    // thread's allocations then grow its malloc arena (mprotect), which a
    // filter without it would answer by killing this process.
    let filters = vmm::seccomp::Filters::new(vmm::seccomp::Mode::Enforce).unwrap();
    let r = run_with(
        &steps,
        |mem| {
            // One 64 KiB device-writable buffer made available.
            let desc: [u8; 16] = {
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&BUF.to_le_bytes());
                d[8..12].copy_from_slice(&65536u32.to_le_bytes());
                d[12..14].copy_from_slice(&2u16.to_le_bytes()); // VRING_DESC_F_WRITE
                d
            };
            mem.write_slice(&desc, GuestAddress(DESC.into())).unwrap();
            mem.write_obj(0u16, GuestAddress(u64::from(AVAIL) + 4))
                .unwrap();
            mem.write_obj(1u16, GuestAddress(u64::from(AVAIL) + 2))
                .unwrap();
        },
        None,
        Arc::new(filters),
        Extras::default(),
    );
    assert_eq!(r.reason, ExitReason::PowerOff);
    assert!(r.result(0) >= 1, "the guest took the queue's interrupt");
    assert_eq!(
        r.result(1) & 0xff,
        0xf,
        "device status DRIVER_OK, no NEEDS_RESET"
    );
    let used_idx: u16 = r.mem.read_obj(GuestAddress(u64::from(USED) + 2)).unwrap();
    let used_len: u32 = r.mem.read_obj(GuestAddress(u64::from(USED) + 8)).unwrap();
    assert_eq!(
        (used_idx, used_len),
        (1, 65536),
        "the buffer came back full"
    );
    let mut bytes = vec![0u8; 65536];
    r.mem.read_slice(&mut bytes, GuestAddress(BUF)).unwrap();
    assert!(
        bytes.iter().filter(|b| **b != 0).count() > 60_000,
        "random bytes"
    );
}

#[test]
fn serial_output_reaches_the_console_socket() {
    if !kvm_or_explain() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("console.sock");
    let text = b"tiny guest says hello\r\n";
    let steps: Vec<Step> = text.iter().map(|b| Step::Out8(0x3f8, *b)).collect();
    // Connected before the guest runs (the server accepts it from its
    // backlog), so nothing printed can be missed.
    let listener = vmm::console::bind(&sock).unwrap();
    let mut client = UnixStream::connect(&sock).unwrap();
    let reader = std::thread::spawn(move || {
        client
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"hello\r\n") {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let r = run(&steps, |_| {}, Some(listener));
    assert_eq!(r.reason, ExitReason::PowerOff);
    let got = reader.join().unwrap();
    assert_eq!(got, text);
}

#[test]
fn the_guest_profile_samples_where_the_vcpu_waits() {
    if !kvm_or_explain() {
        return;
    }
    // The guest waits for an interrupt that never comes; the profile must
    // find it, over and over, in its wait loop and nowhere else.
    let dir = tempfile::tempdir().unwrap();
    let profile = Arc::new(GuestProfile::new(dir.path().join("profile")));
    // Under the production filters: the vCPU thread reads its registers.
    let filters = vmm::seccomp::Filters::new(vmm::seccomp::Mode::Enforce).unwrap();
    let r = run_with(
        &[Step::WaitIrq],
        |_| {},
        None,
        Arc::new(filters),
        Extras {
            profile: Some(profile.clone()),
            stop_after: Some(Duration::from_millis(600)),
        },
    );
    assert_eq!(r.reason, ExitReason::Stopped);
    let waiting = guest_program().waiting;
    let samples = profile.samples();
    // 250 Hz for 0.6 s is 150; a loaded machine delivers fewer kicks.
    assert!(samples.len() >= 10, "only {} samples", samples.len());
    let late: Vec<_> = samples.iter().filter(|s| s.ms >= 300).collect();
    assert!(!late.is_empty(), "no samples after 300 ms: {samples:?}");
    for s in late {
        assert_eq!(s.vcpu, 0);
        assert_eq!(s.mode, Mode::Kernel, "the tiny guest runs at CPL 0");
        assert!(
            waiting.contains(&s.rip),
            "sampled at {:#x}, the wait loop is {waiting:x?}",
            s.rip
        );
    }
    let written = std::fs::read_to_string(profile.path()).unwrap();
    assert_eq!(written.lines().count(), samples.len());
}
