# L1 of the network stress (run by hand, see tests/vm/README.md): boots our VMM
# BOOTS times with moderation on; each boot runs bench-l2.sh's io mode (three
# virtio-blk reads, three host-to-guest transfers) and then fetches 64 MiB from
# the guest N times. A heartbeat line every 15 s (L1 uptime and the TAP's
# counters) tells a test host that froze from a guest or VMM that stalled: in
# the second case the heartbeat goes on, and a boot without progress for 70 s
# is dumped (VMM threads, KVM's counters, the TAP) and ended.
export P2PVMM_HOME="$WORK/home"
N=${N:-30}; BOOTS=${BOOTS:-16}
cr=$(printf '\r')
mount -t debugfs none /sys/kernel/debug 2>/dev/null
"$ROOT/opt/ip" tuntap add dev p2ptapbench mode tap
"$ROOT/opt/ip" addr add 172.31.213.1/24 dev p2ptapbench
"$ROOT/opt/ip" link set p2ptapbench up
mkdir -p "$WORK/www"
dd if=/dev/zero of="$WORK/www/big.bin" bs=1M count=64 2>/dev/null
busybox httpd -p 172.31.213.1:8080 -h "$WORK/www"
dd if=/dev/urandom of="$WORK/disk.img" bs=1M count=128 2>/dev/null
mkfifo "$WORK/console"
dump() {
    echo "DUMP $1"
    for t in /proc/$pid/task/*; do
        echo "  task $(cat "$t/comm") wchan=$(cat "$t/wchan") state/utime/stime=$(cut -d' ' -f3,14,15 "$t/stat")"
    done
    for d in /sys/kernel/debug/kvm/*-*; do
        [ -d "$d" ] || continue
        for f in exits halt_exits halt_wakeup irq_injections irq_window_exits io_exits mmio_exits signal_exits; do
            [ -f "$d/$f" ] && printf '  %s=%s' "$f" "$(cat "$d/$f")"
        done
        echo
    done
    grep p2ptapbench /proc/net/dev
    tail -5 "$WORK/vmm.err"
}
ok=0; stalls=0
( while :; do
    sleep 15
    echo "heartbeat uptime=$(cut -d' ' -f1 /proc/uptime) tap=$(grep p2ptapbench /proc/net/dev | tr -s ' ' | cut -d' ' -f2-4,10-12 | tr ' ' ,)"
done ) &
for b in $(seq 1 "$BOOTS"); do
    "$P2PVMM" --log info run --name b --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" \
        --cmdline "console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly p2pvm.mode=io" \
        --disk "$WORK/disk.img" --net p2ptapbench,mac=02:00:00:00:00:02 --console-stdout \
        > "$WORK/console" 2>"$WORK/vmm.err" &
    pid=$!
    touch "$WORK/progress"
    (
        while kill -0 "$pid" 2>/dev/null; do
            sleep 10
            age=$(( $(date +%s) - $(stat -c %Y "$WORK/progress") ))
            if [ "$age" -ge 70 ]; then
                dump "boot=$b no progress for ${age}s"
                sleep 15
                dump "boot=$b 15 s later"
                kill "$pid"
                break
            fi
        done
    ) &
    wd=$!
    while IFS= read -r line; do
        line=${line%"$cr"}
        touch "$WORK/progress"
        case $line in
        "L2 end "*) echo "boot=$b ${line#L2 end }" ;;
        "L2 serving"*)
            echo "boot=$b guest serving"
            for i in $(seq 1 "$N"); do
                t=$(uptime_s)
                if busybox timeout 50 busybox wget -q -O /dev/null http://172.31.213.2:8080/big.bin; then
                    ok=$((ok + 1)); touch "$WORK/progress"
                else
                    stalls=$((stalls + 1))
                    dump "boot=$b guest-to-host transfer $i failed after $(since "$t") s"
                fi
            done
            kill "$pid" ;;
        esac
    done < "$WORK/console"
    wait "$pid"
    kill "$wd" 2>/dev/null
    echo "boot $b done: guest-to-host transfers ok=$ok failed=$stalls"
done
result boots=$BOOTS transfers_ok=$ok failed=$stalls
