#!/usr/bin/env bash
# Runs every test of the workspace: unit, property and end-to-end (real p2pd
# processes on loopback, a real clamd; Debian's kernel under our VMM in a
# nested test host, see tests/vm/README.md). The end-to-end tests spawn the workspace
# binaries, so they are built first; clamd is started if it is not running.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"
cargo build --workspace --bins --locked
# The nested test host (tests/vm) runs release builds: p2pvmm (its exit
# handling runs emulated there; debug is several times slower) and the VM
# images' programs, all made by the one cargo invocation the image builder
# uses (the tests would make it too; here its output is in plain sight).
cargo run -q --locked -p p2pvm-images -- release
# The virus filter is tested against a real clamd (apt-get install clamav-daemon).
export P2PVM_CLAMD_SOCKET="${P2PVM_CLAMD_SOCKET:-$(./scripts/clamd.sh)}"
cargo test --workspace --locked --all-targets
