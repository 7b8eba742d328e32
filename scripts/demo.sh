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
namespaces=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
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
# Each daemon keeps its identity (its DTLS key) in a state directory of its own.
AGENT_ID=alice MVPD_SOCKET="$work/alice.sock" SIGNALING_URL="$url" MVPD_STATE_DIR="$work/alice" \
    MVPD_SIGNALING_SERVER__ENABLED=true MVPD_SIGNALING_SERVER__LISTEN="127.0.0.1:$port" \
    mvpd run >"$work/alice.log" 2>&1 &
pids+=($!)
wait_socket "$work/alice.sock"
AGENT_ID=bob MVPD_SOCKET="$work/bob.sock" SIGNALING_URL="$url" MVPD_STATE_DIR="$work/bob" \
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

step "TUN mode: an IP tunnel between two network namespaces"
if [ "$(id -u)" != 0 ] || [ ! -e /dev/net/tun ]; then
    echo "skipped: the TUN step needs root and /dev/net/tun (two network namespaces, a veth)"
else
    nsa="mvp-demo-a-$$"; nsb="mvp-demo-b-$$"
    ip netns add "$nsa"; namespaces+=("$nsa")
    ip netns add "$nsb"; namespaces+=("$nsb")
    ip link add mvpdemo-a netns "$nsa" type veth peer name mvpdemo-b netns "$nsb"
    ip -n "$nsa" addr add 10.203.0.1/24 dev mvpdemo-a
    ip -n "$nsb" addr add 10.203.0.2/24 dev mvpdemo-b
    for ns in "$nsa" "$nsb"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "mvpdemo-${ns:9:1}" up
    done
    echo "namespaces $nsa and $nsb joined by a veth (10.203.0.1 <-> 10.203.0.2)"
    ip netns exec "$nsa" mvpd signal --listen 10.203.0.1:8765 >"$work/tun-signal.log" 2>&1 &
    pids+=($!)
    sleep 1
    # A tunnel is for peers whose key is pinned: each side's identity is made first
    # (`mvpd identity`), and each config pins the other's fingerprint.
    fingerprint() {
        MVPD_STATE_DIR="$work/tun-$1" mvpd identity | awk '/^fingerprint/ {print $2, $3}'
    }
    fp_a=$(fingerprint a); fp_b=$(fingerprint b)
    echo "tun-a is $fp_a"
    echo "tun-b is $fp_b"
    for side in a b; do
        # Each side gives the other TUN mode with its one tunnel address (allowed_ips) and
        # its fingerprint.
        ns=$nsa; addr=10.0.0.1/24; other=b; other_ip=10.0.0.2/32; other_fp=$fp_b
        [ "$side" = b ] && ns=$nsb && addr=10.0.0.2/24 && other=a && other_ip=10.0.0.1/32 \
            && other_fp=$fp_a
        peers="{\"tun-$other\": {\"mode\": \"tun\", \"allowed_ips\": [\"$other_ip\"],"
        peers+=" \"fingerprints\": [\"$other_fp\"]}}"
        ip netns exec "$ns" env AGENT_ID="tun-$side" MVPD_SOCKET="$work/tun-$side.sock" \
            MVPD_STATE_DIR="$work/tun-$side" SIGNALING_URL=ws://10.203.0.1:8765 \
            MVPD_TUN__ADDRESS="$addr" MVPD_PEERS="$peers" \
            mvpd run >"$work/tun-$side.log" 2>&1 &
        pids+=($!)
    done
    wait_socket "$work/tun-a.sock"
    wait_socket "$work/tun-b.sock"
    tun_a() { show mvpctl --socket "$work/tun-a.sock" "$@"; }
    tun_a connect tun-b --mode tun
    show ip netns exec "$nsa" ping -c 3 -i 0.2 -w 10 10.0.0.2
    show ip netns exec "$nsb" ping -c 3 -i 0.2 -w 10 10.0.0.1
    tun_a status
    show ip -n "$nsa" -br addr show dev "$(ip -n "$nsa" -br link | awk '/^mvp-tun/ {print $1}')"
fi

echo
echo "demo done (logs were in $work; removed)"
