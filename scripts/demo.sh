#!/usr/bin/env bash
# Set up (scripts/setup.sh), then a local demo on the embedded defaults: daemon "alice" runs the
# reference signaling server inside itself (127.0.0.1:8765), daemon "bob" registers with it,
# and mvpctl connects them, exchanges chat, JSON and a file, and shows the status. Everything
# it starts is stopped at the end, by PID. Set DEMO_KEEP=1 to leave the daemons running.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d /tmp/mvp-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
[ "${DEMO_KEEP:-}" = 1 ] || trap cleanup EXIT

port=8765
if ss -Hltn "sport = :$port" | grep -q .; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    echo "port 8765 is busy; the embedded signaling server uses $port"
fi
url="ws://127.0.0.1:$port"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$'; printf ' %q' "$@"; printf '\n'; "$@"; }
wait_socket() {
    for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
    echo "demo: $1 did not appear; see $work/*.log" >&2; exit 1
}

step "start alice (with the embedded signaling server on $url) and bob"
AGENT_ID=alice MVPD_SOCKET="$work/alice.sock" SIGNALING_URL="$url" \
    MVPD_SIGNALING_SERVER__ENABLED=true MVPD_SIGNALING_SERVER__LISTEN="127.0.0.1:$port" \
    mvpd run >"$work/alice.log" 2>&1 &
pids+=($!)
wait_socket "$work/alice.sock"
AGENT_ID=bob MVPD_SOCKET="$work/bob.sock" SIGNALING_URL="$url" \
    mvpd run >"$work/bob.log" 2>&1 &
pids+=($!)
wait_socket "$work/bob.sock"

alice() { show mvpctl --socket "$work/alice.sock" "$@"; }
bob() { show mvpctl --socket "$work/bob.sock" "$@"; }

step "chat"
alice connect bob
alice send bob "hello bob, this is alice"
bob recv alice
bob send alice "hi alice"
alice recv bob

step "JSON: reconnect in json mode"
alice disconnect bob
alice connect bob --mode json
alice send bob --json '{"op": "ping", "n": 1}'
bob recv alice

step "a file through a pipe (both sides run mvpctl pipe, like netcat)"
head -c 5000000 /dev/urandom >"$work/file.bin"
mvpctl --socket "$work/bob.sock" pipe alice </dev/null >"$work/copy.bin" &
reader=$!
mvpctl --socket "$work/alice.sock" pipe bob <"$work/file.bin" >/dev/null
wait "$reader"
sha256sum "$work/file.bin" "$work/copy.bin"
cmp "$work/file.bin" "$work/copy.bin" && echo "identical"

step "status"
alice status
bob status

step "disconnect"
alice disconnect bob
sleep 0.5
bob peers
echo
echo "demo done (logs were in $work; removed)"
