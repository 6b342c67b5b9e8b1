#!/usr/bin/env bash
# Runs every test of the workspace: unit, property and end-to-end (real p2pd
# processes on loopback, a real clamd; Debian's kernel under our VMM in a
# nested test host, see tests/vm/README.md). Sets itself up on a fresh machine:
# installs the Debian packages the tests need (scripts/deps.sh; as root, else
# it says what to install), builds the binaries the end-to-end tests spawn,
# starts a clamd. Every test binary runs even when an earlier one fails; a
# summary of what failed closes the output.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"

# Hermetic: nothing the user exported for their own node (the API socket, a
# token, a data directory, log levels) reaches the tests or what they spawn.
scrubbed=()
while IFS='=' read -r name _; do
    case "$name" in
    P2PVM_* | P2PVMM_* | P2PD_* | P2P_FRONTEND_* | RUST_LOG)
        scrubbed+=("$name")
        unset "$name"
        ;;
    esac
done < <(env)
if [ ${#scrubbed[@]} -gt 0 ]; then
    echo "test.sh: not passing on ${scrubbed[*]} (tests are hermetic)"
fi

# Where the time goes, in the summary: CI has a budget.
phases=()
phase() {
    phases+=("$(printf '%5ds  %s' "$SECONDS" "$1")")
    echo "== [${SECONDS}s] $1"
}

phase "packages (scripts/deps.sh test)"
./scripts/deps.sh test

phase "debug binaries"
cargo build --workspace --bins --locked
# The nested test host (tests/vm) runs release builds: p2pvmm (its exit
# handling runs emulated there; debug is several times slower) and the VM
# images' programs, all made by the one cargo invocation the image builder
# uses (the tests would make it too; here its output is in plain sight).
phase "release binaries and VM images"
cargo run -q --locked -p p2pvm-images -- release

# The virus filter is tested against a real clamd; one started here is
# stopped at the end, one already running (scripts/up.sh's) is left alone.
clamd_dir=/tmp/p2pvm-clamd
if ! { [ -f "$clamd_dir/clamd.pid" ] && kill -0 "$(cat "$clamd_dir/clamd.pid")" 2>/dev/null; }; then
    trap './scripts/clamd.sh stop' EXIT
fi
P2PVM_CLAMD_SOCKET="$(./scripts/clamd.sh)"
export P2PVM_CLAMD_SOCKET

log="$(mktemp -t p2pvm-test.XXXXXX.log)"
phase "cargo test (builds the tests, then runs them)"
set +e
cargo test --workspace --locked --all-targets --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The swarms (tests/tests/swarm.rs) are ignored above: dozens of
# unoptimised p2pds starve two cores. They run here, the (debug) test
# binary against the release p2pds the images step built: a release build
# of its own would compile p2pd and the harness again (cargo unifies
# features per invocation; about 8 minutes here).
phase "the swarms (release p2pds)"
P2PVM_BIN_DIR="$CARGO_TARGET_DIR/release" \
    cargo test --locked -p p2pvm-e2e --test swarm -- --ignored 2>&1 | tee -a "$log"
swarm_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$swarm_status
set -e
phase "end"

echo
echo "== summary (full output: $log)"
echo "time: each phase's start since test.sh began"
printf '  %s\n' "${phases[@]}"
echo "slowest test binaries:"
awk '/^ +Running / { bin = $NF; gsub(/[()]/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin) }
    /^test result:/ { sub(/s$/, "", $NF); printf "%8.1fs  %s\n", $NF, bin }' "$log" |
    sort -rn | head -8 | sed 's/^/  /'
# Tests that could not run here say so in their output; list them, so a
# skip is never mistaken for a pass.
grep -E '(^|[^A-Z])SKIPPED' "$log" | sort -u | sed 's/^/  /' || true
failed_tests="$(grep -E '^test .+ \.\.\. FAILED$' "$log" | sed -E 's/^test (.+) \.\.\. FAILED$/\1/' || true)"
if [ -n "$failed_tests" ]; then
    echo "failed tests:"
    echo "$failed_tests" | sed 's/^/  /'
    # Why, in the summary itself: CI keeps only the end of the output.
    while IFS= read -r t; do
        echo "-- why $t failed (all of its output in $log):"
        awk -v name="---- $t stdout ----" '
            $0 == name { on = 1; p = 0; n = 0; next }
            on && (/^---- .* stdout ----$/ || /^failures:$/) { on = 0 }
            on && /panicked at/ { p = 1 }
            on && p && n < 30 { print "  " $0; n++; next }
            on && /^(RETRY|WARNING):/ { print "  " $0 }' "$log"
    done <<<"$failed_tests"
fi
# A bench or other harness-less binary fails by returning an error from main,
# which prints "Error: ..." and its causes; show them beside the binary's name
# (only on failure: a passing test may print one on purpose).
[ "$status" -eq 0 ] || awk '/^Error: / { print "  " $0; n = 6; next }
    n > 0 && /^( |Caused by:|$)/ { if ($0 != "") print "  " $0; n--; next }
    { n = 0 }' "$log"
# cargo's own list of the test binaries that failed (or did not build).
sed -n '/^error: [0-9]* targets\? failed:/,/^[^ ]/p' "$log" | grep -E '^ +`' | sed 's/^ */  binary: /' || true
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) p += $(i - 1)
            if ($(i) ~ /^failed;?$/) f += $(i - 1)
            if ($(i) ~ /^ignored;?$/) s += $(i - 1)
        }
    }
    END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
if [ "$status" -ne 0 ]; then
    echo "test.sh: FAILED (cargo test exited $status)"
fi
exit "$status"
