#!/usr/bin/env bash
# Measures how often the VM tests pass on their first try: runs the nested
# VM-mode test (tests/vm/tests/vm_mode.rs) and/or the nested VMM tests
# (tests/vm/tests/vmm_linux.rs) N times in a row and prints a table. A run
# that needed the VM-mode test's one retry counts as a first-try failure; the
# reason for every failure is pulled from its log (test-host panic, stall,
# silence, guest reset, failed check).
#
#   scripts/vm-pass-rate.sh [--runs N] [--busy] [--test vm_mode|vmm_linux|both]
#                           [--logs DIR]
#
#   --busy   keeps one core busy (a shell spin loop) for the whole measurement,
#            as other work on a 2-core machine would.
# Environment (what is being compared): P2PVM_TESTHOST_SMP, P2PVM_TESTHOST_CPU,
# P2PVM_TESTHOST_ACCEL, P2PVM_TESTHOST_CMDLINE (tests/vm/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"

runs=20
busy=
which=vm_mode
logs=
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --busy) busy=1; shift ;;
    --test) which="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$which" in
vm_mode) tests=(vm_mode) ;;
vmm_linux) tests=(vmm_linux) ;;
both) tests=(vm_mode vmm_linux) ;;
*) echo "--test vm_mode|vmm_linux|both" >&2; exit 2 ;;
esac
logs="${logs:-$(mktemp -d -t p2pvm-pass-rate.XXXXXX)}"
mkdir -p "$logs"

./scripts/deps.sh test
for t in "${tests[@]}"; do
    cargo test -q --locked -p p2pvm-testhost --test "$t" --no-run
done
# The release VMM and the images' programs, built before the clock starts.
cargo run -q --locked -p p2pvm-images -- release >/dev/null

spinner=
if [ -n "$busy" ]; then
    sh -c 'while :; do :; done' &
    spinner=$!
    trap 'kill $spinner 2>/dev/null || true' EXIT
fi

# reason LOG: the first sign of what went wrong in a failed run's log.
reason() {
    local log="$1" r
    for r in 'corrupted stack end' 'Kernel panic' 'detected stalls' 'triple fault' \
        'silence limit hit' 'total time limit' 'without reporting the L1' \
        'guest reset' 'assertion' 'panicked at'; do
        if grep -aq -- "$r" "$log"; then
            echo "$r"
            return
        fi
    done
    echo "other (see $log)"
}

printf '%-10s %4s  %-22s %6s %5s  %s\n' test run first-try seconds load notes
declare -A first_ok=() total=() recovered=()
for i in $(seq 1 "$runs"); do
    for t in "${tests[@]}"; do
        log="$logs/$t-$i.log"
        load="$(cut -d' ' -f1 /proc/loadavg)"
        start=$(date +%s)
        set +e
        cargo test -q --locked -p p2pvm-testhost --test "$t" -- --nocapture --test-threads 1 >"$log" 2>&1
        status=$?
        set -e
        secs=$(($(date +%s) - start))
        notes=
        if grep -aq '^RETRY:' "$log"; then
            first=fail
            notes="retry: $(grep -a '^RETRY:' "$log" | head -1 | sed 's/.*First run: //' | cut -c1-80)"
            [ "$status" -eq 0 ] && notes="$notes; passed on retry"
        elif [ "$status" -eq 0 ]; then
            first=pass
        else
            first=fail
        fi
        if [ "$status" -ne 0 ]; then
            notes="${notes:+$notes; }failed: $(reason "$log")"
        fi
        if grep -aq 'WARNING: the client guest reset itself' "$log"; then
            notes="${notes:+$notes; }client guest reset (recovered)"
        fi
        if grep -aq 'WARNING: the service guest reset itself' "$log"; then
            notes="${notes:+$notes; }service guest reset (recovered)"
        fi
        if [ "$first" = pass ] && grep -aq 'WARNING: the .* guest reset itself' "$log"; then
            recovered[$t]=$((${recovered[$t]:-0} + 1))
        fi
        total[$t]=$((${total[$t]:-0} + 1))
        [ "$first" = pass ] && first_ok[$t]=$((${first_ok[$t]:-0} + 1))
        printf '%-10s %4d  %-22s %6d %5s  %s\n' "$t" "$i" "$first" "$secs" "$load" "$notes"
    done
done

echo
echo "first-try passes ($([ -n "$busy" ] && echo "one core busy" || echo idle);" \
    "smp=${P2PVM_TESTHOST_SMP:-as the test sets} cpu=${P2PVM_TESTHOST_CPU:-qemu64,+svm,+npt}" \
    "accel=${P2PVM_TESTHOST_ACCEL:-tcg}; logs: $logs):"
for t in "${tests[@]}"; do
    echo "  $t: ${first_ok[$t]:-0}/${total[$t]} (of which ${recovered[$t]:-0} with a guest reset the scenario recovered from)"
done
