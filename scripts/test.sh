#!/usr/bin/env bash
# The whole test suite: sets up .venv like the demo, then runs pytest (extra arguments go to pytest,
# e.g. -m unit for the fast in-process tests). The set-up time is printed apart from the tests'.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS=0
"$ROOT/scripts/setup.sh"
echo "setup: ${SECONDS} s" >&2
cd "$ROOT"
exec .venv/bin/python -m pytest "$@"
