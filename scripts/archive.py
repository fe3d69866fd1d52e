"""Pack a training output folder (model.pt + model.json) into `model_store/<name>.mar`.

    scripts/archive runs/digits --name digits --batch-size 8

The archive holds the weights, model.json, the label map (index_to_name.json), the task's
handler with the shared handler base, the `model_defs` package the handler rebuilds the
model with, and a model-config.yaml (workers, batching, device, top-k). The output is
checked before anything is written, and the `.mar` is built in a temporary folder and
renamed into place, so `model_store/` never holds a partial archive.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HANDLERS = {"classification": "image_classifier.py"}
CODE_PACKAGES = ("model_defs", "handlers")


class ArchiveError(ValueError):
    """The archive cannot be built; the message says why."""


def model_config(args) -> dict:
    """TorchServe's per-model settings (model-config.yaml) plus our handler's own section."""
    cfg = {
        "minWorkers": args.workers,
        "maxWorkers": max(args.workers, args.max_workers or args.workers),
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "responseTimeout": args.response_timeout,
    }
    if args.device != "auto":
        cfg["deviceType"] = args.device
    cfg["handler"] = {"topk": args.topk}
    if args.torch_threads:
        cfg["handler"]["torch_threads"] = args.torch_threads
    for pair in args.handler_option:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ArchiveError(f"--handler-option expects KEY=VALUE, got {pair!r}")
        cfg["handler"][key] = yaml.safe_load(value)
    return cfg


def check_training_output(run_dir: Path) -> dict:
    """Refuse an incomplete or inconsistent training output before writing anything."""
    from model_defs.checkpoint import CheckpointError, load_trained

    if not run_dir.is_dir():
        raise ArchiveError(f"training output folder {run_dir} does not exist")
    try:
        _, meta = load_trained(run_dir)
    except (CheckpointError, KeyError, TypeError) as e:
        raise ArchiveError(f"incomplete training output: {e.args[0] if e.args else e}") from None
    if meta["task"] not in HANDLERS:
        raise ArchiveError(f"{run_dir}/model.json: no handler for task {meta['task']!r}")
    return meta


def stage_extra_files(stage: Path, run_dir: Path, meta: dict) -> Path:
    """The folder whose contents the archiver copies to the archive root."""
    extra = stage / "extra"
    extra.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "__main__.py")
    for package in CODE_PACKAGES:
        shutil.copytree(ROOT / package, extra / package, ignore=ignore)
    shutil.copy2(run_dir / "model.json", extra / "model.json")
    labels = {str(i): name for i, name in enumerate(meta["classes"])}
    (extra / "index_to_name.json").write_text(json.dumps(labels, indent=2) + "\n")
    return extra


def build_archive(run_dir: Path, name: str, model_store: Path, args, version: str = "1.0") -> Path:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    run_dir, model_store = Path(run_dir), Path(model_store)
    meta = check_training_output(run_dir)
    model_store.mkdir(parents=True, exist_ok=True)
    target = model_store / f"{name}.mar"
    if target.exists() and not args.force:
        raise ArchiveError(f"{target} already exists; pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=model_store) as tmp:
        stage = Path(tmp)
        extra = stage_extra_files(stage, run_dir, meta)
        config_file = stage / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(model_config(args), sort_keys=False))
        out_dir = stage / "out"
        out_dir.mkdir()
        config = ModelArchiverConfig(
            model_name=name,
            handler=str(ROOT / "handlers" / HANDLERS[meta["task"]]),
            version=version,
            serialized_file=str(run_dir / "model.pt"),
            extra_files=str(extra),
            export_path=str(out_dir),
            config_file=str(config_file),
            force=True,
        )
        # The archiver stages files in $TMPDIR/<name>; give it a private one.
        old_tempdir = tempfile.tempdir
        tempfile.tempdir = str(stage)
        try:
            generate_model_archive(config)
        finally:
            tempfile.tempdir = old_tempdir
        built = out_dir / f"{name}.mar"
        if not built.is_file():
            raise ArchiveError(f"the archiver did not produce {built.name}")
        os.replace(built, target)  # same filesystem: atomic
    return target


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="training output folder holding model.pt and model.json")
    p.add_argument("--name", default=None, help="model name, also the .mar file name (default: the folder's name)")
    p.add_argument("--version", default="1.0", help="model version written in the archive's manifest (default: 1.0)")
    p.add_argument("--model-store", default=str(ROOT / "model_store"), help="where the .mar is written (default: model_store/)")
    p.add_argument("--workers", type=int, default=1, help="workers TorchServe starts for the model (minWorkers) (default: 1)")
    p.add_argument("--max-workers", type=int, default=None, help="most workers it may scale to (maxWorkers) (default: --workers)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch threads per worker; 0 = cores / workers, so workers x threads fit the machine (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="most requests TorchServe batches into one call (default: 8)")
    p.add_argument("--max-batch-delay", type=int, default=10, help="ms TorchServe waits to fill a batch (default: 10)")
    p.add_argument("--response-timeout", type=int, default=120, help="seconds before a worker is deemed stuck (default: 120)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where the workers run: auto = a GPU if TorchServe sees one (default: auto)")
    p.add_argument("--topk", type=int, default=5, help="classes returned per image, clamped to the number of classes (default: 5)")
    p.add_argument("--handler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra setting for the handler section of model-config.yaml, value parsed as YAML "
                        "(e.g. score_threshold=0.5); repeatable (default: none)")
    p.add_argument("--force", action="store_true", help="replace an existing .mar of the same name (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    name = args.name or run_dir.resolve().name
    try:
        path = build_archive(run_dir, name, Path(args.model_store), args, args.version)
    except ArchiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
