#!/usr/bin/env bash
# Epoch time of every trainer, briefly, on one device and precision: each task's own small
# data (the digits, shapes on real photos), 2 epochs under torchrun with one process per GPU.
#
#   scripts/bench_train.sh                       # on the GPU: bf16 and fp16, one process per GPU
#   scripts/bench_train.sh --device cpu --amp none
#   scripts/bench_train.sh --epochs 1 --tasks classification,detection
#
# Prints one line per task and precision (seconds per epoch, the first epoch apart, since it
# pays for start-up and cuDNN autotuning) and appends them to runs/bench_train/epoch_times.jsonl;
# then the table of docs/performance-gpu.md, "first / later" seconds per task, with this run's
# columns beside those of the records benchmarks/results/*-training-*.json. A failed run prints
# its log's end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-.venv/bin/python}"
DEVICE=cuda; AMPS="bf16,fp16"; EPOCHS=2; TASKS="classification,detection,segmentation,generation,embedding"
OUT=runs/bench_train; DATA=data/bench_train
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --amp) AMPS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --tasks) TASKS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1; known: --device, --amp, --epochs, --tasks, --out, --help" >&2; exit 2 ;;
  esac
done
KNOWN="classification detection segmentation generation embedding"
for task in ${TASKS//,/ }; do
  case " $KNOWN " in *" $task "*) ;; *) echo "error: unknown task $task; known: $KNOWN" >&2; exit 2 ;; esac
done
NPROC=1
if [ "$DEVICE" = cuda ]; then NPROC="$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')"; fi
mkdir -p "$DATA" "$OUT"
wants() { case ",$TASKS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }  # the data only the tasks run need
if wants classification || wants generation || wants embedding; then
  [ -d "$DATA/digits" ] || "$PY" -m training.sample_data digits --out "$DATA/digits" >/dev/null
fi
if wants detection && [ ! -d "$DATA/det/train" ]; then
  "$PY" -m training.shapes --out "$DATA/det/train" --layout voc --n 300 --size 128 --seed 0 --no-progress >/dev/null
  "$PY" -m training.shapes --out "$DATA/det/val" --layout voc --n 50 --size 128 --seed 1 --no-progress >/dev/null
fi
if wants segmentation; then
  [ -d "$DATA/masks" ] || "$PY" -m training.shapes --out "$DATA/masks" --layout masks --n 400 --size 128 --seed 0 --no-progress >/dev/null
fi
D="$DATA"
declare -A CMD=(
  [classification]="training.train --data $D/digits/train --model resnet18 --channels 3 --hflip-prob 0 --batch-size 64"
  [detection]="training.train_detection --data $D/det/train --val-data $D/det/val --model fcos_regnet_x_400mf --input-size 128 --batch-size 8"
  [segmentation]="training.train_segmentation --data $D/masks --model unet --input-size 96 --batch-size 8"
  [generation]="training.train_gan --data $D/digits/train"
  [embedding]="training.train_simclr --data $D/digits/train --eval-data $D/digits/train --eval-val-data $D/digits/test --channels 1 --hflip-prob 0"
)
for task in ${TASKS//,/ }; do
  for amp in ${AMPS//,/ }; do
    run="$OUT/${task}_${DEVICE}_${amp}"
    rm -rf "$run"
    # shellcheck disable=SC2086
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m ${CMD[$task]} --epochs "$EPOCHS" \
        --device "$DEVICE" --amp "$amp" --out "$run" --no-progress > "$run.log" 2>&1 \
      || { echo "$task $DEVICE $amp: FAILED, see $run.log; its last lines:"
           grep -v -E "torch\.distributed\.elastic|ChildFailedError|^[[:space:]]*$|^=+$" "$run.log" | tail -n 12 | sed 's/^/    /' || true
           continue; }
    "$PY" - "$run" "$task" "$DEVICE" "$amp" "$NPROC" <<'PY'
import csv, json, sys
from pathlib import Path
run, task, device, amp, nproc = sys.argv[1:]
rows = list(csv.DictReader(open(Path(run) / "metrics.csv")))
secs = [float(r["seconds"]) for r in rows]
line = {"task": task, "device": device, "amp": amp, "processes": int(nproc), "epoch_seconds": secs}
print(f"{task:15s} {device} {amp:5s} x{nproc}: first epoch {secs[0]:.1f} s, then {sum(secs[1:]) / max(1, len(secs) - 1):.1f} s/epoch")
with open(Path(run).parent / "epoch_times.jsonl", "a") as f:
    f.write(json.dumps(line) + "\n")
PY
  done
done
"$PY" - benchmarks/results/*-training-*.json "$OUT/epoch_times.jsonl" <<'PY'
import json, sys
from pathlib import Path
cells, columns = {}, {}
for path in sys.argv[1:]:
    if not Path(path).is_file():
        continue
    if path == sys.argv[-1]:  # this run's lines
        tag, runs = "this machine", [json.loads(line) for line in open(path)]
    else:  # a benchmark record (benchmarks/results/schema.json)
        record = json.load(open(path))
        tag, runs = record["machine"]["gpu"] or record["name"], record["figures"]["runs"]
    for r in runs:
        column = f"{tag}: {r['device']} {r['amp']} x{r['processes']}"
        columns[column] = None
        s = r["epoch_seconds"]
        later = f"{sum(s[1:]) / len(s[1:]):.1f}" if len(s) > 1 else "-"
        cells[r["task"], column] = f"{s[0]:.1f} / {later}"  # a later line of a file replaces an earlier one
tasks = dict.fromkeys(t for t, _ in cells)
print("\n| task | " + " | ".join(columns) + " |")
print("|---|" + "---:|" * len(columns))
for task in tasks:
    print(f"| {task} | " + " | ".join(cells.get((task, c), "-") for c in columns) + " |")
PY
