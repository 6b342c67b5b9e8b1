# L1 of the boot profile (`testhost profile-boot`): where a nested boot of
# the bench's guest spends its wall-clock time, seen from our VMM.
# 1. One boot dumps the guest kernel's text symbols (/proc/kallsyms: Debian
#    ships no System.map, and a PVH boot does not randomize the kernel's
#    base, so they hold for every boot); printed gzip'd, base64, as
#    `P2PVM-KSYM` lines.
# 2. RUNS boots with P2PVMM_GUEST_PROFILE, samples printed as
#    `P2PVM-PROF run ms vcpu rip k|u|v` lines, timings as results.
# Any boot that fails ends the script with status 1 and the VMM's log.
export P2PVMM_HOME="$WORK/home"
cmdline="${CMDLINE:-console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly}"
failed() {
    echo "$1" >&2
    cat "$WORK/console.txt" "$WORK/vmm.err" >&2
    exit 1
}
dd if=/dev/zero of="$WORK/disk.img" bs=1M count=16 2>/dev/null
"$P2PVMM" run --name k --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" \
    --cmdline "$cmdline p2pvm.dump=kallsyms" --disk "$WORK/disk.img" \
    --console-stdout > "$WORK/console.txt" 2>"$WORK/vmm.err" || failed "the symbol dump boot failed"
bytes=$(sed -n 's/.*P2PVM-KSYMS bytes=\([0-9]*\).*/\1/p' "$WORK/console.txt" | tr -d '\r')
[ -n "$bytes" ] || failed "the symbol dump boot reported no dump"
head -c "$bytes" "$WORK/disk.img" | gzip -9 | base64 | sed 's/^/P2PVM-KSYM /'
for r in $(seq 1 "${RUNS:-3}"); do
    rm -f "$WORK/prof.txt" "$WORK/report.json"
    start=$(uptime_s)
    P2PVMM_GUEST_PROFILE="$WORK/prof.txt" "$P2PVMM" run --name b --kernel "$GUEST_KERNEL" \
        --initrd "$GUEST_INITRD" --cmdline "$cmdline" \
        --console-stdout --report "$WORK/report.json" > "$WORK/console.txt" 2>"$WORK/vmm.err" ||
        failed "profiled boot $r failed"
    [ -s "$WORK/prof.txt" ] || failed "profiled boot $r wrote no samples"
    result run=$r init_s=$(since "$start") \
        setup_ms=$(sed -n 's/.*"setup_ms": \([0-9.]*\).*/\1/p' "$WORK/report.json") \
        init_ms=$(sed -n 's/.*"init_ms": \([0-9.]*\).*/\1/p' "$WORK/report.json")
    sed "s/^/P2PVM-PROF $r /" "$WORK/prof.txt"
done
