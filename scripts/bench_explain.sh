#!/usr/bin/env bash
# What an explanation costs against a prediction, in one run: see scripts/bench_explain.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
scripts/setup.sh >&2
exec .venv/bin/python -m scripts.bench.explain "$@"
