//! The test host, for real: L1 boots under QEMU TCG with emulated SVM (or the host runs the
//! script directly when it has hardware KVM), and QEMU boots the L2 guest inside it.
//! These tests fail, rather than skip, when the test host cannot be prepared: the error
//! names the Debian package to install. They take about a minute on two cores and run one
//! at a time.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use p2pvm_testhost::{
    Limit, RunnerKind, Scenario, TestHost, WatchdogError, init_tracing, scenarios,
};

/// Nested runs are CPU-bound: one at a time keeps timings meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

fn host() -> (MutexGuard<'static, ()>, TestHost) {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let host =
        TestHost::prepare().unwrap_or_else(|e| panic!("cannot prepare the test host: {e:#}"));
    (guard, host)
}

#[test]
fn qemu_boots_the_guest_inside_the_test_host() {
    let (_serial, host) = host();
    let outcome = host
        .run(&scenarios::qemu_l2_boot())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ready = outcome
        .l1_ready
        .as_ref()
        .unwrap_or_else(|| panic!("no P2PVM-L1-READY line:\n{}", outcome.tail()));
    assert!(
        ready.kvm,
        "the test host had no /dev/kvm:\n{}",
        outcome.tail()
    );
    outcome.ensure_success().unwrap();
    assert_eq!(outcome.result("vmm"), Some("qemu"));
    let init_s = outcome.result_f64("init_s").unwrap();
    let l2_uptime_s = outcome.result_f64("l2_uptime_s").unwrap();
    eprintln!(
        "runner {}: L1 ready at {:?} s, QEMU start -> L2 init {init_s} s (L2 uptime {l2_uptime_s} s), wall {:.1} s",
        outcome.runner,
        ready.uptime_s,
        outcome.wall.as_secs_f64()
    );
    assert!(
        init_s > 0.2 && init_s < 200.0,
        "implausible init_s {init_s}"
    );
    assert!(
        l2_uptime_s > 0.05 && l2_uptime_s < init_s,
        "implausible l2_uptime_s {l2_uptime_s} (init_s {init_s})"
    );
    if outcome.runner == RunnerKind::Nested {
        let l1_up = ready.uptime_s.expect("L1 uptime");
        assert!(
            l1_up > 0.1 && l1_up < 120.0,
            "implausible L1 uptime {l1_up}"
        );
    }
}

#[test]
fn script_environment_results_and_exit_status() {
    let (_serial, host) = host();
    let script = r#"
for f in "$GUEST_KERNEL" "$GUEST_INITRD" "$ROOT/etc/p2pvm-note" "$TESTHOST_LIB"; do
    [ -s "$f" ] || { echo "missing $f"; exit 10; }
done
[ "$(pwd)" = "$WORK" ] || exit 11
[ "$GREETING" = "hello there" ] || exit 12
# A host program with its shared libraries (liblzma), stripped on the way into L1.
xz_version=$("$ROOT/usr/local/bin/host-xz" --version | head -n 1 | tr ' ' '_')
[ -n "$xz_version" ] || exit 13
result xz="$xz_version"
result runner="$TESTHOST_RUNNER" note="$(cat "$ROOT/etc/p2pvm-note")"
if [ "$TESTHOST_RUNNER" = nested ]; then
    thp=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/enabled)
    shmem=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/shmem_enabled)
    lo=$(cat /sys/class/net/lo/operstate)
    result thp="$thp" shmem="$shmem" lo="$lo" tun="$([ -d /sys/module/tun ] && echo yes)"
fi
t=$(uptime_s)
result elapsed="$(since "$t")"
exit 3
"#;
    let xz = p2pvm_testhost::util::require_tool("xz", "xz-utils").unwrap();
    let note = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(note.path(), "p2pvm\n").unwrap();
    let scenario = Scenario::new("environment", script)
        .file("/etc/p2pvm-note", note.path())
        .env("GREETING", "hello there")
        .binary("/usr/local/bin/host-xz", &xz)
        .timeout(Duration::from_secs(120));
    let outcome = host.run(&scenario).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(outcome.exit_status, 3, "{}", outcome.tail());
    assert!(outcome.ensure_success().is_err());
    assert_eq!(
        outcome.result("runner"),
        Some(outcome.runner.to_string().as_str())
    );
    assert_eq!(outcome.result("note"), Some("p2pvm"));
    assert!(
        outcome
            .result("xz")
            .is_some_and(|v| v.starts_with("xz_(XZ_Utils)")),
        "{}",
        outcome.tail()
    );
    assert!(outcome.result_f64("elapsed").unwrap() >= 0.0);
    if outcome.runner == RunnerKind::Nested {
        assert_eq!(
            outcome.result("thp"),
            Some("madvise"),
            "{}",
            outcome.console
        );
        assert_eq!(outcome.result("shmem"), Some("advise"));
        assert_eq!(outcome.result("tun"), Some("yes"));
        assert!(
            matches!(outcome.result("lo"), Some("unknown" | "up")),
            "{:?}",
            outcome.result("lo")
        );
        assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    }
}

#[test]
fn watchdog_kills_a_silent_run() {
    let (_serial, host) = host();
    let scenario = Scenario::new(
        "sleeps-forever",
        "echo going quiet\nwhile :; do sleep 1000; done",
    )
    .silence_timeout(Duration::from_secs(20))
    .timeout(Duration::from_secs(120));
    let started = std::time::Instant::now();
    let err = host
        .run(&scenario)
        .expect_err("the watchdog should have fired");
    let watchdog = err
        .downcast_ref::<WatchdogError>()
        .unwrap_or_else(|| panic!("not a watchdog error: {err:#}"));
    assert_eq!(watchdog.limit, Limit::Silence);
    assert!(watchdog.tail.contains("going quiet"), "{}", watchdog.tail);
    assert!(err.to_string().contains("silence limit"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(100));
}

/// QEMU opens no firmware file for `-kernel` direct boot that the bundle lacks (checked with
/// strace on this host's QEMU; skipped when strace is not installed).
#[test]
fn qemu_firmware_list_is_complete() {
    let (_serial, host) = host();
    let Some(strace) = p2pvm_testhost::util::find_tool("strace") else {
        eprintln!(
            "SKIPPED: strace is not installed (apt-get install strace): QEMU's firmware list not re-checked"
        );
        return;
    };
    let qemu = p2pvm_testhost::util::require_tool("qemu-system-x86_64", "qemu-system-x86").unwrap();
    let images = host.images(&Scenario::new("firmware", "true")).unwrap();
    let trace = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(strace)
        .args(["-f", "-e", "trace=openat", "-o"])
        .arg(trace.path())
        .arg(qemu)
        .args([
            "-machine",
            "pc,accel=tcg",
            "-m",
            "256",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-vga", "none", "-serial", "none", "-S", "-monitor", "stdio", "-kernel",
        ])
        .arg(&host.kernel().vmlinux)
        .arg("-initrd")
        .arg(&images.l2_initrd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"quit\n").unwrap();
    assert!(child.wait().unwrap().success());
    let bundled: Vec<_> = p2pvm_testhost::bundle::QEMU_FIRMWARE
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap())
        .collect();
    let text = std::fs::read_to_string(trace.path()).unwrap();
    let mut opened = 0;
    for line in text
        .lines()
        .filter(|l| l.contains("openat(") && !l.contains("= -1"))
    {
        let Some(path) = line.split('"').nth(1) else {
            continue;
        };
        if !(path.contains("/share/") || path.contains("/ipxe/")) || path.contains("/locale/") {
            continue;
        }
        let real = std::fs::canonicalize(path).unwrap();
        if real.is_dir() {
            continue;
        }
        assert!(
            bundled.contains(&real),
            "QEMU opened {path} which is not in QEMU_FIRMWARE"
        );
        opened += 1;
    }
    assert!(opened >= 2, "strace saw no firmware being opened:\n{text}");
}
