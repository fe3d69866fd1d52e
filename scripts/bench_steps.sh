#!/usr/bin/env bash
# What each in-process step gives (preprocessing, runtimes), in one run: see scripts/bench_steps.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
scripts/setup.sh >&2
exec .venv/bin/python -m scripts.bench.steps "$@"
