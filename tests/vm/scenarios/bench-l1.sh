# L1 of the VMM benchmark: our VMM against QEMU (-accel kvm, userspace
# virtio devices, no vhost), same kernel, initramfs, command line, memory,
# disk image and TAP, in this one test host, rounds interleaved.
# Results (one line each): boot time to the guest's /init as seen from here;
# virtio-blk sequential read and virtio-net TCP both ways with the VMM
# process's CPU seconds for each; our VMM's resident memory beyond guest RAM.
ROUNDS=${ROUNDS:-3}
export P2PVMM_HOME="$WORK/home"
cmdline_base="console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly"
cr=$(printf '\r')
"$ROOT/opt/ip" tuntap add dev p2ptapbench mode tap
"$ROOT/opt/ip" addr add 172.31.213.1/24 dev p2ptapbench
"$ROOT/opt/ip" link set p2ptapbench up
mkdir -p "$WORK/www"
dd if=/dev/zero of="$WORK/www/big.bin" bs=1M count=64 2>/dev/null
busybox httpd -p 172.31.213.1:8080 -h "$WORK/www"
dd if=/dev/urandom of="$WORK/disk.img" bs=1M count=128 2>/dev/null
mkfifo "$WORK/console"

# Clock ticks (user + system, 1/100 s) a process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
cpu_s() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 100 }'; }

# vm VMM MODE ROUND
vm() {
    vmm=$1; mode=$2; round=$3
    cmdline="$cmdline_base p2pvm.mode=$mode"
    start=$(uptime_s)
    if [ "$vmm" = ours ]; then
        "$P2PVMM" run --name b --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cmdline "$cmdline" \
            --disk "$WORK/disk.img" --net p2ptapbench,mac=02:00:00:00:00:02 --console-stdout \
            --report "$WORK/report.json" > "$WORK/console" 2>"$WORK/vmm.err" &
    else
        "$QEMU" -machine pc,accel=kvm -cpu host -m 256 -smp 1 -nodefaults -no-reboot \
            -display none -vga none -serial stdio \
            -kernel "$GUEST_KERNEL" -initrd "$GUEST_INITRD" -append "$cmdline" \
            -drive file="$WORK/disk.img",format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0 \
            -netdev tap,id=n0,ifname=p2ptapbench,script=no,downscript=no,vhost=off \
            -device virtio-net-pci,netdev=n0,mac=02:00:00:00:00:02,romfile= \
            > "$WORK/console" 2>"$WORK/vmm.err" &
    fi
    pid=$!
    while IFS= read -r line; do
        line=${line%"$cr"}
        case $line in
        *P2PVM-L2-INIT*)
            up=${line##*uptime=}
            result vmm=$vmm round=$round mode=$mode test=boot init_s=$(since "$start") l2_uptime_s=${up%% *} ;;
        "L2 start "*)
            t0=$(cpu_ticks "$pid") ;;
        "L2 end "*)
            t1=$(cpu_ticks "$pid")
            set -- ${line#L2 end }
            result vmm=$vmm round=$round "$@" vmm_cpu_s=$(cpu_s "$t0" "$t1") ;;
        "L2 serving"*)
            # Round trips over the TAP: ping-pong (each echo sent when the
            # last reply is in) and one echo every 2 ms; what interrupt
            # moderation must not cost.
            for kind in "pingpong -A" "ping2ms -i 0.002"; do
                set -- $kind
                name=$1; shift
                avg=$(busybox ping "$@" -c 200 -q 172.31.213.2 | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
                result vmm=$vmm round=$round test=$name avg_ms=${avg:-none}
            done
            # Guest to host: this host fetches 64 MiB from the guest's httpd, three times.
            for rep in 1 2 3; do
                t0=$(cpu_ticks "$pid"); t=$(uptime_s)
                busybox wget -q -O /dev/null http://172.31.213.2:8080/big.bin
                secs=$(since "$t"); t1=$(cpu_ticks "$pid")
                result vmm=$vmm round=$round test=net_tx rep=$rep mib=64 secs=$secs vmm_cpu_s=$(cpu_s "$t0" "$t1")
            done
            kill "$pid" ;;
        esac
    done < "$WORK/console"
    wait "$pid"
    if [ "$vmm" = ours ]; then
        result vmm=ours round=$round test=overhead mode=$mode \
            kib=$(sed -n 's/.*"vmm_overhead_kib": \([0-9]*\).*/\1/p' "$WORK/report.json") \
            setup_ms=$(sed -n 's/.*"setup_ms": \([0-9.]*\).*/\1/p' "$WORK/report.json")
    fi
}

for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then first=ours; second=qemu; else first=qemu; second=ours; fi
    vm $first boot "$r"
    vm $second boot "$r"
    vm $second io "$r"
    vm $first io "$r"
done
"$ROOT/opt/ip" link del p2ptapbench 2>/dev/null || true
