# L2 of the VMM benchmark. boot: nothing (the prelude announced init).
# io: timed virtio-blk and virtio-net transfers, then serve a file to L1.
mode=$(sed -n 's/.*p2pvm\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ "$mode" = io ]; then
    ip addr add 172.31.213.2/24 dev eth0
    ip link set eth0 up
    echo "L2 start blk"
    t=$(uptime_s)
    dd if=/dev/vda of=/dev/null bs=1M count=128 2>/dev/null
    echo "L2 end test=blk_read mib=128 secs=$(since "$t")"
    echo "L2 start net"
    t=$(uptime_s)
    wget -q -O /dev/null http://172.31.213.1:8080/big.bin
    echo "L2 end test=net_rx mib=64 secs=$(since "$t")"
    mkdir -p /www
    dd if=/dev/zero of=/www/big.bin bs=1M count=64 2>/dev/null
    httpd -p 8080 -h /www
    echo "L2 serving"
    sleep 120
fi
