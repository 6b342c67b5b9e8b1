# L2: the guest side of the devices scenario (mode from the kernel command line).
mode=$(sed -n 's/.*p2pvm\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$mode" in
blkwrite)
    echo "L2 disk=$(sha256sum < /dev/vda | cut -d' ' -f1)"
    dd if=/dev/urandom of=/tmp/p bs=4096 count=64 2>/dev/null
    dd if=/tmp/p of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null
    echo "L2 written=$(sha256sum < /tmp/p | cut -d' ' -f1)" ;;
blkread)
    echo "L2 reread=$(dd if=/dev/vda bs=4096 skip=256 count=64 2>/dev/null | sha256sum | cut -d' ' -f1)" ;;
intx)
    sum=$(dd if=/dev/vda bs=4096 skip=256 count=64 2>/dev/null | sha256sum | cut -d' ' -f1)
    lines=$(grep -c "IO-APIC.*fasteoi.*virtio" /proc/interrupts)
    count=$(grep "IO-APIC.*fasteoi.*virtio" /proc/interrupts | awk '{ n += $2 } END { print n + 0 }')
    echo "L2 intx_reread=$sum intx_lines=$lines intx_count=$count"
    grep virtio /proc/interrupts ;;
net)
    dd if=/dev/hwrng of=/tmp/r bs=1024 count=4 2>/dev/null
    echo "L2 rng_bytes=$(wc -c < /tmp/r)"
    ip addr add 172.31.213.2/24 dev eth0
    ip link set eth0 up
    wget -q -O /tmp/down.bin http://172.31.213.1:8080/down.bin
    echo "L2 down_sum=$(sha256sum < /tmp/down.bin | cut -d' ' -f1)"
    mkdir -p /www
    dd if=/dev/urandom of=/www/up.bin bs=1M count=16 2>/dev/null
    echo "L2 up_sum=$(sha256sum < /www/up.bin | cut -d' ' -f1)"
    httpd -p 8080 -h /www
    echo "L2 serving"
    # The operator's shell on the serial console, until they power off.
    setsid cttyhack sh ;;
esac
