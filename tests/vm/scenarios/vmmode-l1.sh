# L1 of the VM-mode scenario: `p2pvmm up --isolation vm` with the service VM
# (p2pd, the channel's back-end) and the client VM (the front-end); an app in
# the client VM reaches the service VM's node through the channel device.
export P2PVMM_HOME="$WORK/home"
base="console=ttyS0 8250.nr_uarts=1 panic=-1 quiet pci=noearly"
cat > "$WORK/vms.toml" <<TOML
[[vm]]
name = "service"
kernel = "$GUEST_KERNEL"
initrd = "$GUEST_INITRD"
cmdline = "$base p2pvm.role=service"
mem_mib = 512
restart = "always"
channel = { side = "device" }
[[vm]]
name = "client"
kernel = "$GUEST_KERNEL"
initrd = "$GUEST_INITRD"
cmdline = "$base p2pvm.role=client"
mem_mib = 384
channel = { side = "driver" }
TOML
# wait_for FILE PATTERN SECONDS
wait_for() {
    i=0
    while [ $i -lt $(($3 * 10)) ]; do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1; i=$((i + 1))
    done
    return 1
}
slog="$WORK/home/vms/service/console.log"
clog="$WORK/home/vms/client/console.log"
start=$(uptime_s)
"$P2PVMM" up --isolation vm --vms "$WORK/vms.toml" > "$WORK/up.log" 2>&1 &
up=$!
# Both guests' consoles, prefixed, on this console (progress, and what to
# read when something fails).
wait_for "$WORK/up.log" "client" 30
sleep 1
tail -f "$slog" 2>/dev/null | while IFS= read -r l; do echo "[service] $l"; done &
tail -f "$clog" 2>/dev/null | while IFS= read -r l; do echo "[client] $l"; done &
wait_for "$slog" "L2 token " 240 || { tail -20 "$slog"; cat "$WORK/up.log"; }
peer=$(sed -n 's/.*L2 service peer=\([^ \r]*\).*/\1/p' "$slog" | head -1)
tok=$(sed -n 's/.*L2 token \([^ \r]*\).*/\1/p' "$slog" | head -1)
result service_peer=$peer service_ready_s=$(since "$start")
wait_for "$clog" "waiting for a token" 120 || tail -20 "$clog"
# The operator hands the app its token: typed into the client VM's console.
printf '%s\n' "$tok" | "$P2PVMM" console client --linger-ms 300 > /dev/null 2>&1
wait_for "$clog" "L2 client peer=" 120 || tail -20 "$clog"
cpeer=$(sed -n 's/.*L2 client peer=\([^ \r]*\).*/\1/p' "$clog" | head -1)
result client_saw_peer=$cpeer api_over_channel_s=$(since "$start")
# Only the region is shared: one memfd named p2pvm-channel in both VMM
# processes (same inode), and each VMM maps its own guest RAM only.
ps=$(cat "$WORK/home/vms/service/pid"); pc=$(cat "$WORK/home/vms/client/pid")
si=$(awk '/p2pvm-channel/ {print $5}' "/proc/$ps/maps" | sort -u)
ci=$(awk '/p2pvm-channel/ {print $5}' "/proc/$pc/maps" | sort -u)
sr=$(awk '/p2pvmm-guest-ram/ {print $5}' "/proc/$ps/maps" | sort -u)
cr=$(awk '/p2pvmm-guest-ram/ {print $5}' "/proc/$pc/maps" | sort -u)
[ -n "$si" ] && [ "$si" = "$ci" ] && result region_shared=yes
[ -n "$sr" ] && [ -n "$cr" ] && [ "$sr" != "$cr" ] && result ram_private=yes
grep -a "channel attached" "$slog" > /dev/null && result service_logged_attach=yes
kill -TERM "$up"
wait "$up"
result up_exit=$?
