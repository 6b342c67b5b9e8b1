//! The shell scripts the harness puts around a scenario's own scripts.
//!
//! * `lib.sh` (at `$TESTHOST_LIB`, sourced first by every scenario script, L1 and L2):
//!   `result k=v ...` prints a `P2PVM-RESULT` line, `uptime_s` prints the first field of
//!   `/proc/uptime`, `since START` prints the seconds elapsed since an `uptime_s` value,
//!   `wait_for FILE PATTERN SECONDS` waits for a matching line.
//! * L2 `/init`: mounts proc, sysfs, devtmpfs; writes p2pvmm's boot marker and prints
//!   `P2PVM-L2-INIT uptime=…`; loads the modules listed in
//!   `/lib/modules/load-order`; sources `lib.sh`; runs the scenario's body inline (as PID 1);
//!   then `poweroff -f`.
//! * L1 `/init`: mounts proc, sysfs, devtmpfs, tmpfs on `/tmp` and `/dev/shm`; sets
//!   transparent huge pages to `madvise` (shmem: `advise`); brings up `lo`; loads modules;
//!   prints `P2PVM-L1-READY kvm=yes|no uptime_s=...`; then the launcher; then `poweroff -f`.
//! * The launcher (also the whole of the direct runner's wrapper): exports the scenario
//!   environment, runs the L1 script with `sh` in `$WORK` with stdin from `/dev/null`, and
//!   prints `P2PVM-EXIT status=N`.

use crate::util::shell_quote;

/// Where `lib.sh` lives in both images (relative to `$ROOT` for the direct runner).
pub const LIB_PATH: &str = "/testhost/lib.sh";
/// Where the L1 scenario script lives (relative to `$ROOT` for the direct runner).
pub const L1_SCRIPT_PATH: &str = "/testhost/l1.sh";
/// The module load list (one canonical name per line, `?name` for an optional module).
pub const LOAD_ORDER_PATH: &str = "/lib/modules/load-order";

/// Helpers sourced by scenario scripts.
pub const LIB_SH: &str = r#"# p2pvm-testhost helpers (sourced by every scenario script).
# result key=value ...: report values (no spaces in them) to the harness.
result() { echo "P2PVM-RESULT $*"; }
# uptime_s: seconds since this kernel booted (0.01 s resolution).
uptime_s() { read -r _th_up _th_idle < /proc/uptime; echo "$_th_up"; }
# since START: seconds (3 decimals) elapsed since START, a value printed by uptime_s.
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.3f\n", b - a }'; }
# wait_for FILE PATTERN SECONDS: until FILE has a line matching PATTERN.
wait_for() {
    _th_i=0
    while [ $_th_i -lt $(($3 * 10)) ]; do
        grep -aq "$2" "$1" 2>/dev/null && return 0
        sleep 0.1; _th_i=$((_th_i + 1))
    done
    return 1
}
"#;

/// The L2 body used when a scenario gives none (the prelude already reported init).
pub const DEFAULT_L2_BODY: &str = "";

/// First thing of the L2 `/init`: tell the VMM it runs (p2pvmm's boot-marker
/// port 0x440 — 1088 — takes 0x7b; QEMU ignores the write), and print the
/// line the L1 scripts time the boot by.
const INIT_MARKER: &str = r#"printf '\173' | dd of=/dev/port bs=1 seek=1088 count=1 2>/dev/null
read -r _l2_up _l2_idle < /proc/uptime
echo "P2PVM-L2-INIT uptime=$_l2_up"
"#;

/// Loads the modules in order, each with the `module.param=value` words of
/// the kernel command line meant for it (what kmod's modprobe would pass;
/// busybox's insmod does not look).
const LOAD_MODULES: &str = r#"while read -r m; do
  opt=${m#\?}; opt=$(echo "${opt##*/}" | tr - _); args=
  for w in $(cat /proc/cmdline); do
    case $w in "$opt".*=*) args="$args ${w#"$opt".}" ;; esac
  done
  case $m in
    '?'*) m=${m#?}
          insmod "/lib/modules/$m.ko" $args 2>/dev/null || echo "P2PVM-NOTE optional module $m not loaded" ;;
    *)    insmod "/lib/modules/$m.ko" $args || echo "P2PVM-WARN module $m failed to load" ;;
  esac
done < /lib/modules/load-order
"#;

/// The L2 `/init`: the common prelude, then `body` inline, then power-off.
pub fn l2_init(body: &str) -> String {
    format!(
        "#!/bin/busybox sh\n\
         # p2pvm-testhost L2 init: prelude, then the scenario's body.\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         {INIT_MARKER}\
         {LOAD_MODULES}\
         export TESTHOST_LIB={LIB_PATH}\n\
         . \"$TESTHOST_LIB\"\n\
         # --- scenario body ---\n\
         {body}\n\
         # --- end of scenario body ---\n\
         poweroff -f\n"
    )
}

/// The test host's init, with `hold`: `p2pvm-kvm-hold` holds an empty VM
/// open for the test host's life before it reports ready (see
/// [`crate::scenario::KVM_HOLD_GUEST_PATH`]).
const HOLD_KVM: &str = "\
    if [ -c /dev/kvm ]; then\n\
        /bin/p2pvm-kvm-hold /tmp/.kvm-held &\n\
        i=0; while [ ! -e /tmp/.kvm-held ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n\
        if [ -e /tmp/.kvm-held ]; then echo \"P2PVM-NOTE kvm held open\"; else echo \"P2PVM-NOTE kvm hold failed\"; fi\n\
    fi\n";

/// The L1 `/init`: system setup, the launcher, power-off whatever happened.
/// With `heartbeat`, a background loop prints `P2PVM-HEARTBEAT` that often:
/// only a test host that stopped altogether falls silent then.
pub fn l1_init(launcher: &str, hold: bool, heartbeat: Option<std::time::Duration>) -> String {
    let hold = if hold { HOLD_KVM } else { "" };
    let heartbeat = heartbeat
        .map(|every| {
            format!(
                "(while sleep {}; do read -r up idle < /proc/uptime; echo \"P2PVM-HEARTBEAT uptime_s=$up\"; done) &\n",
                every.as_secs().max(1)
            )
        })
        .unwrap_or_default();
    format!(
        "#!/bin/busybox sh\n\
         # p2pvm-testhost L1 init: a test host with /dev/kvm.\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\n\
         mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm\n\
         echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled\n\
         echo madvise > /sys/kernel/mm/transparent_hugepage/enabled\n\
         ip link set lo up\n\
         {LOAD_MODULES}\
         {hold}\
         kvm=no; [ -c /dev/kvm ] && kvm=yes\n\
         read -r up idle < /proc/uptime\n\
         echo \"P2PVM-L1-READY kvm=$kvm uptime_s=$up\"\n\
         {heartbeat}\
         {launcher}\
         poweroff -f\n"
    )
}

/// The direct runner's wrapper: the host plays L1.
pub fn direct_wrapper(launcher: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # p2pvm-testhost direct runner: this host is the test host.\n\
         kvm=no; [ -c /dev/kvm ] && kvm=yes\n\
         echo \"P2PVM-L1-READY kvm=$kvm\"\n\
         {launcher}"
    )
}

/// Exports `env` (values quoted), runs the L1 script and reports its exit status.
pub fn launcher(env: &[(String, String)]) -> String {
    let mut text = String::new();
    for (key, value) in env {
        text.push_str(&format!("export {key}={}\n", shell_quote(value)));
    }
    text.push_str(&format!(
        "mkdir -p \"$WORK\" && cd \"$WORK\"\n\
         sh \"$ROOT{L1_SCRIPT_PATH}\" </dev/null\n\
         echo \"P2PVM-EXIT status=$?\"\n"
    ));
    text
}

/// A scenario's L1 script, preceded by the sourcing of `lib.sh`.
pub fn l1_script(user: &str) -> String {
    format!("# p2pvm-testhost L1 scenario script\n. \"$TESTHOST_LIB\"\n{user}\n")
}

/// The text of `/lib/modules/load-order`: required modules, then `?optional` ones.
pub fn load_order(required: &[String], optional: &[String]) -> String {
    let mut text = String::new();
    for name in required {
        text.push_str(name);
        text.push('\n');
    }
    for name in optional {
        text.push('?');
        text.push_str(name);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// `script` parses as a shell script (`sh -n`).
    fn assert_parses(script: &str) {
        let out = Command::new("sh")
            .args(["-n", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn the_test_host_holds_a_vm_open_before_it_reports_ready_when_asked() {
        let held = l1_init("run-the-scenario\n", true, None);
        let hold = held.find("/bin/p2pvm-kvm-hold").expect("the hold");
        let ready = held.find("P2PVM-L1-READY").expect("ready line");
        assert!(hold < ready, "{held}");
        assert!(!l1_init("run-the-scenario\n", false, None).contains("kvm-hold"));
        assert_parses(&held);
    }

    #[test]
    fn a_heartbeat_runs_beside_the_scenario_only_when_asked() {
        let beat = l1_init(
            "run-the-scenario\n",
            false,
            Some(std::time::Duration::from_secs(10)),
        );
        let at = beat.find("P2PVM-HEARTBEAT").expect("heartbeat");
        assert!(beat.contains("while sleep 10;"), "{beat}");
        assert!(at < beat.find("run-the-scenario").unwrap(), "{beat}");
        assert!(!l1_init("run-the-scenario\n", false, None).contains("HEARTBEAT"));
        assert_parses(&beat);
    }

    #[test]
    fn launcher_reports_exit_status_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap().to_string();
        std::fs::create_dir_all(dir.path().join("testhost")).unwrap();
        std::fs::write(dir.path().join("testhost/lib.sh"), LIB_SH).unwrap();
        let user = "result here=$(pwd) greeting=\"$GREETING\"\nt=$(uptime_s); since \"$t\" >/dev/null || exit 9\nexit 3";
        std::fs::write(dir.path().join("testhost/l1.sh"), l1_script(user)).unwrap();
        let env = vec![
            ("ROOT".to_string(), root.clone()),
            ("WORK".to_string(), format!("{root}/work dir")),
            ("TESTHOST_LIB".to_string(), format!("{root}{LIB_PATH}")),
            ("GREETING".to_string(), "it's".to_string()),
        ];
        let wrapper = direct_wrapper(&launcher(&env));
        let out = Command::new("sh").arg("-c").arg(&wrapper).output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.starts_with("P2PVM-L1-READY kvm="), "{stdout}");
        assert!(
            stdout.contains(&format!(
                "P2PVM-RESULT here={root}/work dir greeting=it's\n"
            )),
            "{stdout}"
        );
        assert!(stdout.ends_with("P2PVM-EXIT status=3\n"), "{stdout}");
    }

    #[test]
    fn load_order_marks_optional() {
        let text = load_order(&["kvm".into(), "tun".into()], &["kvm_intel".into()]);
        assert_eq!(text, "kvm\ntun\n?kvm_intel\n");
    }
}
