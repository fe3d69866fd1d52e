#!/usr/bin/env bash
# Serving speed side by side: the bare handler in-process, our archive behind TorchServe
# and TorchServe's stock image_classifier handler, with the same weights and JPEG bytes.
#
#   ./scripts/bench.sh                                        # ResNet-18, about 5 minutes
#   ./scripts/bench.sh --duration 5 --clients 1,4 --no-detector
#   ./scripts/bench.sh --help                                 # every flag and its default
#
# Last line: served/bare=X.XX served/stock=Y.YY (throughput ratios at 4 clients).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
for arg in "$@"; do
  case "$arg" in
    -h|--help) [ -x "$PY" ] && exec "$PY" -m scripts.bench --help; sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  esac
done
scripts/setup.sh >&2
exec "$PY" -m scripts.bench "$@"
