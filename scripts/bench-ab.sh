#!/usr/bin/env bash
# Compares two builds of the project on the same benches in one sitting: an
# older revision (OLD) and the working tree's HEAD (or NEW). Each side's
# release binaries and bench executables are built once and copied aside;
# then the benches run interleaved, old and new in turn with the order
# flipped every round (ABBA), so a machine that gets busier or quieter
# during the measurement weighs on both sides alike. Every bench measures its
# own baseline (raw TCP, a raw Unix echo) in the same run, so the ratios of
# the two sides can be compared even where absolute figures drift.
#
#   scripts/bench-ab.sh OLD [--new REV] [--rounds N] [--bench NAME]... [--out DIR]
#
#   OLD, REV   any git revision (a commit, a tag, a branch)
#   --out      where the sides and logs go; a side already built there for
#              the same revision is used again
#   --rounds   rounds of the ABBA pattern; each round runs every bench twice
#              per side (default 1)
#   --bench    a bench of tests/benches (default: api_rtt and content_transfer)
#
# Prints each run's result lines side by side, and `uptime` before each
# run: say what else the machine was doing when you quote the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"

old=
new=HEAD
rounds=1
benches=()
out=
while [ $# -gt 0 ]; do
    case "$1" in
    --new) new="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --bench) benches+=("$2"); shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -*) echo "unknown argument $1" >&2; exit 2 ;;
    *) old="$1"; shift ;;
    esac
done
[ -n "$old" ] || { echo "usage: $0 OLD [--new REV] [--rounds N] [--bench NAME]... [--out DIR]" >&2; exit 2; }
[ ${#benches[@]} -gt 0 ] || benches=(api_rtt content_transfer)
out="${out:-$(mktemp -d -t p2pvm-bench-ab.XXXXXX)}"
mkdir -p "$out"

# Builds REV in a worktree of its own (the shared build cache keeps the
# dependencies) and copies its p2pd, p2pctl and bench executables to DIR.
build_side() {
    local rev="$1" dir="$2" side="$3"
    # A side built before into this --out folder is used again.
    local have=1
    for b in p2pd p2pctl "${benches[@]}"; do [ -x "$dir/$b" ] || have=; done
    if [ -n "$have" ] && [ "$(cat "$dir/revision" 2>/dev/null)" = "$(git log --oneline -1 "$rev")" ]; then
        echo "using the $side side built before in $dir" >&2
        return
    fi
    # The same place each time: cargo then rebuilds only what changed.
    local tree="${TMPDIR:-/tmp}/p2pvm-ab-$side"
    git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
    git worktree add --detach "$tree" "$rev" >/dev/null
    mkdir -p "$dir"
    git -C "$tree" log --oneline -1 >"$dir/revision"
    local bench_args=()
    for b in "${benches[@]}"; do bench_args+=(--bench "$b"); done
    (
        cd "$tree"
        cargo build --release --locked --bins -p p2p-service-vm -p p2pvm-e2e
        cargo bench --locked --no-run -p p2pvm-e2e "${bench_args[@]}" 2>&1 | tee "$dir/bench-build.log"
    ) >&2
    cp "$CARGO_TARGET_DIR/release/p2pd" "$CARGO_TARGET_DIR/release/p2pctl" "$dir/"
    for b in "${benches[@]}"; do
        local exe
        exe="$(sed -n "s|.*Executable benches/$b.rs (\(.*\))|\1|p" "$dir/bench-build.log" | tail -1)"
        [ -x "$exe" ] || { echo "no executable for bench $b of $rev" >&2; exit 1; }
        cp "$exe" "$dir/$b"
    done
    git worktree remove --force "$tree"
    built=1
}

echo "building $old (old) and $new (new) into $out" >&2
build_side "$old" "$out/old" old
build_side "$new" "$out/new" new
# Cargo tells fresh from stale by file times, and both trees share the
# build cache under the same names: their fresh checkouts left artifacts
# newer than this tree's files, which its next build would take as its own.
[ -z "${built:-}" ] || git ls-files -z | xargs -0 touch

run() {
    local side="$1" bench="$2" n="$3"
    local log="$out/$side-$bench-$n.log"
    {
        echo "== $side ($(cat "$out/$side/revision")) $bench run $n; $(uptime)"
        P2PVM_BIN_DIR="$out/$side" "$out/$side/$bench" --bench 2>&1
    } | tee "$log" | grep -E "^==|ratio|p50|MiB/s|CPU s per|first verified|publish" || true
}

n=0
for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) -eq 1 ]; then order=(old new new old); else order=(new old old new); fi
    for side in "${order[@]}"; do
        n=$((n + 1))
        for b in "${benches[@]}"; do run "$side" "$b" "$n"; done
    done
done
echo "logs: $out" >&2
