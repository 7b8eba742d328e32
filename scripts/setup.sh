#!/usr/bin/env bash
# Install what mvp-agent needs on Debian 12 (run as root): apt packages, then a venv in .venv
# with the project installed editable plus its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3-venv python3-dev gcc pkg-config libsystemd-dev  # venv; systemd-python builds
    iproute2 iputils-ping iperf3 procps psmisc            # TUN, netns, benches, tests
    coturn                                                # the TURN relay test
    wireguard-go wireguard-tools                          # bench/tun_mvpd.py baseline
    prometheus                                            # the metrics scrape test
    redis-server                                          # several signaling servers
    systemd systemd-container                             # the booted-systemd tests
)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        # coturn's, prometheus' and redis-server's packages enable system services; the tests
        # start their own relay, Prometheus and Redis (on free ports, with temporary storage).
        for unit in coturn prometheus redis-server; do
            systemctl disable --now "$unit" >/dev/null 2>&1 \
                || { service "$unit" stop >/dev/null 2>&1 || true; }
        done
    fi
    # Optional: headless Chromium for the browser-peer test (tests/browser skip without it).
    if ! command -v chromium >/dev/null; then
        echo "setup: installing chromium (optional, for tests/browser)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
            >/dev/null; } 2>/dev/null \
            || echo "setup: note: chromium could not be installed; tests/browser will be skipped"
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# The editable install itself is pure Python; the compile step below builds the native modules.
MVPD_COMPILE=0 .venv/bin/python -m pip install -q --disable-pip-version-check \
    -e '.[systemd,speed,cluster,test]' 2>&1 | grep -v "^WARNING: Location" || true

# Compile mvpd.sctp's hot modules in place with mypyc (setup.py; about a minute) when a C
# compiler and the Python headers are there; MVPD_COMPILE=0 keeps (and leaves) pure Python.
# Up-to-date compiled modules are kept; mvpd falls back to the .py files while they are stale.
if [ "${MVPD_COMPILE:-1}" = 0 ]; then
    rm -f mvpd/sctp/*.so
elif env -u MVPD_PURE_SCTP .venv/bin/python -c \
        "import sys, mvpd.sctp as s; sys.exit(s.BUILD != 'compiled')" 2>/dev/null; then
    :  # compiled and current
else
    echo "setup: compiling mvpd.sctp with mypyc (MVPD_COMPILE=0 skips)"
    mkdir -p build
    if .venv/bin/python setup.py build_ext --inplace >build/native.log 2>&1; then
        touch mvpd/sctp/*.so  # built from the current sources (even when copied unchanged)
    else
        rm -f mvpd/sctp/*.so
        echo "setup: note: compiling failed (build/native.log); mvpd.sctp runs as pure Python"
    fi
fi
.venv/bin/python -c "import mvpd, mvpctl, aiortc, websockets, msgpack, typer, redis" \
    || { echo "setup: the venv is incomplete" >&2; exit 1; }
