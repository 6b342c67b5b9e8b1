//! Debian's Linux kernel under our VMM (`p2pvmm run`), for real: in the
//! nested test host here (emulated AMD SVM, a real `/dev/kvm` in L1), or
//! directly where the host has hardware virtualization. Scenario scripts are
//! in `tests/vm/scenarios/`.

use p2pvm_testhost::vmm_bin::{iproute2, p2pvmm_release};
use p2pvm_testhost::{Outcome, Scenario, TestHost};

fn run(scenario: Scenario) -> Outcome {
    p2pvm_testhost::init_tracing();
    let host =
        TestHost::prepare().expect("the test host (see tests/vm/README.md for what it needs)");
    // A test host that froze (QEMU's emulator; docs/vm-mode.md) is caught
    // in a minute by its heartbeat going quiet, and gets one more run,
    // loudly; a guest or VMM that hangs runs into the total limit instead,
    // and fails the test.
    let scenario = scenario
        .heartbeat(std::time::Duration::from_secs(10))
        .silence_timeout(std::time::Duration::from_secs(60));
    let outcome = p2pvm_testhost::run_once_more_if_the_bench_failed(&host, &scenario)
        .expect("the scenario ran to its end");
    outcome.ensure_success().expect("the L1 script succeeded");
    outcome
}

fn get<'a>(o: &'a Outcome, key: &str) -> &'a str {
    o.result(key)
        .unwrap_or_else(|| panic!("no result {key}; console tail:\n{}", o.tail()))
}

#[test]
fn linux_powers_off_reboots_panics_runs_smp_and_boots_bzimage() {
    p2pvm_testhost::init_tracing();
    let bzimage = TestHost::prepare().unwrap().kernel().bzimage();
    let o = run(Scenario::new(
        "vmm-lifecycle",
        include_str!("../scenarios/lifecycle-l1.sh"),
    )
    .l2_init(include_str!("../scenarios/lifecycle-l2.sh"))
    .p2pvmm(p2pvmm_release().unwrap())
    .file("/guest/vmlinuz", bzimage));
    // poweroff in the guest: p2pvmm exits 0, and it saw /init.
    assert_eq!(get(&o, "poweroff_exit"), "0");
    assert_eq!(get(&o, "poweroff_reason"), "poweroff");
    let init_ms: f64 = get(&o, "init_ms").parse().unwrap();
    assert!(init_ms > 0.0 && init_ms < 60_000.0, "init at {init_ms} ms");
    let overhead_kib: u64 = get(&o, "overhead_kib").parse().unwrap();
    assert!(overhead_kib > 0, "memory overhead measured");
    // reboot: the same process boots it again; the second boot powers off.
    assert_eq!(get(&o, "reboot_exit"), "0");
    assert_eq!(get(&o, "reboot_boots"), "2");
    assert_eq!(get(&o, "reboot_reason"), "poweroff");
    // A kernel panic (sysrq-c) is reported as one, exit status 3.
    assert_eq!(get(&o, "panic_exit"), "3");
    assert_eq!(get(&o, "panic_reason"), "panic");
    assert_eq!(get(&o, "panic_reported"), "yes");
    // Two vCPUs: the guest brought the second one up and uses both.
    assert_eq!(get(&o, "smp_exit"), "0");
    assert_eq!(get(&o, "smp_cpus"), "2");
    // The CMOS RTC gave the guest this host's time (it sets its clock from it).
    let skew: i64 = get(&o, "rtc_skew_s").parse().unwrap();
    assert!(skew.abs() <= 10, "guest clock {skew} s off");
    // The compressed bzImage boots through the 64-bit boot protocol.
    assert_eq!(get(&o, "bzimage_exit"), "0");
    let bz_init_ms: f64 = get(&o, "bzimage_init_ms").parse().unwrap();
    assert!(bz_init_ms > 0.0, "the bzImage guest reached /init");
}

#[test]
fn linux_uses_disk_network_entropy_and_console() {
    let o = run(
        Scenario::new("vmm-devices", include_str!("../scenarios/devices-l1.sh"))
            .l2_init(include_str!("../scenarios/devices-l2.sh"))
            .p2pvmm(p2pvmm_release().unwrap())
            .binary("/opt/ip", iproute2().unwrap()),
    );
    // virtio-blk: the guest read the disk we made, byte for byte; what it
    // wrote and fsynced is in the image file; a new VM reads it back.
    let disk = get(&o, "disk_sum");
    assert_eq!(disk.len(), 64);
    assert_eq!(get(&o, "l2_disk_sum"), disk);
    assert_eq!(get(&o, "blkwrite_exit"), "0");
    let written = get(&o, "written_sum");
    assert_eq!(written.len(), 64);
    assert_eq!(get(&o, "on_disk_sum"), written);
    assert_eq!(get(&o, "reread_sum"), written);
    // With MSI off in the guest, virtio-pci works on its level-triggered INTx
    // line: same bytes, interrupts taken through the IO-APIC.
    assert_eq!(get(&o, "intx_exit"), "0");
    assert_eq!(get(&o, "intx_sum"), written);
    assert_eq!(get(&o, "intx_lines"), "1");
    let intx: u64 = get(&o, "intx_count").parse().unwrap();
    assert!(intx > 0, "no interrupt arrived on the INTx line");
    // While the guest used its devices, the threads that touch guest data ran
    // under their seccomp filters; the main thread (which rebuilds the VM at a
    // reset) does not.
    assert_eq!(get(&o, "seccomp_vcpu0"), "2");
    assert_eq!(get(&o, "seccomp_devices"), "2");
    assert_eq!(get(&o, "seccomp_p2pvmm"), "0");
    // virtio-rng: 4 KiB from /dev/hwrng.
    assert_eq!(get(&o, "rng_bytes"), "4096");
    // virtio-net: 16 MiB each way over TCP through the TAP, intact.
    assert_eq!(get(&o, "l2_down_sum"), get(&o, "down_sum"));
    assert_eq!(get(&o, "up_sum_host"), get(&o, "up_sum_guest"));
    assert_eq!(get(&o, "up_sum_host").len(), 64);
    // The console socket: two attaches in a row, each answered, the VM
    // running in between; `poweroff -f` typed into it ends the VM with 0.
    assert_eq!(get(&o, "console_first"), "answered");
    assert_eq!(get(&o, "console_second"), "answered");
    assert_eq!(get(&o, "vm_alive_after_detach"), "yes");
    assert_eq!(get(&o, "net_exit"), "0");
}

#[test]
fn up_runs_each_vm_in_its_own_process_and_supervises_them() {
    let o = run(Scenario::new(
        "vmm-supervisor",
        include_str!("../scenarios/supervisor-l1.sh"),
    )
    .l2_init(include_str!("../scenarios/supervisor-l2.sh"))
    .p2pvmm(p2pvmm_release().unwrap()));
    for key in [
        "alpha_booted",
        "beta_booted",
        // Two VMs, two p2pvmm processes, neither the supervisor; each maps
        // only its own guest RAM.
        "own_processes",
        // SIGKILL of one VM's process: started again, the other untouched.
        "alpha_restarted",
        "beta_untouched",
        // A guest that powers off stays off.
        "beta_off",
        "beta_stays_off",
        // SIGTERM to `up` stops the rest.
        "alpha_stopped",
    ] {
        assert_eq!(get(&o, key), "yes", "{key}");
    }
    assert_eq!(get(&o, "alpha_guest_maps"), "1");
    assert_eq!(get(&o, "beta_guest_maps"), "1");
    assert_eq!(get(&o, "up_exit"), "0");
}

#[test]
fn a_boot_profile_names_where_the_guest_kernel_spends_its_time() {
    use p2pvm_testhost::profile::Mode;
    let o = run(p2pvm_testhost::profile::scenario(1, None).p2pvmm(p2pvmm_release().unwrap()));
    let (symbols, boots) = p2pvm_testhost::profile::parse_console(&o.console).unwrap();
    assert!(
        symbols.len() > 10_000,
        "{} kernel text symbols",
        symbols.len()
    );
    assert_eq!(boots.len(), 1);
    let samples = &boots[0].samples;
    // 250 Hz over a boot of seconds; a loaded test host delivers fewer.
    assert!(samples.len() >= 100, "only {} samples", samples.len());
    let names: Vec<String> = samples
        .iter()
        .map(|s| symbols.name(s.rip, s.mode))
        .collect();
    // Every sample in the guest kernel falls within a function of the dump.
    let unnamed: Vec<&String> = names.iter().filter(|n| n.starts_with("0x")).collect();
    assert!(
        unnamed.is_empty(),
        "samples outside the kernel's text: {unnamed:?}"
    );
    // And in the right ones: functions every boot of this kernel spends tens
    // of milliseconds in. Samples read against the wrong symbols (a shifted
    // base, another kernel) would name a scatter of others instead.
    let known = [
        "clear_bss",
        "text_poke_early",
        "__text_poke",
        "free_reserved_area",
        "mpihelp_submul_1",
        "ptdump_pte_entry",
    ];
    let found: Vec<&&str> = known
        .iter()
        .filter(|k| names.iter().any(|n| n == *k))
        .collect();
    assert!(found.len() >= 3, "of {known:?} only {found:?} sampled");
    // The boot starts in the kernel and ends in user space (/init).
    assert_eq!(samples[0].mode, Mode::Kernel);
    assert!(
        samples.iter().any(|s| s.mode == Mode::User),
        "no sample after /init"
    );
    let text = p2pvm_testhost::profile::report(&symbols, &boots, 10, 200);
    assert!(text.starts_with("boot 1: "), "{text}");
    println!("{text}");
}
