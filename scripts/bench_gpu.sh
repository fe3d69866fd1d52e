#!/usr/bin/env bash
# Serving on a GPU, side by side in one run (model alone, bare, served, stock): see scripts/bench_gpu.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
scripts/setup.sh >&2
exec .venv/bin/python -m scripts.bench.gpu "$@"
