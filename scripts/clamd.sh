#!/usr/bin/env bash
# Starts a clamd for p2pvm's virus filter (tests, development) with the project's
# signature database, on a Unix socket, and waits until it answers.
# Prints the socket path. Usage: scripts/clamd.sh [start|stop]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${P2PVM_CLAMD_DIR:-/tmp/p2pvm-clamd}"
sock="$dir/clamd.sock"
case "${1:-start}" in
stop)
    if [ -f "$dir/clamd.pid" ]; then kill "$(cat "$dir/clamd.pid")" 2>/dev/null || true; fi
    exit 0 ;;
esac
if ! command -v clamd >/dev/null; then
    # A fresh Debian machine: install ClamAV's daemon (no signature download needed).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends clamav-daemon; } >&2
    else
        echo "clamd is not installed: apt-get install clamav-daemon" >&2
        exit 1
    fi
fi
mkdir -p "$dir/db"
cp "$root"/security/clamav/*.ndb "$root"/security/clamav/*.hdb "$dir/db/"
if [ -S "$sock" ] && [ -f "$dir/clamd.pid" ] && kill -0 "$(cat "$dir/clamd.pid")" 2>/dev/null; then
    echo "$sock"; exit 0
fi
cat > "$dir/clamd.conf" <<CONF
LocalSocket $sock
LocalSocketMode 666
DatabaseDirectory $dir/db
PidFile $dir/clamd.pid
LogFile $dir/clamd.log
Foreground no
# Items are shared whole; scan them whole (defaults stop at 25-100 MB).
StreamMaxLength 4000M
MaxFileSize 4000M
MaxScanSize 4000M
MaxThreads 4
CONF
rm -f "$sock"
clamd -c "$dir/clamd.conf"
for _ in $(seq 1 100); do
    [ -S "$sock" ] && { echo "$sock"; exit 0; }
    sleep 0.2
done
echo "clamd did not start; see $dir/clamd.log" >&2
exit 1
