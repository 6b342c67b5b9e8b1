#!/usr/bin/env bash
# The main job: the split platform on this machine. Builds the binaries, starts
# a clamd with the project's signature database, and runs `p2pvmm up`. Where
# the machine has hardware virtualization it first builds the two VM images
# (p2pvm-images), and `up` boots the P2P service VM and the client VM (VM
# mode, docs/vm-mode.md); elsewhere (e.g. /dev/kvm is the PVM software
# hypervisor) the P2P service (p2pd) runs in its sandbox behind the
# shared-memory channel, the front-end serving apps on the socket it prints.
# Ctrl-C stops everything.
#
#   P2PVMM_HOME   state directory (default ~/.local/share/p2pvmm)
#   extra arguments go to `p2pvmm up`, e.g. `-- --listen /ip4/0.0.0.0/tcp/4001`
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"
# Hardware virtualization: /dev/kvm, a vmx/svm CPU flag, and not PVM.
vm=
packages=main
if [ -e /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
    vm=1
    packages=vm
fi
# The Debian packages (one list, scripts/deps.sh): the sandbox's util-linux
# and clamd; in VM mode also what the images are built from.
./scripts/deps.sh "$packages"
cargo build --release --bins --locked
clamd_socket="$(./scripts/clamd.sh)"
home="${P2PVMM_HOME:-$HOME/.local/share/p2pvmm}"
mkdir -p "$home"
config="$home/p2pd.toml"
if [ ! -e "$config" ]; then
    printf '[virus]\nclamd_socket = "%s"\n' "$clamd_socket" > "$config"
fi
if [ -n "$vm" ]; then
    cargo run -q --release --locked -p p2pvm-images -- build --out "$home/images"
fi
exec "$CARGO_TARGET_DIR/release/p2pvmm" --home "$home" up --config "$config" "$@"
