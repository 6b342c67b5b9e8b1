#!/usr/bin/env bash
# The main job: the split platform on this machine. Builds the binaries, starts
# a clamd with the project's signature database, and runs `p2pvmm up`: the P2P
# service (p2pd) in its sandbox behind the shared-memory channel, the front-end
# serving apps on the socket it prints. Ctrl-C stops everything.
#
#   P2PVMM_HOME   state directory (default ~/.local/share/p2pvmm)
#   extra arguments go to `p2pvmm up`, e.g. `-- --listen /ip4/0.0.0.0/tcp/4001`
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"
# The sandbox uses util-linux's unshare, nsenter and setpriv.
if ! command -v unshare >/dev/null || ! command -v nsenter >/dev/null || ! command -v setpriv >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq util-linux
fi
cargo build --release --bins --locked
clamd_socket="$(./scripts/clamd.sh)"
home="${P2PVMM_HOME:-$HOME/.local/share/p2pvmm}"
mkdir -p "$home"
config="$home/p2pd.toml"
if [ ! -e "$config" ]; then
    printf '[virus]\nclamd_socket = "%s"\n' "$clamd_socket" > "$config"
fi
exec "$CARGO_TARGET_DIR/release/p2pvmm" --home "$home" up --config "$config" "$@"
