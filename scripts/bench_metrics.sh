#!/usr/bin/env bash
# What the handler metrics cost, served with and without them in one run: see scripts/bench_metrics.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
scripts/setup.sh >&2
exec .venv/bin/python -m scripts.bench.metrics "$@"
