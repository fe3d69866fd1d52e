#!/usr/bin/env bash
# Soak test: keeps a served model busy with good and bad requests mixed, then reports the
# requests, the answers by status code, p50/p99 latency and the workers' RSS at start and end.
#
#   ./scripts/soak.sh                                 # 180 s, 8 clients, 25% bad requests
#   ./scripts/soak.sh --duration 600 --clients 8      # ten minutes (docs/reliability.md)
#   ./scripts/soak.sh --help                          # every flag and its default
#
# Sets up the environment and, when no TorchServe answers from .serve/, serves the demo's
# digits model first (writing the data and training it if needed, as scripts/demo.sh does).
# Exit code 1 if a good request was not answered 200, or a run of 600 s or more saw the
# workers' RSS grow by 10% or more.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python

for arg in "$@"; do
  case "$arg" in
    -h|--help) [ -x "$PY" ] && exec "$PY" -m scripts.bench.soak --help; sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  esac
done

scripts/setup.sh

if ! scripts/serve status >/dev/null 2>&1; then
  echo "== no TorchServe answers from .serve/: serving the digits model first"
  $PY -m training.sample_data digits --out data/digits --size 32
  if [ ! -f runs/digits/model.json ]; then
    echo "== training a small CNN on data/digits/train (curves: runs/digits/curves.png)"
    $PY -m training.train --data data/digits/train --model small_cnn --channels 1 --hflip-prob 0 \
        --min-scale 0.8 --epochs 15 --batch-size 64 --out runs/digits --force
  fi
  scripts/archive runs/digits --name digits --batch-size 8 --max-batch-delay 5 --force
  scripts/serve stop >/dev/null || true
  scripts/serve start --models digits
fi

echo "== soak test"
exec "$PY" -m scripts.bench.soak "$@"
