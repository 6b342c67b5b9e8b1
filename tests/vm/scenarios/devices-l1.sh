# L1: virtio-blk (checksums, write + fsync, a second VM reads it back), then
# virtio-net over a TAP both ways, virtio-rng, and the serial console socket
# (two attaches in a row, each answered; poweroff typed into it).
export P2PVMM_HOME="$WORK/home"
extra=""
log="$WORK/home/vms/t/console.log"
vm() {
    mode=$1; shift
    "$P2PVMM" run --name t --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" \
        --cmdline "console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly $extra p2pvm.mode=$mode" "$@" > "$WORK/$mode.out" 2>&1
    echo $?
}
l2() { sed -n "s/^L2 .*$1=\([^ ]*\).*/\1/p" "$log" | tr -d '\r'; }
# virtio-blk: the guest reads a disk whose checksum we know, writes and fsyncs.
dd if=/dev/urandom of="$WORK/disk.img" bs=1M count=8 2>/dev/null
disk_sum=$(sha256sum < "$WORK/disk.img" | cut -d' ' -f1)
s=$(vm blkwrite --disk "$WORK/disk.img")
result blkwrite_exit=$s disk_sum=$disk_sum l2_disk_sum=$(l2 disk)
result on_disk_sum=$(dd if="$WORK/disk.img" bs=4096 skip=256 count=64 2>/dev/null | sha256sum | cut -d' ' -f1) written_sum=$(l2 written)
s=$(vm blkread --disk "$WORK/disk.img")
result blkread_exit=$s reread_sum=$(l2 reread)
# The same read with MSI off in the guest: virtio-pci on its INTx line
# (level-triggered through the IO-APIC, routed by _PRT, resampled at EOI).
extra="pci=nomsi"
s=$(vm intx --disk "$WORK/disk.img")
extra=""
result intx_exit=$s intx_sum=$(l2 intx_reread) intx_lines=$(l2 intx_lines) intx_count=$(l2 intx_count)
# virtio-net, virtio-rng, the console.
"$ROOT/opt/ip" tuntap add dev p2ptapdev mode tap
"$ROOT/opt/ip" addr add 172.31.213.1/24 dev p2ptapdev
"$ROOT/opt/ip" link set p2ptapdev up
mkdir -p "$WORK/www"
dd if=/dev/urandom of="$WORK/www/down.bin" bs=1M count=16 2>/dev/null
result down_sum=$(sha256sum < "$WORK/www/down.bin" | cut -d' ' -f1)
busybox httpd -p 172.31.213.1:8080 -h "$WORK/www"
(s=$(vm net --net p2ptapdev --rng); echo "$s" > "$WORK/net.status") &
for i in $(seq 1 900); do grep -q "^L2 serving" "$log" 2>/dev/null && break; sleep 0.1; done
# Seccomp mode of each thread of the running VMM (2: filtered).
pid=$(cat "$WORK/home/vms/t/pid")
for task in /proc/"$pid"/task/*; do
    result "seccomp_$(cat "$task/comm")=$(sed -n 's/^Seccomp:[[:space:]]*//p' "$task/status")"
done
busybox wget -q -O "$WORK/up.bin" http://172.31.213.2:8080/up.bin
result up_sum_host=$(sha256sum < "$WORK/up.bin" | cut -d' ' -f1) up_sum_guest=$(l2 up_sum) l2_down_sum=$(l2 down_sum) rng_bytes=$(l2 rng_bytes)
# Two attaches in a row, each answered; the VM keeps running in between.
echo 'echo answer-$((6*7))' | "$P2PVMM" console t > "$WORK/console1.txt" 2>&1
echo 'echo second-$((7*7))' | "$P2PVMM" console t > "$WORK/console2.txt" 2>&1
grep -q "answer-42" "$WORK/console1.txt" && result console_first=answered
grep -q "second-49" "$WORK/console2.txt" && result console_second=answered
[ -e "$WORK/home/vms/t/pid" ] && result vm_alive_after_detach=yes
echo 'poweroff -f' | "$P2PVMM" console t --linger-ms 200 > /dev/null 2>&1
wait
result net_exit=$(cat "$WORK/net.status")
"$ROOT/opt/ip" link del p2ptapdev 2>/dev/null || true
