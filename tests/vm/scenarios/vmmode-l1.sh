# L1 of the VM-mode scenario: the platform's two VMs from the real images
# (p2pvm-images), `p2pvmm up --isolation vm`, a host-mode node in this test
# host on the service VM's TAP, everything in the VMs driven through their
# serial consoles as an operator would. Each check reports a result; the
# Rust test decides.
export P2PVMM_HOME="$WORK/home"
# Our p2pd/p2pctl for the host-mode node, and iproute2 (`ip tuntap`) ahead
# of busybox's ip.
export PATH="$ROOT/opt:$PATH"
link_images "$WORK/images"
slog="$P2PVMM_HOME/vms/service/console.log"
clog="$P2PVMM_HOME/vms/client/console.log"

peer_of() { sed -n 's/^peer id: *//p'; }
client_boots() { grep -ac 'Client VM, .* since boot' "$clog"; }
service_boots() { grep -ac 'Service VM, .* since boot' "$slog"; }
# The client guest reset itself (the client VMM restarts it in place): say
# how, wait for the new boot's front-end, give its new shell the app's token.
client_came_back() {
    echo "the client guest reset itself $1 (boot $(client_boots)); how (the VMMs' log):"
    grep -a -E 'triple fault|reset itself|guest reset' "$WORK/up.log" | tail -5
    _i=0
    while [ "$(grep -ac 'front-end is up' "$clog")" -lt "$(client_boots)" ] && [ $_i -lt 120 ]; do
        sleep 1; _i=$((_i + 1))
    done
    type_on client "export P2PVM_TOKEN=$tok"
}

# The same reset in the service VM (its VMM boots it again in place): wait
# for the new boot's node.
service_came_back() {
    echo "the service guest reset itself $1 (boot $(service_boots)); how (the VMMs' log):"
    grep -a -E 'triple fault|reset itself|guest reset' "$WORK/up.log" | tail -5
    _i=0
    while [ "$(grep -ac 'p2pd is up' "$slog")" -lt "$(service_boots)" ] && [ $_i -lt 120 ]; do
        sleep 1; _i=$((_i + 1))
    done
}
# `ask` calls this when a VM booted again while a check ran, then asks once
# more. Runs in the asking subshell: what it did is kept in a file.
came_back() {
    echo "$1:$2" >> "$WORK/recovered"
    case $1 in
    client) client_came_back "while $2 ran" ;;
    service) service_came_back "while $2 ran" ;;
    esac
}
# However the scenario ends: how many times a guest reset itself (the VMMs
# log each triple fault), and how many checks were asked again after one.
# The test runs the scenario once more when a check failed in a run that
# had a reset (the emulator's flaw, docs/vm-mode.md), and only then.
report_resets() {
    _n=$(grep -ac 'triple fault' "$WORK/up.log" 2>/dev/null)
    result guest_resets=${_n:-0}
    if [ -f "$WORK/recovered" ]; then
        while read -r _vm_key; do result asked_again_after_reset=$_vm_key; done < "$WORK/recovered"
    fi
}
trap report_resets EXIT

start=$(uptime_s)
"$P2PVMM" up --isolation vm --images "$WORK/images" --service-mem-mib 640 \
    --cmdline-extra "p2pvm.log=console" > "$WORK/up.log" 2>&1 &
up=$!
wait_for "$WORK/up.log" "VM client" 60 || { cat "$WORK/up.log"; exit 1; }
follow service
follow client
wait_for "$slog" "p2pd is up" 300 || { tail -40 "$slog"; cat "$WORK/up.log"; }
result service_ready_s=$(since "$start")
wait_for "$clog" "front-end is up" 300 || tail -40 "$clog"
result client_ready_s=$(since "$start")

# The operator issues the app's token on the service VM's console; the app
# in the client VM uses it: its first answer crossed the channel.
peer=$(ask service PEER "p2pctl info | sed -n 's/^peer id: *//p'")
tok=$(ask service TOKEN "p2pctl app issue vmtest")
type_on client "export P2PVM_TOKEN=$tok"
cpeer=$(ask client CPEER "p2pctl info | sed -n 's/^peer id: *//p'")
api_ready=$(since "$start")
# Seen in about one run in three, under QEMU's emulator only: the client
# guest resets itself (no panic, no reboot request) in its first seconds.
# The test host reports it, and the check is the answer after the reboot.
if [ -z "$cpeer" ] && [ "$(client_boots)" -gt 1 ]; then
    client_came_back "before its first answer"
    result client_guest_reset_early=yes
    cpeer=$(ask client CPEER2 "p2pctl info | sed -n 's/^peer id: *//p'")
fi
# The same reset, seen in the service VM (its VMM boots it again in place):
# say how, wait for its node, and ask again with a token issued after it.
if [ -z "$cpeer" ] && [ "$(service_boots)" -gt 1 ]; then
    service_came_back "before the client's first answer"
    result service_guest_reset_early=yes
    peer=$(ask service PEER2 "p2pctl info | sed -n 's/^peer id: *//p'")
    tok=$(ask service TOKEN2 "p2pctl app issue vmtest2")
    type_on client "export P2PVM_TOKEN=$tok"
    cpeer=$(ask client CPEER3 "p2pctl info | sed -n 's/^peer id: *//p'")
fi
result service_peer=$peer client_saw_peer=$cpeer api_ready_s=$api_ready
[ -n "$cpeer" ] || { echo "no answer in the client VM; the VMMs' log:"; grep -a -E 'triple fault|reset itself|guest reset|WARN|ERROR' "$WORK/up.log" | tail -20; }

# Those answers came by MSI-X through our guest module in both VMs (no INTx:
# taking an interrupt costs a guest no exit to its VMM).
msix() { ask "$1" "$2" "awk '/p2pvm_channel/ && /MSI/ {for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) s += \$i} END {print s + 0}' /proc/interrupts"; }
result channel_msix_service=$(msix service SMSIX) channel_msix_client=$(msix client CMSIX)

# Only the region is shared. Each VMM reports its slots and their backing
# files (memory.json); the region's memfd must be the one file both have.
ids() { awk -F'"' '/"backing"/ {b=$4} /"file_id"/ {print $4 "|" b}' "$1"; }
sm="$P2PVMM_HOME/vms/service/memory.json"; cm="$P2PVMM_HOME/vms/client/memory.json"
ids "$sm" | sort -u > "$WORK/s.ids"; ids "$cm" | sort -u > "$WORK/c.ids"
echo "service slots:"; cat "$WORK/s.ids"; echo "client slots:"; cat "$WORK/c.ids"
common=$(grep -Fxf "$WORK/c.ids" "$WORK/s.ids")
result shared_files=$(echo "$common" | grep -c .) \
    shared_is_region=$(echo "$common" | grep -c 'memfd:p2pvm-channel') \
    anonymous_slots=$(cat "$WORK/s.ids" "$WORK/c.ids" | grep -c '^|')
# A marker the client VM writes into its own RAM: found there, never in the region.
ask client MARKED "echo \$((7 * 111111))-p2pvm-marker > /tmp/marker.txt; sync; echo 1" > /dev/null
cpid=$(cat "$P2PVMM_HOME/vms/client/pid")
in_ram=0; in_region=0
for fd in /proc/$cpid/fd/*; do
    case $(readlink "$fd") in
    *memfd:p2pvmm-guest-ram*) in_ram=$((in_ram + $(grep -ac 777777-p2pvm-marker "$fd"))) ;;
    *memfd:p2pvm-channel*) in_region=$((in_region + $(grep -ac 777777-p2pvm-marker "$fd"))) ;;
    esac
done
result marker_in_client_ram=$in_ram marker_in_region=$in_region

# The figures: p2pvmm's of both VMs (on the TAP's host side, its default)
# and the service VM's node's own (on the VM's side). Each scrape goes to
# the console as `P2PVM-SCRAPE <tag> <line>`; the test parses them.
scrape() { curl -s --noproxy '*' --max-time 10 "http://$1/metrics" | sed "s/^/P2PVM-SCRAPE $2 /"; }
scrape 10.99.0.1:9101 vmm-before
scrape 10.99.0.2:9100 node-before
# The operator's dashboard, from the test host (the token is in the service
# VM's data directory): logged in, its VMs page shows both VMs running.
admin=$(ask service ADMINTOK "cat /var/lib/p2pd/admin.token")
dash() { curl -s --noproxy '*' --max-time 20 -b "$WORK/jar" -c "$WORK/jar" "$@"; }
vms_page() {
    rm -f "$WORK/jar"
    dash -o /dev/null -d "token=$admin" http://10.99.0.2:9100/login
    dash http://10.99.0.2:9100/vms > "$WORK/vms.html"
}
vms_page
for vm in service client; do
    grep -q "id=\"vm-$vm\" data-state=\"running\"" "$WORK/vms.html" && result dashboard_vm_$vm=running
done
grep -q 'id="vm-service"' "$WORK/vms.html" || { echo "the dashboard's VMs page:"; head -c 2000 "$WORK/vms.html"; echo; }

# A host-mode node in the test host, on the service VM's TAP.
mkdir -p "$WORK/hn"
printf 'mdns = false\nlisten = ["/ip4/10.99.0.1/tcp/4002"]\n[virus]\nenabled = false\n' > "$WORK/hn.toml"
# (Connections and gossipsub at debug: what to read if pubsub fails.)
p2pd --config "$WORK/hn.toml" --data-dir "$WORK/hn" \
    --log info,p2p_service_vm::node=debug,libp2p_gossipsub=debug > "$WORK/hn.log" 2>&1 &
hn() { p2pctl --socket "$WORK/hn/api.sock" "$@"; }
i=0; while [ ! -S "$WORK/hn/api.sock" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
hpeer=$(hn info | peer_of)
hn connect "/ip4/10.99.0.2/tcp/4001/p2p/$peer" && result host_connected=yes
# Content from the client VM to the host-mode node...
csum=$(ask client UPSUM "head -c 1048576 /dev/urandom > /tmp/up.bin; sha256sum /tmp/up.bin | cut -c1-64")
ccid=$(ask client UPCID "p2pctl publish /tmp/up.bin | head -1" 120)
echo "the host-mode node fetches $ccid"
timeout 150 p2pctl --socket "$WORK/hn/api.sock" get "$ccid" -o "$WORK/got.bin" > "$WORK/get.log" 2>&1
if [ "$(sha256sum "$WORK/got.bin" 2>/dev/null | cut -c1-64)" = "$csum" ]; then
    result client_to_host=verified
else
    echo "fetch failed:"; tail -5 "$WORK/get.log"; echo "host-mode node's log:"; tail -30 "$WORK/hn.log"
fi
# ...and from the host-mode node to the client VM.
head -c 786432 /dev/urandom > "$WORK/h.bin"
hsum=$(sha256sum "$WORK/h.bin" | cut -c1-64)
hcid=$(hn publish "$WORK/h.bin" | head -1)
got=$(ask client DLSUM "p2pctl get $hcid -o /tmp/dl.bin > /tmp/dl.log 2>&1; sha256sum /tmp/dl.bin | cut -c1-64" 180)
[ -n "$got" ] && [ "$got" = "$hsum" ] && result host_to_client=verified
# Pubsub both ways (the mesh forms within seconds: each side publishes once
# a second until the other has received).
pubsub_start=$(uptime_s)
hn pubsub sub vm-out --count 1 > "$WORK/hsub.txt" 2>&1 &
type_on client "p2pctl pubsub sub vm-in --count 1 > /tmp/sub.txt 2>&1 &"
type_on client "( for i in \$(seq 90); do p2pctl pubsub pub vm-out from-client >> /tmp/pub.log 2>&1; sleep 1; done ) &"
( for _ in $(seq 90); do hn pubsub pub vm-in from-host >> "$WORK/hpub.log" 2>&1; sleep 1; done ) &
pubber=$!
sub=$(ask client SUBIN "for i in \$(seq 90); do grep -q from-host /tmp/sub.txt && break; sleep 1; done; grep -c from-host /tmp/sub.txt" 150)
kill $pubber 2>/dev/null
wait_for "$WORK/hsub.txt" from-client 90
result pubsub_to_client=$sub pubsub_to_host=$(grep -c from-client "$WORK/hsub.txt") \
    pubsub_s=$(since "$pubsub_start")
if [ "$sub" != 1 ] || ! grep -q from-client "$WORK/hsub.txt"; then
    # What each side knew: who is connected, who it thinks subscribed.
    echo "pubsub failed; host-mode node's peers:"; hn peers
    echo "its subscribers of vm-in:"; hn pubsub peers vm-in
    echo "its subscription (vm-out):"; cat "$WORK/hsub.txt"
    echo "the client's subscription (vm-in): $(ask client SUBTXT "tr '\n' ' ' < /tmp/sub.txt")"
    echo "the client's publishes (vm-out): $(ask client PUBLOG "sort /tmp/pub.log | uniq -c | tr '\n' ' '")"
    echo "the host-mode node's publishes (vm-in):"; sort "$WORK/hpub.log" | uniq -c
    type_on service "p2pctl peers; p2pctl pubsub peers vm-out; echo PUBSUB-DIAG-END"
    wait_for "$slog" "^PUBSUB-DIAG-END" 60
    echo "host-mode node's log:"; grep -aiE "gossip|connect|dial" "$WORK/hn.log" | tail -40
fi

# The transfers above moved the figures.
scrape 10.99.0.1:9101 vmm-after
scrape 10.99.0.2:9100 node-after

# Beyond the test host: a node on a segment of its own (a namespace behind a
# veth), which the service VM reaches only through the NAT `up` set up, and
# which reaches the service VM only through the port `up` forwards.
nft list tables > "$WORK/nft-during.txt" 2>&1
result nat_table_during=$(grep -c 'table ip p2pvm_p2pvm0' "$WORK/nft-during.txt")
# (iproute2 by its path: busybox's shell runs its own `ip` applet first.)
ipr="$ROOT/opt/ip"
$ipr netns add seg && $ipr link add segh type veth peer name segv && $ipr link set segv netns seg \
    && $ipr addr add 10.98.0.1/24 dev segh && $ipr link set segh up \
    && $ipr -n seg addr add 10.98.0.2/24 dev segv && $ipr -n seg link set segv up \
    && $ipr -n seg link set lo up && $ipr -n seg route add default via 10.98.0.1 \
    || echo "the segment could not be made"
mkdir -p "$WORK/seg"
printf 'mdns = false\nlisten = ["/ip4/10.98.0.2/tcp/4003"]\n[nat]\nupnp = false\n[virus]\nenabled = false\n' > "$WORK/seg.toml"
$ipr netns exec seg p2pd --config "$WORK/seg.toml" --data-dir "$WORK/seg" --log info > "$WORK/seg.log" 2>&1 &
sg() { p2pctl --socket "$WORK/seg/api.sock" "$@"; }
i=0; while [ ! -S "$WORK/seg/api.sock" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
segpeer=$(sg info | peer_of)
# Out: the service VM's node dials the segment's; the segment sees the test
# host's address on the segment, not the VM's.
out=$(ask service SEGOUT "p2pctl connect /ip4/10.98.0.2/tcp/4003/p2p/$segpeer > /tmp/seg.txt 2>&1; echo \$?" 60)
result vm_dialled_segment=$out
# (Its connection to the service VM's node, picked by the VM's peer id: by
# now the segment's node may also have met the test host's own node through
# the DHT. p2pctl's JSON keys are sorted, so an entry's connections come
# before its peer id.)
seen=$(sg peers --json 2>/dev/null | tr ',' '\n' | awk -v p="$peer" '
    /"remote_addr"/ && r == "" { r = $0 }
    /"peer_id"/ { if (index($0, p)) { print r; exit } r = "" }')
echo "the segment's node sees the service VM at: $seen"
case $seen in *10.98.0.1/tcp/*) result segment_saw_vm_at_host=yes ;; esac
# The VM's node learns the test host's address on the segment as its own:
# the segment's node dialled it back through the forwarded port.
ext=$(ask service EXT "for i in \$(seq 60); do p2pctl info > /tmp/ext.txt 2>&1; grep -q '10.98.0.1/tcp/4001' /tmp/ext.txt && break; sleep 1; done; grep -c '10.98.0.1/tcp/4001' /tmp/ext.txt" 90)
result vm_external_on_segment=$ext
[ "$ext" = 1 ] || { echo "the service VM's info:"; type_on service "cat /tmp/ext.txt; echo EXT-END"; wait_for "$slog" "^EXT-END" 30; tail -20 "$slog"; echo; }
# In: a fresh node on the segment, which knows only the test host's address.
printf 'mdns = false\nlisten = ["/ip4/10.98.0.2/tcp/4004"]\n[nat]\nupnp = false\n[virus]\nenabled = false\n' > "$WORK/seg2.toml"
mkdir -p "$WORK/seg2"
$ipr netns exec seg p2pd --config "$WORK/seg2.toml" --data-dir "$WORK/seg2" --log info > "$WORK/seg2.log" 2>&1 &
i=0; while [ ! -S "$WORK/seg2/api.sock" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if p2pctl --socket "$WORK/seg2/api.sock" connect "/ip4/10.98.0.1/tcp/4001/p2p/$peer" > "$WORK/seg2-connect.txt" 2>&1; then
    result segment_reached_vm=yes
else
    echo "the segment's second node could not reach the VM:"; cat "$WORK/seg2-connect.txt"
fi

# EICAR from the client VM: refused by clamd in the service VM, by name.
eicar=WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=
refused=$(ask client EICAR "echo $eicar | base64 -d > /tmp/e.txt; p2pctl publish /tmp/e.txt 2>&1 | tr '\n' ' '" 120)
echo "EICAR publish said: $refused"
case $refused in *P2pvm.Test.Eicar*) result eicar_refused_by_name=yes ;; esac

# The operator's credit table, typed on the service VM's console.
type_on service "p2pctl credit list; echo CREDIT-END"
# (Not anchored at line starts: a kernel message may land mid-line on a
# serial console; the typed command holds neither pattern.)
wait_for "$slog" "^CREDIT-END" 120 || echo "no CREDIT-END from the service VM in 120 s"
if grep -aq "PEER  *SCORE" "$slog"; then result credit_header=yes; else
    echo "no credit table header; the service VM's console:"; tail -40 "$slog"; fi
grep -aq "$hpeer  *[0-9]" "$slog" && result credit_row_for_host_node=yes

# A hostile program in the client VM: garbage into the region, the doorbell
# rung in a loop, for 20 s.
spid=$(cat "$P2PVMM_HOME/vms/service/pid")
boots_before_hostile=$(client_boots)
type_on client "cat > /tmp/hostile.sh <<'END'
for d in /sys/bus/pci/devices/*; do [ \"\$(cat \$d/vendor)\" = 0x1af4 ] && [ \"\$(cat \$d/device)\" = 0x1110 ] && dev=\$d; done
bar0=\$(sed -n 1p \$dev/resource | cut -d' ' -f1); bar2=\$(sed -n 3p \$dev/resource | cut -d' ' -f1)
end=\$((\$(cut -d. -f1 /proc/uptime) + 20)); n=0
while [ \$(cut -d. -f1 /proc/uptime) -lt \$end ]; do
  dd if=/dev/urandom of=/dev/mem bs=4096 count=64 seek=\$((bar2 / 4096)) conv=notrunc 2>/dev/null
  for i in 1 2 3 4 5 6 7 8; do printf '\\001\\000\\000\\000' | dd of=/dev/mem bs=4 seek=\$(((bar0 + 12) / 4)) conv=notrunc 2>/dev/null; done
  n=\$((n + 1)); echo HOSTILE-ROUND-\$n >&2
done
echo \$n
END"
# Each round is counted on the console as it ends, not only in the last
# answer: that survives a line split by a kernel message, or a reset of the
# client guest under the program (then the answer never comes, and it is
# not run again).
reask=no
ask client HOSTILE "sh /tmp/hostile.sh" 180 > /dev/null || echo "the hostile program gave no final answer; counting its rounds on the console"
reask=yes
result hostile_rounds=$(grep -ac 'HOSTILE-ROUND-[0-9]' "$clog")
speer2=$(ask service SPEER2 "p2pctl info | sed -n 's/^peer id: *//p'")
spid2=$(cat "$P2PVMM_HOME/vms/service/pid")
if [ "$speer2" = "$peer" ] && [ "$spid2" = "$spid" ] && kill -0 "$spid"; then
    result service_survived_hostile=yes
else
    echo "after the hostile program: service peer '$speer2' (was $peer), service VMM pid $spid2 (was $spid)"
    echo "p2pvmm up's log:"; tail -20 "$WORK/up.log"; echo "the service VM's console:"; tail -60 "$slog"
fi
# The hostile program is root in the client VM and scribbles on physical
# memory: its own guest may reset itself (that is its business), but the
# client's VMM process must live on. After a guest reset the shell that held
# the app's token is gone: export it again.
cpid2=$(cat "$P2PVMM_HOME/vms/client/pid")
[ "$cpid2" = "$cpid" ] && kill -0 "$cpid" && result client_vmm_survived_hostile=yes
if [ "$(client_boots)" -gt "$boots_before_hostile" ]; then
    client_came_back "under the hostile program (its VMM pid $cpid2, was $cpid)"
    result client_guest_reset=yes
fi
good=$(ask client GOOD "for i in \$(seq 90); do p2pctl info > /tmp/i.txt 2>&1 && break; sleep 1; done; sed -n 's/^peer id: *//p' /tmp/i.txt" 150)
result good_session_after_hostile=$good

# The service VM killed mid-session: restarted by `up`; the app's next
# request works; identity, content and credit ledger survived (store disk).
type_on client "p2pctl events > /tmp/events.txt 2>&1 &"
sleep 2
kill -9 "$spid"
i=0; while [ "$(cat "$P2PVMM_HOME/vms/service/pid" 2>/dev/null)" = "$spid" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
wait_for "$slog" "p2pd is up" 300 || tail -40 "$slog"
rpeer=$(ask client RPEER "for i in \$(seq 120); do p2pctl info > /tmp/r.txt 2>&1 && break; sleep 1; done; sed -n 's/^peer id: *//p' /tmp/r.txt" 200)
result peer_after_restart=$rpeer
has=$(ask client HAS "p2pctl ls | grep -c $ccid")
result content_after_restart=$has
type_on service "p2pctl credit list; echo CREDIT2-END"
wait_for "$slog" "^CREDIT2-END" 120 || echo "no CREDIT2-END from the service VM in 120 s"
grep -aq "$hpeer  *[0-9]" "$slog" && result credit_row_after_restart=yes
# p2pvmm counted the restart; the restarted node's dashboard shows it.
scrape 10.99.0.1:9101 vmm-end
vms_page
restarts=$(sed -n 's/.*id="vm-service" data-state="running" data-restarts="\([0-9]*\)".*/\1/p' "$WORK/vms.html")
result dashboard_service_restarts=$restarts

kill -TERM "$up"
wait "$up"
result up_exit=$?
# `up` took its NAT away with it, and nothing else.
result nat_table_after=$(nft list tables 2>&1 | grep -c 'table ip p2pvm_p2pvm0')
result forwarding_after=$(cat /proc/sys/net/ipv4/ip_forward)
