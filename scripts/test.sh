#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, mypy (strict), then the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k signaling -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check mvpd mvpctl tests bench examples
echo "== mypy (strict on mvpd and mvpctl)"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
