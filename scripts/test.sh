#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, mypy (strict), then the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k signaling -x
# Without arguments, the tests of the WebRTC data plane (tests/sctp, tests/rtc, the pipe
# end-to-end tests) run a second time against the pure-Python mvpd.sctp (MVPD_PURE_SCTP=1,
# which the daemons those tests start inherit) when setup.sh compiled it, so both builds are
# tested.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check mvpd mvpctl tests bench examples
echo "== mypy (strict on mvpd and mvpctl)"
.venv/bin/mypy
echo "== pytest ($(.venv/bin/mvpd --version))"
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
if [ "$(.venv/bin/python -c 'import mvpd.sctp as s; print(s.BUILD)')" = compiled ]; then
    echo "== pytest: the data-plane tests again, against the pure-Python mvpd.sctp"
    MVPD_PURE_SCTP=1 .venv/bin/python -m pytest -q tests/sctp tests/rtc \
        tests/e2e/test_e2e_pipe_end.py
fi
