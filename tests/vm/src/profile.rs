//! Boot profiles: where a nested guest's boot spends its wall-clock time.
//!
//! `testhost profile-boot` runs `scenarios/profile-boot-l1.sh`: our VMM boots
//! the bench's guest with `P2PVMM_GUEST_PROFILE` (where the vCPU is every
//! 4 ms: guest kernel, guest user, or the VMM handling an exit; halts
//! included), after one boot that dumps the guest kernel's text symbols. This module reads both back from the console and
//! names each sample's function. The guest's own clock cannot do this: it
//! loses ticks while the emulated vCPU is busy.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Read as _;

use anyhow::{Context, Result, bail};
use base64::Engine as _;

use crate::scenario::Scenario;

/// The scenario: `runs` profiled boots with `cmdline` (the bench's if none).
pub fn scenario(runs: u32, cmdline: Option<&str>) -> Scenario {
    let mut s = Scenario::new(
        "profile-boot",
        include_str!("../scenarios/profile-boot-l1.sh"),
    )
    .l2_init(include_str!("../scenarios/profile-boot-l2.sh"))
    .env("RUNS", runs.to_string())
    .timeout(std::time::Duration::from_secs(300 + 60 * u64::from(runs)));
    if let Some(c) = cmdline {
        s = s.env("CMDLINE", c);
    }
    s
}

/// Where x86-64 Linux maps its image: physical address + this. The first
/// instructions of a PVH boot run at physical addresses, before the kernel
/// switches to its own page tables.
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// No function is longer: a sample further than this above the nearest
/// symbol is not in any function the dump knows.
const MAX_FUNCTION_BYTES: u64 = 1 << 20;

/// A kernel's text symbols, sorted by address.
#[derive(Debug, Default)]
pub struct Symbols {
    sorted: Vec<(u64, String)>,
}

impl Symbols {
    /// Parses `/proc/kallsyms` lines (`address type name [module]`); keeps
    /// text symbols.
    pub fn parse(text: &str) -> Self {
        let mut sorted: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                matches!(kind, "t" | "T").then(|| (addr, name.to_string()))
            })
            .collect();
        sorted.sort();
        Self { sorted }
    }

    /// How many symbols.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The function a sample is in: for kernel mode, the nearest symbol at
    /// or below `rip` (a lower-half `rip` is the early boot's physical
    /// address of kernel code), or the address itself where no symbol is
    /// near; "[user]" and "[vmm]" for the other modes.
    pub fn name(&self, rip: u64, mode: Mode) -> String {
        match mode {
            Mode::User => return "[user]".into(),
            Mode::Vmm => return "[vmm]".into(),
            Mode::Kernel => {}
        }
        let addr = if rip < 1 << 47 {
            rip.wrapping_add(KERNEL_MAP)
        } else {
            rip
        };
        let i = self.sorted.partition_point(|(a, _)| *a <= addr);
        match i.checked_sub(1).map(|i| &self.sorted[i]) {
            Some((start, name)) if addr - start < MAX_FUNCTION_BYTES => name.clone(),
            _ => format!("{rip:#x}"),
        }
    }
}

pub use vmm::vstate::profile::{Mode, Sample};

/// One profiled boot.
#[derive(Debug, Clone, PartialEq)]
pub struct Boot {
    /// Which run.
    pub run: u32,
    /// Its samples, in order.
    pub samples: Vec<Sample>,
}

/// Reads the symbol dump (`P2PVM-KSYM` lines: gzip, base64) and the samples
/// (`P2PVM-PROF run ms vcpu rip k|u|v`) from a console.
pub fn parse_console(console: &str) -> Result<(Symbols, Vec<Boot>)> {
    let mut b64 = String::new();
    let mut boots: BTreeMap<u32, Vec<Sample>> = BTreeMap::new();
    for line in console.lines() {
        if let Some(rest) = after(line, "P2PVM-KSYM ") {
            b64.push_str(rest.trim());
        } else if let Some(rest) = after(line, "P2PVM-PROF ") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let [run, ms, vcpu, rip, mode] = f[..] else {
                bail!("malformed sample line {line:?}");
            };
            let sample = Sample::from_fields([ms, vcpu, rip, mode])
                .with_context(|| format!("malformed sample line {line:?}"))?;
            boots.entry(run.parse()?).or_default().push(sample);
        }
    }
    if b64.is_empty() {
        bail!("the console holds no symbol dump");
    }
    let gz = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .context("the symbol dump is not base64")?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .context("the symbol dump is not gzip'd text")?;
    let symbols = Symbols::parse(&text);
    let boots = boots
        .into_iter()
        .map(|(run, samples)| Boot { run, samples })
        .collect();
    Ok((symbols, boots))
}

/// The text after `marker` in a console line (which may carry prefixes).
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// A report: per boot, the functions holding the most samples (with the
/// vCPU time they stand for), then a timeline of `window_ms` windows across
/// all boots, each with its three commonest functions.
pub fn report(symbols: &Symbols, boots: &[Boot], top: usize, window_ms: u32) -> String {
    let mut out = String::new();
    let mut windows: BTreeMap<u32, HashMap<String, u32>> = BTreeMap::new();
    for b in boots {
        let Some(last_ms) = b.samples.last().map(|s| s.ms) else {
            continue;
        };
        let n = b.samples.len();
        let vcpus = b
            .samples
            .iter()
            .map(|s| s.vcpu)
            .max()
            .map_or(1, |m| u32::from(m) + 1);
        let _ = writeln!(
            out,
            "boot {}: {n} samples of {vcpus} vCPU(s) over {last_ms} ms",
            b.run
        );
        // Each sample stands for an equal slice of all vCPUs' time.
        let ms_per_sample = f64::from(last_ms) * f64::from(vcpus) / n as f64;
        let mut counts: HashMap<String, u32> = HashMap::new();
        for s in &b.samples {
            let name = symbols.name(s.rip, s.mode);
            *windows
                .entry(s.ms / window_ms.max(1))
                .or_default()
                .entry(name.clone())
                .or_default() += 1;
            *counts.entry(name).or_default() += 1;
        }
        for (name, k) in ranked(counts).into_iter().take(top) {
            let _ = writeln!(
                out,
                "  {:5.1} %  {:5.0} ms  {name}",
                100.0 * f64::from(k) / n as f64,
                f64::from(k) * ms_per_sample
            );
        }
    }
    let _ = writeln!(out, "timeline, all boots, {window_ms} ms windows:");
    for (w, counts) in windows {
        let names: Vec<String> = ranked(counts)
            .into_iter()
            .take(3)
            .map(|(n, k)| format!("{n} {k}"))
            .collect();
        let _ = writeln!(out, "  {:6} ms  {}", w * window_ms, names.join(", "));
    }
    out
}

/// Most samples first; ties by name, so the report is stable.
fn ranked(counts: HashMap<String, u32>) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    const KALLSYMS: &str = "\
ffffffff81000000 T startup_64
ffffffff81000100 t early_helper
ffffffff82000000 D some_data
ffffffff81100000 T clear_bss
ffffffffc0000000 t vblk_probe\t[virtio_blk]
";

    #[test]
    fn a_sample_is_named_by_the_nearest_text_symbol_at_or_below_it() {
        let s = Symbols::parse(KALLSYMS);
        assert_eq!(s.len(), 4, "data symbols are left out");
        let k = Mode::Kernel;
        assert_eq!(s.name(0xffff_ffff_8100_0000, k), "startup_64");
        assert_eq!(s.name(0xffff_ffff_8100_00ff, k), "startup_64");
        assert_eq!(s.name(0xffff_ffff_8100_0100, k), "early_helper");
        assert_eq!(s.name(0xffff_ffff_8110_0042, k), "clear_bss");
        assert_eq!(s.name(0xffff_ffff_c000_0010, k), "vblk_probe");
        // The PVH entry runs at the image's physical address.
        assert_eq!(s.name(0x100_0010, k), "startup_64");
        assert_eq!(s.name(0x100_0010, Mode::User), "[user]");
        assert_eq!(s.name(0, Mode::Vmm), "[vmm]");
        // Further from any symbol than a function can be long (here in the
        // data above the text), below the first, or in no kernel at all.
        assert_eq!(s.name(0xffff_ffff_8220_0010, k), "0xffffffff82200010");
        assert_eq!(s.name(0xffff_8000_0000_0000, k), "0xffff800000000000");
        assert_eq!(s.name(0x1000, k), "0x1000");
    }

    fn console_with(symbols: &str, samples: &[&str]) -> String {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(symbols.as_bytes()).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
        let mut console = String::from("P2PVM-L1-READY kvm=yes\n");
        // Split like `base64` does, with the testhost's line prefix.
        for chunk in b64.as_bytes().chunks(76) {
            let _ = writeln!(
                console,
                "profile-boot| P2PVM-KSYM {}",
                std::str::from_utf8(chunk).unwrap()
            );
        }
        for s in samples {
            let _ = writeln!(console, "profile-boot| P2PVM-PROF {s}");
        }
        console
    }

    #[test]
    fn the_console_gives_back_symbols_and_samples_per_boot() {
        let console = console_with(
            KALLSYMS,
            &[
                "1 0 0 0xffffffff81100004 k",
                "1 4 0 0xffffffff81100008 k",
                "1 8 0 0x1000010 k",
                "2 0 0 0x40f2ea u",
                "2 0 1 0x0 v",
                "2 4 1 0xffffffff81100004 k",
            ],
        );
        let (symbols, boots) = parse_console(&console).unwrap();
        assert_eq!(symbols.len(), 4);
        assert_eq!(boots.len(), 2);
        assert_eq!(boots[0].samples.len(), 3);
        let user = Sample {
            ms: 0,
            vcpu: 0,
            rip: 0x40_f2ea,
            mode: Mode::User,
        };
        assert_eq!(boots[1].samples[0], user);
        assert_eq!(boots[1].samples[1].mode, Mode::Vmm);
        assert_eq!(boots[1].samples[1].vcpu, 1);
        let text = report(&symbols, &boots, 5, 4);
        // Two of boot 1's three samples in clear_bss: 66.7 % of its 8 ms.
        assert!(text.contains(" 66.7 %      5 ms  clear_bss"), "{text}");
        assert!(text.contains(" 33.3 %      3 ms  startup_64"), "{text}");
        assert!(
            text.contains("       0 ms  [user] 1, [vmm] 1, clear_bss 1"),
            "{text}"
        );
        assert!(text.contains("       8 ms  startup_64 1"), "{text}");
        // Boot 2 had two vCPUs over 4 ms: each of its three samples stands
        // for 8 / 3 ms of vCPU time.
        assert!(
            text.contains("boot 2: 3 samples of 2 vCPU(s) over 4 ms"),
            "{text}"
        );
        assert!(text.contains(" 33.3 %      3 ms  [vmm]"), "{text}");
    }

    #[test]
    fn a_console_without_a_dump_or_with_a_torn_sample_is_an_error() {
        assert!(parse_console("P2PVM-PROF 1 0 0 0x1 k\n").is_err());
        let torn = console_with(KALLSYMS, &["1 0 0xffffffff81100004 k"]);
        let err = parse_console(&torn).unwrap_err().to_string();
        assert!(err.contains("malformed sample line"), "{err}");
        let no_mode = console_with(KALLSYMS, &["1 0 0 0xffffffff81100004 x"]);
        let err = parse_console(&no_mode).unwrap_err().to_string();
        assert!(err.contains("malformed sample line"), "{err}");
        let corrupt = "P2PVM-KSYM !!!not-base64\n";
        assert!(parse_console(corrupt).is_err());
    }
}
