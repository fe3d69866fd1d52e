#!/usr/bin/env bash
# The whole test suite: sets up .venv like the demo, then runs pytest (extra arguments go to pytest,
# e.g. -m unit for the fast in-process tests). The set-up time is printed apart from the tests'.
#   ./scripts/test.sh --image [ARGS]   builds the serving image and serves the demo's .mar from it
#                                      (tests/test_image.py; needs buildah; docs/deployment.md)
#   ./scripts/test.sh --help           this, then pytest's own options
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args=(); image=0
case "${1:-}" in
  -h | --help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; [ -x "$ROOT/.venv/bin/python" ] && exec "$ROOT/.venv/bin/python" -m pytest --help; exit 0 ;;
esac
for a in "$@"; do if [[ "$a" == --image ]]; then image=1; else args+=("$a"); fi; done
SECONDS=0
"$ROOT/scripts/setup.sh"
echo "setup: ${SECONDS} s" >&2
cd "$ROOT"
# Python caches compiled modules in __pycache__ (git ignores it, no .mar carries it), so the
# hundreds of processes the suite starts (trainers, CLIs, torchrun, TorchServe workers) compile
# the bundle's code once instead of each time; some hosts turn that cache off.
unset PYTHONDONTWRITEBYTECODE
if [[ "$image" == 1 ]]; then
  export BUNDLE_IMAGE_TEST=1
  exec .venv/bin/python -m pytest tests/test_image.py -s "${args[@]}"
fi
exec .venv/bin/python -m pytest "${args[@]}"
