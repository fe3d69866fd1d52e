"""Pack training output folders (model.pt + model.json) into `.mar` archives in model_store/.

    scripts/archive runs/digits --name digits                 # model_store/digits.mar
    scripts/archive runs/digits --name digits --version 2.0   # model_store/digits-2.0.mar
    scripts/archive --manifest models.yaml                    # a batch, in parallel
    scripts/archive --verify                                  # every archive against the catalog
    scripts/archive runs/digits --name digits --runtime onnx  # an optimized runtime, checked against eager
    scripts/archive runs/digits --name digits --preset latency  # settings for a kind of traffic

`--preset latency|throughput|balanced|auto` sets workers, threads, batching and runtime for
this host or `--target-cores` (scripts/ops/presets.py); explicit flags override it.

`--runtime` picks how workers run the model: eager (default), torchscript, onnx, int8,
or compile (see handlers/runtimes.py). Every runtime but eager is built here and checked
against eager on the run's validation split (or --val-data) before anything is written;
a classifier that loses more than --max-accuracy-drop points of top-1 is refused, and a
segmenter, embedder or detector whose answers agree with eager's less than 100 minus
--max-accuracy-drop percent (mIoU of the masks, cosine similarity of the embeddings, boxes
with the same label at IoU 0.5) is refused (scripts/ops/optimize.py). Detectors take
eager, torchscript or onnx. The check is kept in archive.json and the catalog.

An archive holds the weights, model.json, the label map (index_to_name.json), the task's
handler with the shared handler base, the `model_defs` package the handler rebuilds the
model with, a model-config.yaml (workers, batching, device, timeouts, handler settings)
and archive.json (what it is and where it came from). The training output is checked
before anything is written; the `.mar` is built in a temporary folder and renamed into
place, so model_store/ never holds a partial archive. Every archive is recorded in
model_store/catalog.json with its sha256 and the hash of its inputs: an unchanged entry
is skipped, a changed one under an existing name and version needs --force.

A manifest lists models under `models:` (and optional shared settings under `defaults:`):

    defaults: {batch_size: 8, max_batch_delay: 10}
    models:
      - {name: digits, version: "1.0", run: runs/digits, task: classification,
         config: {workers: 1, device: cpu, response_timeout: 120}}
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from handlers.runtimes import RUNTIMES
from model_defs.usage import OneLineParser
from scripts.cli.errors import one_line_errors
from scripts.ops.catalog import REJECTED, Catalog, CatalogError
from scripts.ops.names import check_name, check_version
from scripts.ops.packaging import (
    ROOT,
    ArchiveError,
    build_archive,
    build_manifest,
    model_config,
    plan_archive,
    refuse_if_served,
)
from scripts.ops.presets import CHOICES
from scripts.ops.serve import RUN_DIR_ENV, default_run_dir
from training.key_values import parse_key_values


def print_table(results: list[dict]) -> None:
    rows = [("name", "version", "size", "sha256", "seconds", "status")]
    for r in results:
        size = f"{r['size'] / 1e6:.1f} MB" if r.get("size") else "-"
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        rows.append((r["name"], r["version"], size, (r.get("sha256") or "-")[:12], f"{r['seconds']:.1f}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="scripts/archive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "training", nargs="?", metavar="run_dir", help="training output folder holding model.pt and model.json"
    )
    p.add_argument(
        "--manifest", default=None, help="YAML manifest of many models to archive in parallel (default: none)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every archive in the store against the catalog and exit (default: off)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="with --verify: make the catalog and the store agree, dropping entries whose archive is gone and "
        f"moving changed or uncatalogued archives to {REJECTED}/ (refused while served) (default: off)",
    )
    p.add_argument(
        "--remove",
        nargs=2,
        metavar=("NAME", "VERSION"),
        default=None,
        help="drop a version from the catalog and delete its archive (refused while served) (default: none)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and show what would be built, writing nothing (default: off)",
    )
    p.add_argument(
        "--run-dir",
        default=str(default_run_dir()),
        help="the run folder of the server whose serving record protects archives from --force, --remove "
        f"and --repair (default: ${RUN_DIR_ENV} if set, else .serve/)",
    )
    p.add_argument(
        "--jobs", type=int, default=None, help="parallel builds for --manifest (default: the number of cores)"
    )
    p.add_argument("--name", default=None, help="model name (default: the training folder's name)")
    p.add_argument(
        "--version",
        default=None,
        help="model version; when given the file is <name>-<version>.mar so versions live side by side "
        "(default: version 1.0 in <name>.mar)",
    )
    p.add_argument(
        "--model-store",
        default=str(ROOT / "model_store"),
        help="where archives and the catalog live (default: model_store/)",
    )
    p.add_argument(
        "--preset",
        choices=CHOICES,
        default=None,
        help="serving settings for a kind of traffic: latency (a lone request gets every core), throughput "
        "(a single-thread worker per core, small batches), balanced, or auto (a short calibration on this host "
        "picks one); sets workers, torch threads, batch size, batch delay and runtime, each overridden by its "
        "own flag; kept in archive.json (default: none, the settings below)",
    )
    p.add_argument(
        "--target-cores",
        type=int,
        default=None,
        help="with --preset: the cores of the machine that will serve the archive; --device gpu sizes for a GPU "
        "host (default: this machine's cores)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers TorchServe starts for the model (minWorkers) (default: 1)",
    )
    p.add_argument(
        "--max-workers", type=int, default=None, help="most workers it may scale to (maxWorkers) (default: --workers)"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads per worker; 0 = cores / workers, so workers x threads fit the machine (default: 0)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="most requests TorchServe batches into one call (default: 8)",
    )
    p.add_argument(
        "--max-batch-delay",
        type=int,
        default=None,
        help="ms TorchServe waits to fill a batch (default: 10); 0 with a batch size over 1 is written as 1, since "
        "TorchServe reads 0 as its 100 ms default",
    )
    p.add_argument(
        "--response-timeout",
        type=int,
        default=None,
        help="seconds before a worker is deemed stuck (default: 120)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default=None,
        help="where the workers run: auto = a GPU if TorchServe sees one (default: auto)",
    )
    p.add_argument(
        "--topk",
        type=int,
        default=None,
        help="classes returned per image, clamped to the number of classes (default: 5)",
    )
    p.add_argument(
        "--runtime",
        default=None,
        metavar="{" + ",".join(RUNTIMES) + "}",
        help="how workers run the model: eager PyTorch, a frozen TorchScript trace, ONNX Runtime, "
        "int8 static quantization (CPU) or torch.compile in the worker; "
        "all but eager are checked against eager on the validation set before the archive is written (default: eager)",
    )
    p.add_argument(
        "--val-data",
        default=None,
        help="validation dataset folder for that check (default: the run's own validation split, "
        "rebuilt from model.json)",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=256,
        help="training-split images int8 calibrates its activation ranges on (default: 256)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="refuse the archive when the runtime's top-1 is more than this many percentage points "
        "below eager's (a classifier), or its agreement with eager (mIoU of segmentation masks, cosine "
        "similarity of embeddings, matching detection boxes) is more than this many points below 100 "
        "(default: 1.0)",
    )
    p.add_argument(
        "--handler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the handler section of model-config.yaml, value parsed as YAML "
        "(e.g. score_threshold=0.5); repeatable (default: none)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when unchanged, and replace the archive of an existing name and version "
        "(never one that is served) (default: off)",
    )
    return p


def options_from_args(args) -> dict:
    handler = parse_key_values(args.handler_option, "--handler-option", ArchiveError)
    given = {key: getattr(args, key) for key in FLAGS}  # flags left out take the preset's or the default
    return {**{key: value for key, value in given.items() if value is not None}, "handler": handler}


FLAGS = {
    "workers": "--workers",
    "max_workers": "--max-workers",
    "batch_size": "--batch-size",
    "max_batch_delay": "--max-batch-delay",
    "response_timeout": "--response-timeout",
    "topk": "--topk",
    "torch_threads": "--torch-threads",
    "device": "--device",
    "runtime": "--runtime",
    "preset": "--preset",
    "target_cores": "--target-cores",
}


def as_flags(message: str) -> str:
    """An option error in the words of the command line (--max-workers, not max_workers)."""
    if message.startswith("handler option "):
        return "--handler-option " + message[len("handler option ") :]
    key = message.split(" ", 1)[0]
    if key in FLAGS:
        message = FLAGS[key] + message[len(key) :]
        message = re.sub(r"at least (\w+) \(", lambda m: f"at least {FLAGS.get(m[1], m[1])} (", message)
    return message


def verify(store: Path, repair: bool, run_dir: Path) -> int:
    catalog = Catalog(store)
    problems = catalog.problems()
    for problem in problems:
        print(f"mismatch: {problem}")
    print(f"{len(catalog.load())} catalogued archive(s) checked, {len(problems)} problem(s)")
    if not problems or not repair:
        return 1 if problems else 0
    refuse_if_served(
        store, {p.key for p in problems if p.key} | {f"file {p.file}" for p in problems}, run_dir, "repair"
    )
    for action in catalog.repair(problems):
        print(action)
    left = catalog.problems()
    print(f"repaired: {len(problems) - len(left)} problem(s) fixed, {len(left)} left")
    return 1 if left else 0


def run(args) -> int:
    store, run_dir = Path(args.model_store), Path(args.run_dir)
    if args.repair and not args.verify:
        raise ArchiveError("--repair goes with --verify (scripts/archive --verify --repair)")
    if args.verify:
        return verify(store, args.repair, run_dir)
    if args.remove:
        name, version = check_name(args.remove[0]), check_version(args.remove[1])
        Catalog(store).get(name, version)
        refuse_if_served(store, {f"{name}/{version}"}, run_dir, "remove")
        entry = Catalog(store).remove(name, version)
        print(f"removed {name}/{version} and {store / entry['file']}")
        return 0
    if args.manifest:
        if args.training:
            raise ArchiveError(f"give a training folder or --manifest, not both (got {args.training})")
        results = build_manifest(
            Path(args.manifest), store, force=args.force, jobs=args.jobs, serving_run_dir=run_dir, dry_run=args.dry_run
        )
        print_table(results)
        for r in results:
            if r.get("config"):  # --dry-run: what each archive's model-config.yaml would say
                print(f"{r['name']} {r['version']} -> {r['file']}: {json.dumps(r['config'])}")
        failed = sum(r["status"] == "failed" for r in results)
        if failed:
            print(f"error: {failed} of {len(results)} archive(s) failed", file=sys.stderr)
        return 1 if failed else 0
    if not args.training:
        raise ArchiveError("give a training output folder, --manifest FILE, --verify or --remove NAME VERSION")
    folder = Path(args.training)
    name = args.name if args.name is not None else folder.resolve().name
    options = options_from_args(args)
    try:
        model_config(options)
    except ArchiveError as e:
        raise ArchiveError(as_flags(str(e))) from None
    if args.dry_run:
        plan = plan_archive(
            folder, name, store, options, version=args.version, force=args.force, serving_run_dir=run_dir
        )
        status = {"new": "would build", "replaced": "would replace", "unchanged": "unchanged, would keep"}[
            plan["status"]
        ]
        print(
            f"{status} {store / plan['file']} ({plan['name']} {plan['version']}, {plan['meta']['task']}); "
            f"model-config: {json.dumps(plan['config'])}"
        )
        return 0
    result = build_archive(
        folder,
        name,
        store,
        options,
        version=args.version,
        force=args.force,
        val_data=args.val_data,
        calibration_images=args.calibration_images,
        max_accuracy_drop=args.max_accuracy_drop,
        serving_run_dir=run_dir,
    )
    path = store / result["file"]
    what = {"unchanged": "unchanged, kept", "replaced": "replaced"}.get(result["status"], "wrote")
    print(f"{what} {path} ({result['size'] / 1e6:.1f} MB, sha256 {result['sha256'][:12]})")
    if result.get("runtime"):
        from scripts.ops.optimize import summary

        print(summary(result["runtime"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when done, 2 for a usage mistake (a name, option, folder or manifest), 1 when the
    store or a server refuses (exists, served, changed); each refusal is one line on stderr."""
    args = get_args_parser().parse_args(argv)
    return one_line_errors(lambda: run(args), (CatalogError, OSError))


if __name__ == "__main__":
    sys.exit(main())
