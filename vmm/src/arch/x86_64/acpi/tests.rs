//! The tables read back: the fixed tables by a small independent parser
//! (signatures, lengths, checksums, pointers), the DSDT by the `aml` crate's
//! interpreter (an AML implementation that is not ours).

use super::*;

fn platform() -> Platform {
    Platform {
        vcpus: 2,
        mmio64_start: 1 << 32,
    }
}

/// The tables as the guest sees them: memory from the ACPI area.
struct Image {
    mem: Vec<u8>,
}

impl Image {
    fn new(t: &Tables) -> Self {
        let mut mem = vec![0u8; (layout::HIGH_RAM_START - layout::ACPI_START) as usize];
        for (addr, b) in &t.blobs {
            let off = (addr - layout::ACPI_START) as usize;
            mem[off..off + b.len()].copy_from_slice(b);
        }
        Self { mem }
    }
    fn at(&self, addr: u64, len: usize) -> &[u8] {
        let off = (addr - layout::ACPI_START) as usize;
        &self.mem[off..off + len]
    }
    fn u32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(self.at(addr, 4).try_into().unwrap())
    }
    fn u64(&self, addr: u64) -> u64 {
        u64::from_le_bytes(self.at(addr, 8).try_into().unwrap())
    }
    /// A table at `addr`: its signature checked, its checksum verified.
    fn table(&self, addr: u64, signature: &[u8; 4]) -> &[u8] {
        assert_eq!(self.at(addr, 4), signature);
        let len = self.u32(addr + 4) as usize;
        let t = self.at(addr, len);
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(signature));
        t
    }
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn tables_by_signature(img: &Image, rsdp: u64) -> Vec<(String, u64)> {
    // RSDP: signature, both checksums, revision 2, XSDT pointer.
    let r = img.at(rsdp, 36);
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0);
    assert_eq!(sum(r), 0);
    assert_eq!(r[15], 2);
    let xsdt_addr = img.u64(rsdp + 24);
    let xsdt = img.table(xsdt_addr, b"XSDT");
    (36..xsdt.len())
        .step_by(8)
        .map(|o| {
            let a = u64::from_le_bytes(xsdt[o..o + 8].try_into().unwrap());
            (String::from_utf8_lossy(img.at(a, 4)).into_owned(), a)
        })
        .collect()
}

#[test]
fn fixed_tables_parse_back() {
    let t = build(platform()).unwrap();
    assert_eq!(t.rsdp(), layout::ACPI_START);
    let img = Image::new(&t);
    let list = tables_by_signature(&img, t.rsdp());
    let names: Vec<&str> = list.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, ["FACP", "APIC", "MCFG"]);

    // FADT: hardware-reduced, reset register supported, our ports.
    let fadt = img.table(list[0].1, b"FACP");
    let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // RESET_REG (GAS at 116): system I/O, the reset port; value at 128.
    assert_eq!(fadt[116], 1);
    assert_eq!(
        u64::from_le_bytes(fadt[120..128].try_into().unwrap()),
        ports::ACPI_RESET as u64
    );
    assert_eq!(fadt[128], ports::ACPI_RESET_VALUE);
    // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
    assert_eq!(
        u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
        ports::ACPI_SLEEP_CONTROL as u64
    );
    assert_eq!(
        u64::from_le_bytes(fadt[260..268].try_into().unwrap()),
        ports::ACPI_SLEEP_STATUS as u64
    );
    let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
    img.table(x_dsdt, b"DSDT");

    // MADT: one enabled local APIC per vCPU, then the IO-APIC.
    let madt = img.table(list[1].1, b"APIC");
    assert_eq!(
        u32::from_le_bytes(madt[36..40].try_into().unwrap()),
        layout::APIC_START as u32
    );
    let mut o = 44;
    let (mut lapics, mut ioapics) = (vec![], vec![]);
    while o < madt.len() {
        let (kind, len) = (madt[o], madt[o + 1] as usize);
        match kind {
            0 => lapics.push((madt[o + 3], madt[o + 4] & 1)),
            1 => ioapics.push(u32::from_le_bytes(madt[o + 4..o + 8].try_into().unwrap())),
            k => panic!("unexpected MADT entry {k}"),
        }
        o += len;
    }
    assert_eq!(lapics, vec![(0, 1), (1, 1)]);
    assert_eq!(ioapics, vec![layout::IOAPIC_START as u32]);

    // MCFG: one allocation, segment 0, bus 0..0, at the ECAM base.
    let mcfg = img.table(list[2].1, b"MCFG");
    assert_eq!(mcfg.len(), 44 + 16);
    assert_eq!(
        u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
        layout::PCI_ECAM_START
    );
    assert_eq!((mcfg[54], mcfg[55]), (0, 0));
}

/// Disassembles `table` with ACPICA's `iasl` (the AML implementation Linux
/// uses), failing loudly where it is not installed.
fn iasl_disassemble(name: &str, table: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.dat"));
    std::fs::write(&path, table).unwrap();
    let out = std::process::Command::new("iasl")
        .arg("-d")
        .arg(&path)
        .output()
        .expect("these tests need ACPICA's iasl: apt-get install acpica-tools");
    assert!(
        out.status.success(),
        "iasl -d {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(path.with_extension("dsl")).unwrap()
}

/// Evaluates `paths` in the DSDT with ACPICA's `acpiexec`.
fn acpiexec(dsdt: &[u8], paths: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dsdt.aml");
    std::fs::write(&path, dsdt).unwrap();
    let script: Vec<String> = paths.iter().map(|p| format!("evaluate {p}")).collect();
    let out = std::process::Command::new("acpiexec")
        .arg("-b")
        .arg(script.join("; "))
        .arg(&path)
        .output()
        .expect("these tests need ACPICA's acpiexec: apt-get install acpica-tools");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "acpiexec: {text}");
    text
}

fn blob<'a>(t: &'a Tables, sig: &[u8; 4]) -> &'a [u8] {
    &t.blobs.iter().find(|(_, b)| &b[..4] == sig).unwrap().1
}

/// Drops ASL comments and collapses whitespace, so multi-line ASL compares
/// as one line.
fn squash(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, after)| after);
        } else if let Some(r) = rest.strip_prefix("//") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn acpica_reads_the_fixed_tables() {
    let t = build(platform()).unwrap();
    let fadt = squash(&iasl_disassemble("facp", blob(&t, b"FACP")));
    for needle in [
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "Address : 0000000000000602",
        "Value to cause reset : 01",
        "Address : 0000000000000600",
        "Address : 0000000000000601",
    ] {
        assert!(fadt.contains(needle), "FADT lacks {needle:?}:\n{fadt}");
    }
    let madt = squash(&iasl_disassemble("apic", blob(&t, b"APIC")));
    assert_eq!(
        madt.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        2
    );
    assert!(madt.contains("Address : FEC00000"), "{madt}");
    let mcfg = squash(&iasl_disassemble("mcfg", blob(&t, b"MCFG")));
    assert!(mcfg.contains("Base Address : 00000000E0000000"), "{mcfg}");
    assert!(
        !format!("{fadt}{madt}{mcfg}").contains("Invalid"),
        "ACPICA complained"
    );
}

#[test]
fn acpica_evaluates_the_dsdt() {
    let t = build(platform()).unwrap();
    let dsdt = blob(&t, b"DSDT");
    let asl = squash(&iasl_disassemble("dsdt", dsdt));
    for needle in [
        "Name (_S5, Package (0x04) { 0x05, Zero, Zero, Zero })",
        "EisaId (\"PNP0A08\")",
        "EisaId (\"PNP0501\")",
        "Name (_HID, \"QEMU0001\")",
        "IO (Decode16, 0x0505, 0x0505, 0x01, 0x01, )",
        "0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000,",
        "0x0000000100000000, 0x00000010FFFFFFFF,",
        "Memory32Fixed (ReadOnly, 0xE0000000, 0x00100000, )",
        "Package (0x04) { 0x0001FFFF, Zero, Zero, 0x11 }",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }",
    ] {
        assert!(asl.contains(needle), "DSDT lacks {needle:?}:\n{asl}");
    }
    // The routing table, evaluated: 31 slots × 4 pins, INTA# of each slot on
    // the line the VMM wires it to.
    let out = squash(&acpiexec(dsdt, &["\\_SB.PCI0._PRT"]));
    assert!(out.contains("[Package] Contains 124 Elements"), "{out}");
    for slot in [1u8, 7, 8, 31] {
        let entry = format!(
            "[Integer] = {:016X} [Integer] = 0000000000000000 [Integer] = 0000000000000000 [Integer] = {:016X}",
            (u64::from(slot) << 16) | 0xffff,
            layout::pci_intx_gsi(slot)
        );
        assert!(out.contains(&entry), "slot {slot}: {entry} not in {out}");
    }
}
