#!/usr/bin/env bash
# Runs every test of the workspace: unit, property and end-to-end (real p2pd
# processes on loopback, a real clamd; Debian's kernel under our VMM in a
# nested test host, see tests/vm/README.md). The end-to-end tests spawn the workspace
# binaries, so they are built first; clamd is started if it is not running.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"
cargo build --workspace --bins --locked
# The VMM runs in release inside the nested test host (tests/vm): its exit
# handling runs emulated there, and a debug build is several times slower.
cargo build --release --locked -p vmm --bin p2pvmm
# The virus filter is tested against a real clamd (apt-get install clamav-daemon).
export P2PVM_CLAMD_SOCKET="${P2PVM_CLAMD_SOCKET:-$(./scripts/clamd.sh)}"
cargo test --workspace --locked --all-targets
