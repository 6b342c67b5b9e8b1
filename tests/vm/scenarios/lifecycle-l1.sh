# L1: one guest per mode — powers off; resets once (state kept on a disk) then
# powers off; panics with pvpanic loaded. Reports exit statuses and reasons.
export P2PVMM_HOME="$WORK/home"
vm() {
    mode=$1; shift
    "$P2PVMM" run --name t --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" \
        --cmdline "console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly p2pvm.mode=$mode" \
        --report "$WORK/$mode.json" "$@" > "$WORK/$mode.out" 2>&1
    echo $?
}
field() { sed -n "s/.*\"$2\": \"\{0,1\}\([^\",]*\).*/\1/p" "$WORK/$1.json"; }
s=$(vm poweroff)
result poweroff_exit=$s poweroff_reason=$(field poweroff exit) init_ms=$(field poweroff init_ms) overhead_kib=$(field poweroff vmm_overhead_kib)
dd if=/dev/zero of="$WORK/state.img" bs=1M count=1 2>/dev/null
s=$(vm reboot --disk "$WORK/state.img")
result reboot_exit=$s reboot_boots=$(field reboot boots) reboot_reason=$(field reboot exit)
s=$(vm panic)
result panic_exit=$s panic_reason=$(field panic exit)
grep -q "guest kernel panicked" "$WORK/panic.out" && result panic_reported=yes

