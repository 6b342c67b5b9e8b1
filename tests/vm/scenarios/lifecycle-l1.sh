# L1: one guest per mode — powers off; resets once (state kept on a disk) then
# powers off; panics with pvpanic loaded; boots with two vCPUs and reads the
# RTC; boots the compressed bzImage through the 64-bit boot protocol.
# Reports exit statuses, reasons and what the guests saw.
export P2PVMM_HOME="$WORK/home"
kernel=$GUEST_KERNEL
vm() {
    mode=$1; shift
    "$P2PVMM" run --name t --kernel "$kernel" --initrd "$GUEST_INITRD" \
        --cmdline "console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly p2pvm.mode=$mode" \
        --report "$WORK/$mode.json" "$@" > "$WORK/$mode.out" 2>&1
    echo $?
}
field() { sed -n "s/.*\"$2\": \"\{0,1\}\([^\",]*\).*/\1/p" "$WORK/$1.json"; }
s=$(vm poweroff)
result poweroff_exit=$s poweroff_reason=$(field poweroff exit) init_ms=$(field poweroff init_ms) overhead_kib=$(field poweroff vmm_overhead_kib)
dd if=/dev/zero of="$WORK/state.img" bs=1M count=1 2>/dev/null
# A TAP too: its fd must be closed at the reset, or the new boot cannot attach.
s=$(vm reboot --disk "$WORK/state.img" --net p2ptapreb)
result reboot_exit=$s reboot_boots=$(field reboot boots) reboot_reason=$(field reboot exit)
s=$(vm panic)
result panic_exit=$s panic_reason=$(field panic exit)
grep -q "guest kernel panicked" "$WORK/panic.out" && result panic_reported=yes
# Two vCPUs (the second started by the guest through INIT/SIPI), and the
# CMOS clock the guest set its time from.
log="$WORK/home/vms/t/console.log"
s=$(vm smp --vcpus 2)
cpus=$(sed -n 's/^L2 cpus=\([0-9]*\).*/\1/p' "$log" | tr -d '\r')
epoch=$(sed -n 's/^L2 epoch=\([0-9]*\).*/\1/p' "$log" | tr -d '\r')
now=$(date +%s)
result smp_exit=$s smp_cpus=$cpus rtc_skew_s=$((now - epoch))
# The same kernel as a compressed bzImage: decompressed in the guest.
kernel="$ROOT/guest/vmlinuz"
s=$(vm bzimage)
result bzimage_exit=$s bzimage_init_ms=$(field bzimage init_ms)
[ "$s" = 0 ] || tail -5 "$WORK/bzimage.out"
