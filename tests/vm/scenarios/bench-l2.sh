# L2 of the VMM benchmark. boot: nothing (the prelude announced init).
# io: timed virtio-blk and virtio-net transfers, three of each (the bench
# takes their median: single transfers on an emulated CPU are noisy), then
# serve a file to L1 for the guest-to-host direction.
mode=$(sed -n 's/.*p2pvm\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ "$mode" = io ]; then
    ip addr add 172.31.213.2/24 dev eth0
    ip link set eth0 up
    for rep in 1 2 3; do
        # Cold guest cache for every read.
        echo 3 > /proc/sys/vm/drop_caches
        echo "L2 start blk"
        t=$(uptime_s)
        dd if=/dev/vda of=/dev/null bs=1M count=128 2>/dev/null
        echo "L2 end test=blk_read rep=$rep mib=128 secs=$(since "$t")"
    done
    for rep in 1 2 3; do
        echo "L2 start net"
        t=$(uptime_s)
        wget -q -O /dev/null http://172.31.213.1:8080/big.bin
        echo "L2 end test=net_rx rep=$rep mib=64 secs=$(since "$t")"
    done
    mkdir -p /www
    dd if=/dev/zero of=/www/big.bin bs=1M count=64 2>/dev/null
    httpd -p 8080 -h /www
    echo "L2 serving"
    sleep 300
fi
