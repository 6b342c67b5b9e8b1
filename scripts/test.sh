#!/usr/bin/env bash
# Runs every test of the workspace: unit, property and end-to-end (real p2pd
# processes on loopback). The end-to-end tests spawn the workspace binaries, so
# they are built first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"
cargo build --workspace --bins --locked
cargo test --workspace --locked --all-targets
