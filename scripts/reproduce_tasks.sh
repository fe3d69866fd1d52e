#!/usr/bin/env bash
# Reproduces one training run per task (docs/tasks.md): the data is generated (shapes on
# scikit-image photographs), each model is trained on the 2-core CPU machine, and the
# metric it reached is printed at the end of its section. Outputs: data/shapes_*/, runs/*/.
#
#   scripts/reproduce_tasks.sh            # every task
#   scripts/reproduce_tasks.sh detection  # one section (names below)
# Epoch times of every trainer on a GPU (or the CPU beside it): scripts/bench_train.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -x .venv/bin/python ] || { echo "error: no virtual environment at $ROOT/.venv; run scripts/setup.sh first" >&2; exit 2; }
PY=.venv/bin/python
ONLY="${1:-all}"
want() { [ "$ONLY" = all ] || [ "$ONLY" = "$1" ]; }

# -- detection: FCOS on RegNetX-400MF (the light detector), from scratch, VOC layout -------
# --threads 1: on the shared 2-core machine one thread ran an epoch in ~25 s, two in ~220 s.
if want detection; then
    rm -rf data/shapes_det runs/shapes_det
    $PY -m training.shapes --out data/shapes_det/train --layout voc --n 300 --size 128 --shape-size 0.2 0.45 --seed 0 --no-progress
    $PY -m training.shapes --out data/shapes_det/val --layout voc --n 50 --size 128 --shape-size 0.2 0.45 --seed 1 --no-progress
    $PY -m training.train_detection --data data/shapes_det/train --val-data data/shapes_det/val \
        --model fcos_regnet_x_400mf --input-size 128 --epochs 16 --batch-size 8 --lr 2e-3 --vflip-prob 0.5 \
        --workers 0 --threads 1 --max-minutes 15 --out runs/shapes_det --no-progress
    $PY -c "import json; m = json.load(open('runs/shapes_det/model.json'))['metrics']; \
print(f\"detection: val mAP@0.5 {m['map_50']:.3f}, mAP@[.5:.95] {m['map']:.3f} (epoch {m['best_epoch']}, \
{m['train_seconds']:.0f}s wall, {m['train_cpu_seconds']:.0f}s CPU)\")"
fi

# -- segmentation: U-Net on shape masks (masks layout); the figure is validation mIoU -----
# --threads 1: on the shared 2-core machine one torch thread trained 4-30x faster than two.
if want segmentation; then
    rm -rf data/shapes_masks runs/unet_shapes
    $PY -m training.shapes --out data/shapes_masks --layout masks --n 400 --size 128 --seed 0 --no-progress
    $PY -m training.train_segmentation --data data/shapes_masks --model unet --input-size 96 --epochs 40 \
        --max-minutes 15 --batch-size 8 --workers 1 --threads 1 --out runs/unet_shapes --no-progress
    $PY -c "import json; m = json.load(open('runs/unet_shapes/model.json'))['metrics']; \
print(f\"segmentation: val mIoU {m['best_val']:.3f}, pixel accuracy {m['pixel_accuracy']:.3f} (epoch {m['best_epoch']}, {m['train_seconds'] / 60:.1f} min)\")"
fi

# -- generation: DCGAN on the handwritten digits; the figure is the sample grid -------------
if want generation; then
    rm -rf runs/digits_gan
    $PY -m training.sample_data digits --out data/digits
    # The score classifier (the demo's digit CNN) gives each epoch's samples an Inception Score.
    [ -f runs/digits/model.json ] || $PY -m training.train --data data/digits/train --model small_cnn --channels 1 \
        --hflip-prob 0 --min-scale 0.8 --epochs 15 --batch-size 64 --out runs/digits --force --no-progress
    $PY -m training.train_gan --data data/digits/train --out runs/digits_gan --epochs 15 --workers 0 --threads 1 \
        --score-classifier runs/digits --no-progress
    $PY -c "import json; m = json.load(open('runs/digits_gan/model.json'))['metrics']; \
print(f\"generation: Inception Score {m['inception_score']:.2f} (real digits {m['real_inception_score']:.2f}), {m['classes_covered']}/10 digits; grids in runs/digits_gan/samples/\")"
fi

# -- embeddings: SimCLR on the digits without labels; the figure is k-NN accuracy ----------
if want embedding; then
    rm -rf runs/digits_simclr
    $PY -m training.sample_data digits --out data/digits
    $PY -m training.train_simclr --data data/digits/train --eval-data data/digits/train --eval-val-data data/digits/test \
        --channels 1 --hflip-prob 0 --rotation 10 --epochs 15 --workers 1 --threads 1 --out runs/digits_simclr --no-progress
    $PY -c "import json; m = json.load(open('runs/digits_simclr/model.json'))['metrics']; \
print(f\"embedding: k-NN accuracy {m['best_val']:.3f} (untrained encoder {m['untrained_knn_accuracy']:.3f}), epoch {m['best_epoch']}\")"
fi
