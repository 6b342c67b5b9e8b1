# L2: what each mode of the lifecycle scenario does (mode from the kernel command line).
mode=$(sed -n 's/.*p2pvm\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$mode" in
reboot)
    if [ "$(dd if=/dev/vda bs=6 count=1 2>/dev/null)" = "booted" ]; then
        echo "second boot"
    else
        printf booted | dd of=/dev/vda conv=fsync 2>/dev/null
        reboot -f
    fi ;;
panic)
    echo c > /proc/sysrq-trigger ;;
smp)
    echo "L2 cpus=$(grep -c ^processor /proc/cpuinfo)"
    echo "L2 epoch=$(date +%s)" ;;
esac
