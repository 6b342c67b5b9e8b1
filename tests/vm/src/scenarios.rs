//! Ready-made scenarios, reusable by tests and benches.

use crate::scenario::Scenario;

/// The L1 script of [`qemu_l2_boot`]: starts the bundled QEMU with `-accel kvm` on the L2
/// kernel and initramfs, forwards L2's console (prefixed `L2| `), and when L2's init line
/// appears reports `P2PVM-RESULT vmm=qemu init_s=<L1 seconds from just before QEMU started>
/// l2_uptime_s=<L2's uptime at init>`. Exits 1 if L2 never reached init.
pub const QEMU_L2_BOOT_L1: &str = r#"cr=$(printf '\r')
start=$(uptime_s)
"$QEMU" -machine pc,accel=kvm -cpu host -m 256 -smp 1 -nodefaults -no-reboot \
    -display none -vga none -serial stdio \
    -kernel "$GUEST_KERNEL" -initrd "$GUEST_INITRD" \
    -append "console=ttyS0 panic=-1 quiet" 2>&1 |
while IFS= read -r line; do
    line=${line%"$cr"}
    case $line in
    *P2PVM-L2-INIT*)
        init_s=$(since "$start")
        echo "L2| $line"
        l2_uptime=${line##*uptime=}
        result vmm=qemu init_s="$init_s" l2_uptime_s="${l2_uptime%% *}"
        : > "$WORK/l2-init-seen" ;;
    *)
        echo "L2| $line" ;;
    esac
done
if [ ! -e "$WORK/l2-init-seen" ]; then
    echo "L2 never reached its init under QEMU" >&2
    exit 1
fi
"#;

/// The body of the L2 init of [`qemu_l2_boot`]: nothing beyond the prelude, which
/// reports reaching init, then power-off.
pub const L2_REPORT_INIT: &str = "poweroff -f\n";

/// QEMU (bundled into L1, `-machine pc,accel=kvm -cpu host -m 256`) boots the L2 guest to
/// its init: the comparison point for our own VMM. Results: `vmm`, `init_s`, `l2_uptime_s`.
pub fn qemu_l2_boot() -> Scenario {
    Scenario::new("qemu-l2-boot", QEMU_L2_BOOT_L1)
        .l2_init(L2_REPORT_INIT)
        .bundle_qemu()
}
