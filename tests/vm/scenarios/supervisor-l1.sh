# L1: `p2pvmm up --isolation vm` with two VMs, each in its own p2pvmm process:
# both boot; a VM process killed with SIGKILL is started again; a guest that
# powers off stays off; SIGTERM to `up` stops what runs and `up` exits 0.
export P2PVMM_HOME="$WORK/home"
cat > "$WORK/vms.toml" <<TOML
[[vm]]
name = "alpha"
kernel = "$GUEST_KERNEL"
initrd = "$GUEST_INITRD"
cmdline = "console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly"
mem_mib = 192
[[vm]]
name = "beta"
kernel = "$GUEST_KERNEL"
initrd = "$GUEST_INITRD"
cmdline = "console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly"
mem_mib = 192
rng = true
TOML
"$P2PVMM" up --isolation vm --vms "$WORK/vms.toml" > "$WORK/up.log" 2>&1 &
up=$!
wait_for "$WORK/home/vms/alpha/console.log" "L2 ready" 120 && result alpha_booted=yes
wait_for "$WORK/home/vms/beta/console.log" "L2 ready" 120 && result beta_booted=yes
pa=$(cat "$WORK/home/vms/alpha/pid"); pb=$(cat "$WORK/home/vms/beta/pid")
[ -n "$pa" ] && [ -n "$pb" ] && [ "$pa" != "$pb" ] && [ "$pa" != "$up" ] && result own_processes=yes
# Each VM process maps exactly one guest RAM: its own.
result alpha_guest_maps=$(grep -c p2pvmm-guest-ram "/proc/$pa/maps") beta_guest_maps=$(grep -c p2pvmm-guest-ram "/proc/$pb/maps")
# Kill alpha's VMM outright: the supervisor boots it again.
kill -9 "$pa"
sleep 0.5
i=0
while [ $i -lt 600 ]; do
    np=$(cat "$WORK/home/vms/alpha/pid" 2>/dev/null)
    [ -n "$np" ] && [ "$np" != "$pa" ] && break
    sleep 0.1; i=$((i + 1))
done
wait_for "$WORK/home/vms/alpha/console.log" "L2 ready" 120 && [ "$np" != "$pa" ] && result alpha_restarted=yes
kill -0 "$pb" 2>/dev/null && result beta_untouched=yes
# Power beta off from its console: it stays off.
echo 'poweroff -f' | "$P2PVMM" console beta --linger-ms 300 > /dev/null 2>&1
i=0
while [ $i -lt 300 ] && kill -0 "$pb" 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
kill -0 "$pb" 2>/dev/null || result beta_off=yes
sleep 2
[ -e "$WORK/home/vms/beta/pid" ] || result beta_stays_off=yes
# SIGTERM to up: alpha stops, up exits 0.
np=$(cat "$WORK/home/vms/alpha/pid")
kill -TERM "$up"
wait "$up"
result up_exit=$?
kill -0 "$np" 2>/dev/null || result alpha_stopped=yes
grep -E "VM (started|failed|powered off)|every VM" "$WORK/up.log" | sed 's/^/up.log: /'
