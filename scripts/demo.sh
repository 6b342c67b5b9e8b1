#!/usr/bin/env bash
# The main job for now: a small local network of three p2pd nodes on loopback
# and demo apps using the shared node's API: a pubsub chat between two nodes, an
# echo service found via the service registry, and content sharing (publish,
# search across the network, verified fetch, the virus filter on a real clamd,
# peer credit).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/p2pvm-target}"
cargo build --workspace --bins --examples --locked -q
BIN="$CARGO_TARGET_DIR/debug"
WORK=$(mktemp -d /tmp/p2pvm-demo.XXXXXX)
CLAMD_SOCKET=$(./scripts/clamd.sh)
printf '[virus]\nclamd_socket = "%s"\n' "$CLAMD_SOCKET" >"$WORK/p2pd.toml"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_node() { # name [bootstrap]
  local dir="$WORK/$1"
  local args=(--config "$WORK/p2pd.toml" --data-dir "$dir" --no-mdns --listen /ip4/127.0.0.1/tcp/0 --listen /ip4/127.0.0.1/udp/0/quic-v1)
  [ -n "${2:-}" ] && args+=(--bootstrap "$2")
  P2PD_LOG=warn "$BIN/p2pd" "${args[@]}" 2>"$WORK/$1.log" &
  PIDS+=($!)
  for _ in $(seq 100); do [ -S "$dir/api.sock" ] && break; sleep 0.05; done
  for _ in $(seq 100); do
    "$BIN/p2pctl" --socket "$dir/api.sock" --json info 2>/dev/null | grep -q '"/ip4' && return 0
    sleep 0.05
  done
  echo "node $1 did not start; log:" >&2; cat "$WORK/$1.log" >&2; exit 1
}
addr_of() {
  "$BIN/p2pctl" --socket "$WORK/$1/api.sock" --json info |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print([a for a in d["listen_addrs"] if "/tcp/" in a][0]+"/p2p/"+d["peer_id"])'
}
ctl() { local n=$1; shift; "$BIN/p2pctl" --socket "$WORK/$n/api.sock" "$@"; }

echo "== starting three nodes on loopback"
start_node alpha
start_node beta "$(addr_of alpha)"
start_node gamma "$(addr_of beta)"
for n in alpha beta gamma; do echo "  $n: $(ctl $n --json info | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])')"; done

echo "== issuing per-app tokens (admin capability from each node's admin.token)"
TOK_A=$(ctl alpha app issue chat)
TOK_G=$(ctl gamma app issue chat)
TOK_E=$(ctl beta app issue echo)
TOK_C=$(ctl alpha app issue echo-client)

echo "== chat: an app on alpha and an app on gamma exchange messages"
P2PVM_API_SOCKET="$WORK/gamma/api.sock" P2PVM_TOKEN="$TOK_G" \
  timeout 60 "$BIN/examples/chat" --room lobby --say "hello from gamma" --count 1 >"$WORK/chat-gamma.out" &
G=$!
P2PVM_API_SOCKET="$WORK/alpha/api.sock" P2PVM_TOKEN="$TOK_A" \
  timeout 60 "$BIN/examples/chat" --room lobby --say "hello from alpha" --count 1 >"$WORK/chat-alpha.out"
wait $G
echo "  alpha saw:"; sed 's/^/    /' "$WORK/chat-alpha.out"
echo "  gamma saw:"; sed 's/^/    /' "$WORK/chat-gamma.out"
grep -q "hello from gamma" "$WORK/chat-alpha.out"
grep -q "hello from alpha" "$WORK/chat-gamma.out"

echo "== echo: a service on beta, found through the service registry from alpha"
P2PVM_API_SOCKET="$WORK/beta/api.sock" P2PVM_TOKEN="$TOK_E" "$BIN/examples/echo" serve 2>/dev/null &
PIDS+=($!)
for _ in $(seq 100); do ctl beta service find echo 2>/dev/null | grep -q . && break; sleep 0.1; done
REPLY=$(P2PVM_API_SOCKET="$WORK/alpha/api.sock" P2PVM_TOKEN="$TOK_C" "$BIN/examples/echo" call "ping over an app-defined protocol")
echo "  reply: $REPLY"
[ "$REPLY" = "ping over an app-defined protocol" ]

echo "== content: gamma publishes a file; alpha finds it by keyword and fetches it verified"
head -c 3000000 /dev/urandom >"$WORK/film.bin"
ctl gamma publish "$WORK/film.bin" --name "Demo Film.webm" --tag "open movie" --tag demo
ID=$(ctl gamma --json ls | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["content_id"])')
for _ in $(seq 100); do ctl alpha search demo film 2>/dev/null | grep -q "$ID" && break; sleep 0.1; done
ctl alpha search demo film
ctl alpha get "$ID" -o "$WORK/film.copy"
cmp "$WORK/film.bin" "$WORK/film.copy" && echo "  fetched copy is byte-identical"
echo "== the virus filter refuses the EICAR test file"
printf '%s' 'X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*' >"$WORK/eicar.com"
if ctl beta publish "$WORK/eicar.com" 2>"$WORK/eicar.err"; then echo "EICAR was accepted!" >&2; exit 1; fi
echo "  refused: $(head -1 "$WORK/eicar.err")"
echo "== peer credit on alpha, as its operator sees it"
ctl alpha credit list

echo "== sessions on alpha, as its operator sees them"
ctl alpha sessions
echo "demo OK"
