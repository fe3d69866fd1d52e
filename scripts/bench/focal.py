"""Focal loss against cross-entropy on imbalanced digits: each class's recall on held-out images.

    .venv/bin/python -m scripts.bench.focal              # a few minutes on 2 CPU cores

scikit-learn's handwritten digits (training.sample_data, 32 px) with one class cut to
--minority-share of its training images (5%: 7 of 139); the classifier trainer run twice on
them with the same seed, data, epochs and flags, once with --loss ce and once with --loss
focal (each keeps its best validation epoch, and the trainer's --patience may stop it
early); then each saved model's recall of every class on the held-out test digits (every
class complete, seen as serving sees them: load_image + eval_transform). Writes one JSON
record under benchmarks/results/: the command, date, machine, package versions, the settings
and the raw figures. A quality figure, one seed per run, not a timing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from model_defs.usage import OneLineParser
from scripts.bench.record import write_record

ROOT = Path(__file__).resolve().parents[2]


def imbalanced_copy(train: Path, dest: Path, minority: str, share: float) -> dict[str, int]:
    """dest/<class>/ with every training image, but only `share` (at least 2) of `minority`'s."""
    counts = {}
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        if folder.name == minority:
            files = files[: max(2, round(len(files) * share))]
        (dest / folder.name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dest / folder.name / f.name)
        counts[folder.name] = len(files)
    return counts


def per_class_recall(run: Path, test: Path) -> dict[str, float]:
    """Recall of each class of `run`'s model on the class folders of `test`."""
    import torch

    from model_defs.checkpoint import data_config_from_meta, load_trained
    from model_defs.preprocessing import eval_transform, load_image

    model, meta = load_trained(run)
    cfg = data_config_from_meta(meta)
    transform = eval_transform(cfg)
    recall = {}
    with torch.inference_mode():
        for name in meta["classes"]:
            files = sorted((test / name).glob("*.png"))
            x = torch.stack([transform(load_image(f, cfg.channels)) for f in files])
            predicted = model(x).argmax(1)
            recall[name] = round((predicted == meta["classes"].index(name)).float().mean().item(), 4)
    return recall


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m scripts.bench.focal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minority", default="8", help="the digit class cut down (default: %(default)s)")
    p.add_argument(
        "--minority-share",
        type=float,
        default=0.05,
        help="share of the minority class's training images kept (default: %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=6, help="epochs of each training run (default: %(default)s)")
    p.add_argument(
        "--focal-gamma", type=float, default=2.0, help="the focal run's --focal-gamma (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run (default: %(default)s)")
    p.add_argument(
        "--out",
        default=None,
        help="the JSON record (default: benchmarks/results/focal_recall-<epochs>-epochs.json)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a mistake already answered in one line
        return int(e.code or 0)
    if not 0 < args.minority_share < 1:
        print(f"error: --minority-share must be > 0 and < 1, got {args.minority_share}", file=sys.stderr)
        return 2
    if args.minority not in [str(d) for d in range(10)]:
        print(f"error: --minority {args.minority!r} is not a digit class (0 to 9)", file=sys.stderr)
        return 2

    from training import train as trainer
    from training.sample_data import write_digits

    with tempfile.TemporaryDirectory(prefix="bench_focal_") as tmp:
        work = Path(tmp)
        write_digits(work / "digits", size=32, test_fraction=0.2, seed=0)
        counts = imbalanced_copy(work / "digits" / "train", work / "imbalanced", args.minority, args.minority_share)
        common = ["--data", str(work / "imbalanced"), "--model", "small_cnn", "--channels", "1", "--hflip-prob", "0"]
        common += ["--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads)]
        common += ["--workers", "0", "--no-progress"]
        losses = {"ce": [], "focal": ["--loss", "focal", "--focal-gamma", str(args.focal_gamma)]}
        runs = {}
        for name, flags in losses.items():
            run = work / name
            print(f"training with --loss {name} ...", file=sys.stderr, flush=True)
            if trainer.cli([*common, "--out", str(run), *flags]) != 0:
                print(f"error: the {name} run failed (its error is above)", file=sys.stderr)
                return 1
            meta = json.loads((run / "model.json").read_text())
            recall = per_class_recall(run, work / "digits" / "test")
            runs[name] = {
                "flags": flags,
                "loss": meta["loss"],
                "best_epoch": meta["metrics"]["best_epoch"],
                "val_accuracy": round(meta["metrics"]["accuracy"], 4),
                "test_recall": recall,
                "test_macro_recall": round(sum(recall.values()) / len(recall), 4),
            }
    figures = {
        "benchmark": "focal loss against cross-entropy, one class cut down, per-class test recall",
        "settings": {
            "data": "sklearn digits, 32 px, test split 0.2 (seed 0)",
            "model": "small_cnn",
            "minority": args.minority,
            "minority_share": args.minority_share,
            "train_images_per_class": counts,
            "epochs": args.epochs,
            "seed": args.seed,
            "threads": args.threads,
            "common_flags": common[2:],
        },
        "runs": runs,
        "minority_recall": {name: run["test_recall"][args.minority] for name, run in runs.items()},
    }
    out = write_record(
        f"focal_recall-{args.epochs}-epochs",
        figures,
        command=shlex.join(["python", "-m", "scripts.bench.focal", *argv]),
        path=args.out and Path(args.out),
    )
    print(
        f"minority class {args.minority} recall: ce {figures['minority_recall']['ce']:.3f}, "
        f"focal {figures['minority_recall']['focal']:.3f}; wrote {out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
