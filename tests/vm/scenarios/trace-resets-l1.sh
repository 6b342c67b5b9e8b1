# L1 of `testhost trace-resets`: the platform's two VMs under load (API round
# trips, a stream, a command typed on the client's console, in turns) with
# the test host's KVM tracepoints recording, until a guest resets itself or
# $ITERATIONS turns pass; then the last KVM events of the vCPU that shut
# down (a triple fault), and of the other VM's, are printed. Tracing makes
# such resets come much sooner here (docs/vm-mode.md, "Guest resets under
# the emulator").
ITERATIONS=${ITERATIONS:-150}
export P2PVMM_HOME="$WORK/home"
export PATH="$ROOT/opt:$PATH"
link_images "$WORK/images"
slog="$P2PVMM_HOME/vms/service/console.log"; clog="$P2PVMM_HOME/vms/client/console.log"
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
T=/sys/kernel/tracing
[ -e $T/trace ] || { echo "no tracefs in the test host"; exit 1; }
echo 16384 > $T/buffer_size_kb
for e in kvm_exit kvm_entry kvm_inj_virq kvm_inj_exception kvm_msi_set_irq kvm_set_irq \
    kvm_apic_accept_irq kvm_page_fault kvm_emulate_insn kvm_pio kvm_mmio kvm_msr kvm_eoi \
    kvm_ioapic_set_irq kvm_userspace_exit kvm_vcpu_wakeup kvm_pv_eoi kvm_cr kvm_apic kvm_fast_mmio; do
    [ -e $T/events/kvm/$e/enable ] && echo 1 > $T/events/kvm/$e/enable
done
"$P2PVMM" up --isolation vm --images "$WORK/images" --no-net \
    --cmdline-extra "p2pvm.log=console p2pvm.loglevel=warn,p2pvm_channel=info" >> "$WORK/up.log" 2>&1 &
up=$!
wait_for "$slog" "p2pd is up" 300 || { tail -30 "$slog"; cat "$WORK/up.log"; exit 1; }
wait_for "$clog" "front-end is up" 300 || { tail -30 "$clog"; exit 1; }
follow service
follow client
echo "test host: $(cat /proc/cmdline)"
resets() { grep -a -c "guest reset: booting again" "$WORK/up.log"; }
# Stop recording at once, so that the fault stays in the ring buffer.
( while [ "$(resets)" = 0 ]; do sleep 0.1; done; echo 0 > $T/tracing_on ) &
echo 1 > $T/tracing_on
tok=$(ask service TOKEN "p2pctl app issue tracer")
capp() { ask client "$1" "P2PVM_TOKEN=$tok $2" ${3:+"$3"}; }
cid=$(ask service CID "head -c 67108864 /dev/urandom > /var/lib/p2pd/t.bin && p2pctl publish /var/lib/p2pd/t.bin | head -1; rm -f /var/lib/p2pd/t.bin" 600)
n=0
while [ "$(resets)" = 0 ] && [ $n -lt "$ITERATIONS" ]; do
    n=$((n + 1))
    capp "R$n" "p2pvm-apibench --rounds 300 2>&1 | tr '\n' ' '" 120 > /dev/null
    capp "S$n" "p2pvm-apibench --rounds 3 --fetch $cid 2>&1 | tr '\n' ' '" 300 > /dev/null
    ask client "E$n" "echo typed-$n" 60 > /dev/null
done
sleep 1
echo 0 > $T/tracing_on
result test=trace_resets iterations=$n resets=$(resets)
grep -a -E "triple fault|guest reset" "$WORK/up.log"
cat $T/trace > "$WORK/trace.txt"
ln=$(grep -a -n "kvm_exit.*reason shutdown" "$WORK/trace.txt" | head -1 | cut -d: -f1)
if [ -n "$ln" ]; then
    task=$(sed -n "${ln}p" "$WORK/trace.txt" | awk '{print $1}')
    echo "the shutdown: $task, trace line $ln"
    head -n "$ln" "$WORK/trace.txt" | grep -a -F -- "$task " | tail -"${TRACE_LINES:-200}" | sed 's/^/TRACE /'
    echo "the other vCPUs just before:"
    head -n "$ln" "$WORK/trace.txt" | grep -a -v -F -- "$task " | tail -40 | sed 's/^/OTHER /'
fi
kill -TERM "$up"; wait "$up"
true
