#!/usr/bin/env bash
# The whole path on real data: set up, write the digits dataset, train, archive, serve,
# predict the held-out images over REST.
#
#   ./scripts/demo.sh            # leaves TorchServe running (scripts/serve stop stops it)
#   ./scripts/demo.sh --stop     # stops it at the end
#   ./scripts/demo.sh --retrain  # trains again even if runs/digits holds a model
#
# Idempotent: a second run reuses the environment, the dataset and the trained model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STOP=0; RETRAIN=0
for arg in "$@"; do
  case "$arg" in
    --stop) STOP=1 ;;
    --retrain) RETRAIN=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

scripts/setup.sh
PY=.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "== data: scikit-learn's handwritten digits as 32x32 PNG class folders"
$PY -m training.sample_data digits --out data/digits --size 32

if [ "$RETRAIN" = 1 ] || [ ! -f runs/digits/model.json ]; then
  echo "== training a small CNN on data/digits/train (curves: runs/digits/curves.png)"
  $PY -m training.train --data data/digits/train --model small_cnn --channels 1 --hflip-prob 0 \
      --min-scale 0.8 --epochs 15 --batch-size 64 --out runs/digits --force
else
  echo "== reusing the model in runs/digits (--retrain trains again)"
fi

echo "== archiving runs/digits to model_store/digits.mar"
# A served archive is never replaced: stop the demo's earlier server first. --force: the
# demo's archive follows the current code and model, whatever it held before.
scripts/serve stop >/dev/null 2>&1 || true
scripts/archive runs/digits --name digits --batch-size 8 --max-batch-delay 5 --force

echo "== starting TorchServe on 127.0.0.1"
scripts/serve start --models digits
if [ "$STOP" = 0 ]; then
  echo "   call it with the token kept off the command line:"
  echo "   curl -H @<(scripts/serve key --header) http://127.0.0.1:8080/predictions/digits -T <image.png>"
fi

echo "== predicting the held-out images over REST"
status=0
scripts/predict --model digits data/digits/test || status=$?
if [ "$STOP" = 1 ]; then
  scripts/serve stop >/dev/null
fi
exit $status
