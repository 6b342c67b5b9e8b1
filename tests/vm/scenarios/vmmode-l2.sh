# L2 of the VM-mode scenario: the same initramfs boots as the service VM or
# the client VM (p2pvm.role= on the command line).
role=$(sed -n 's/.*p2pvm\.role=\([a-z]*\).*/\1/p' /proc/cmdline)
# wait_sock PATH SECONDS
wait_sock() {
    i=0
    while [ ! -S "$1" ] && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    [ -S "$1" ]
}
case $role in
service)
    mkdir -p /tmp/p2pd
    # No clamd in this image yet: the virus filter is off (p2pd says so).
    printf '[virus]\nenabled = false\n' > /tmp/p2pd.toml
    p2pd --config /tmp/p2pd.toml --data-dir /tmp/p2pd --channel-device auto --no-mdns \
        --listen /ip4/127.0.0.1/tcp/0 > /tmp/p2pd.log 2>&1 &
    # p2pd's log on the console.
    tail -f /tmp/p2pd.log &
    wait_sock /tmp/p2pd/api.sock 120 || echo "L2 service: no API socket"
    echo "L2 service peer=$(p2pctl --socket /tmp/p2pd/api.sock info | sed -n 's/^peer id: *//p')"
    echo "L2 token $(p2pctl --socket /tmp/p2pd/api.sock app issue vmtest)"
    setsid cttyhack sh ;;
client)
    p2p-frontend --device auto --socket /tmp/api.sock > /tmp/fe.log 2>&1 &
    tail -f /tmp/fe.log &
    wait_sock /tmp/api.sock 60 || echo "L2 client: no API socket"
    echo "L2 client waiting for a token"
    read -r tok
    export P2PVM_TOKEN="$tok"
    out=$(p2pctl --socket /tmp/api.sock info 2>&1)
    echo "L2 client peer=$(echo "$out" | sed -n 's/^peer id: *//p')"
    [ -n "$(echo "$out" | sed -n 's/^peer id: *//p')" ] || echo "$out"
    setsid cttyhack sh ;;
esac
