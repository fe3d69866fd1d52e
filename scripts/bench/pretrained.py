"""Does a pretrained start beat a random one in the same training budget? Measured on shapes.

    .venv/bin/python -m scripts.bench.pretrained                 # a few minutes of CPU
    .venv/bin/python -m scripts.bench.pretrained --tasks detection --finetune-seeds 0 1 2

For each task a model is trained on one shapes dataset (--seed-a), then fine-tuned on a small
other one (--seed-b: other photograph crops, other shapes) twice with the same flags, epochs
and steps: once started from the first model's model.pt (--pretrained, its class predictors
rebuilt) and once from random weights; both are scored on a third dataset (--seed-val, given
to the trainer as --val-data), large enough that the two arms' difference is not noise. Each
arm runs once per --finetune-seeds value. The record holds the command, the date, the machine,
the package versions and, per arm and seed, the validation figure of every epoch and the best
one (mAP@0.5 for the detector, mean IoU for the segmenter), as the trainers computed them.
A measurement, not a test: nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from model_defs.usage import OneLineParser, UsageError
from scripts.bench.record import write_record

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("detection", "segmentation")

# The detector of tests/conftest.py's shapes_detector: one large shape per 96 px image, the
# light FCOS, 64 px input; the segmenter a U-Net at 64 px, up to two large shapes an image.
DATA = {
    "detection": {"layout": "voc", "size": 96, "max_shapes": 1, "shape_size": (0.35, 0.6), "aspect": 1.3},
    "segmentation": {"layout": "masks", "size": 64, "max_shapes": 2, "shape_size": (0.3, 0.6)},
}
TRAINING = {
    "detection": ["--model", "fcos_resnet", "--input-size", "64", "--batch-size", "8", "--lr", "3e-3"],
    "segmentation": ["--model", "unet", "--model-arg", "depth=3", "--model-arg", "width=16", "--input-size", "64"]
    + ["--batch-size", "8", "--lr", "3e-3"],
}
METRIC = {"detection": "val_map_50", "segmentation": "val_miou"}


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m scripts.bench.pretrained",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "pretrained_shapes.json"),
        help="JSON record to write (default: benchmarks/results/pretrained_shapes.json)",
    )
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to measure (default: both)")
    p.add_argument("--seed-a", type=int, default=0, help="seed of the pretraining dataset (default: 0)")
    p.add_argument("--seed-b", type=int, default=1, help="seed of the fine-tuning dataset (default: 1)")
    p.add_argument("--seed-val", type=int, default=2, help="seed of the fine-tuning validation dataset (default: 2)")
    p.add_argument("--n-a", type=int, default=200, help="images in the pretraining dataset (default: 200)")
    p.add_argument("--n-b", type=int, default=50, help="images in the fine-tuning dataset (default: 50)")
    p.add_argument("--n-val", type=int, default=100, help="images in the validation dataset (default: 100)")
    p.add_argument("--pretrain-epochs", type=int, default=12, help="epochs on dataset A (default: 12)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="epochs of each arm on dataset B (default: 3)")
    p.add_argument(
        "--finetune-seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="training seeds; each arm runs once per seed (default: 0 1)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run (default: 1)")
    p.add_argument("--work", default=None, help="folder for the datasets and runs (default: a temporary one)")
    return p


def check(args) -> None:
    seeds = {"--seed-a": args.seed_a, "--seed-b": args.seed_b, "--seed-val": args.seed_val}
    if len(set(seeds.values())) < 3:
        raise UsageError(f"{', '.join(f'{k} {v}' for k, v in seeds.items())}: the three datasets need three seeds")
    for flag in ("n_b", "n_val", "pretrain_epochs", "finetune_epochs", "threads"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.n_a < 10:
        raise UsageError(f"--n-a must be at least 10, got {args.n_a}: a fifth of it is held out for validation")


def train(task: str, data: Path, out: Path, epochs: int, seed: int, threads: int, *extra: str) -> dict:
    """One training run through the task's own trainer; its per-epoch validation figures."""
    from training import train_detection, train_segmentation

    trainer = train_detection if task == "detection" else train_segmentation
    argv = ["--data", str(data), "--out", str(out), *TRAINING[task], "--epochs", str(epochs), "--seed", str(seed)]
    argv += ["--threads", str(threads), "--workers", "0", "--pictures", "0", "--no-progress", "--force", *extra]
    started = time.perf_counter()
    if trainer.cli(argv) != 0:
        raise RuntimeError(f"training failed: {shlex.join(argv)}")
    with open(out / "metrics.csv") as f:
        curve = [round(float(row[METRIC[task]]), 4) for row in csv.DictReader(f)]
    meta = json.loads((out / "model.json").read_text())
    return {"best": max(curve), "per_epoch": curve, "seconds": round(time.perf_counter() - started, 1), "meta": meta}


def measure(task: str, args, work: Path) -> dict:
    from training import shapes

    spec = {k: v for k, v in DATA[task].items() if k != "layout"}
    layout = DATA[task]["layout"]
    a = shapes.generate(work / task / "a", layout, n=args.n_a, seed=args.seed_a, progress=False, **spec)
    b = shapes.generate(work / task / "b", layout, n=args.n_b, seed=args.seed_b, progress=False, **spec)
    val = shapes.generate(work / task / "val", layout, n=args.n_val, seed=args.seed_val, progress=False, **spec)
    print(f"{task}: pretraining on seed {args.seed_a} ({args.pretrain_epochs} epochs)", file=sys.stderr, flush=True)
    pre = train(task, a, work / task / "pretrain", args.pretrain_epochs, 0, args.threads)
    source = work / task / "pretrain" / "model.pt"
    arms: dict[str, list] = {"pretrained": [], "random": []}
    record, train_images = None, None
    for seed in args.finetune_seeds:
        for arm in arms:
            extra = ["--val-data", str(val), *(["--pretrained", str(source)] if arm == "pretrained" else [])]
            run = train(task, b, work / task / f"{arm}_{seed}", args.finetune_epochs, seed, args.threads, *extra)
            arms[arm].append({"seed": seed, "best": run["best"], "per_epoch": run["per_epoch"]})
            if run["meta"]["pretrained"]:  # the source named inside the work folder, which is temporary
                record = run["meta"]["pretrained"] | {"file": str(source.relative_to(work))}
            train_images = run["meta"]["dataset"]["train_images"]
            print(f"{task} {arm} seed {seed}: best {METRIC[task]} {run['best']:.4f}", file=sys.stderr, flush=True)
    means = {arm: round(statistics.mean(r["best"] for r in runs), 4) for arm, runs in arms.items()}
    return {
        "metric": METRIC[task].removeprefix("val_"),
        "model": TRAINING[task][1],
        "training_flags": TRAINING[task],
        "data": {
            **DATA[task],
            **{k: getattr(args, k) for k in ("n_a", "seed_a", "n_b", "seed_b", "n_val", "seed_val")},
        },
        "pretrain": {"epochs": args.pretrain_epochs, "best": pre["best"], "per_epoch": pre["per_epoch"]},
        "finetune": {
            "epochs": args.finetune_epochs,
            "train_images": train_images,
            "same_flags": "both arms: the training flags, epochs, seed and --val-data; the pretrained arm adds "
            "--pretrained",
        },
        "pretrained_record": record,
        "arms": arms,
        "mean_best": means,
        "pretrained_minus_random": round(means["pretrained"] - means["random"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage mistake already answered in one line (2)
        return int(e.code or 0)
    try:
        check(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_pretrained_") as tmp:
        work = Path(args.work or tmp)
        results = {task: measure(task, args, work) for task in args.tasks}
    figures = {
        "note": "validation figures as the trainers compute them: pretraining on dataset A's held-out fifth, "
        "fine-tuning on the validation dataset; wall seconds on a shared CPU are not a product figure",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    out = write_record(
        Path(args.out).stem,
        figures,
        command=shlex.join(["python", "-m", "scripts.bench.pretrained", *argv]),
        extra_versions=("torchmetrics", "pycocotools"),
        path=Path(args.out),
    )
    for task, r in results.items():
        print(f"{task}: {r['metric']} pretrained {r['mean_best']['pretrained']} random {r['mean_best']['random']}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
