#!/usr/bin/env bash
# Serving speed side by side: the bare handler in-process, our archive behind TorchServe
# and TorchServe's stock image_classifier handler, with the same weights and JPEG bytes.
#
#   ./scripts/bench.sh                          # ResNet-18 int8 vs stock, then the presets: about 20 minutes on 2 cores
#   ./scripts/bench.sh --presets ""             # without the presets, about 6 minutes
#   ./scripts/bench.sh --runtime eager          # our fp32 eager path instead
#   ./scripts/bench.sh --duration 5 --clients 1,4 --no-detector
#   ./scripts/bench.sh --help                   # every flag and its default
#
# Without --run it serves runs/digits_resnet18, a ResNet-18 trained on the digits at
# 224 px (trained here once, about 8 minutes on 2 cores, if it is not there yet), so the
# int8 runtime can be calibrated and checked against eager on real validation images.
# Last line: served/bare=X.XX served/stock=Y.YY (throughput ratios at 4 clients).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
HAS_RUN=0
for arg in "$@"; do
  case "$arg" in
    -h|--help) [ -x "$PY" ] && exec "$PY" -m scripts.bench.serving --help; sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --run|--run=*) HAS_RUN=1 ;;
  esac
done
scripts/setup.sh >&2
if [ "$HAS_RUN" = 0 ]; then
  if [ ! -f runs/digits_resnet18/model.json ]; then
    echo "== one-time: training ResNet-18 on the digits at 224 px for the benchmark (runs/digits_resnet18)" >&2
    $PY -m training.sample_data digits --out data/digits --size 32 >&2
    $PY -m training.train --data data/digits/train --model resnet18 --channels 3 --hflip-prob 0 \
        --min-scale 0.8 --epochs 3 --batch-size 32 --lr 1e-3 --out runs/digits_resnet18 --force >&2
  fi
  set -- --run runs/digits_resnet18 --runtime int8 --presets latency,throughput,balanced "$@"
fi
exec "$PY" -m scripts.bench.serving "$@"
