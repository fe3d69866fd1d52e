"""Pack training output folders (model.pt + model.json) into `.mar` archives in model_store/.

    scripts/archive runs/digits --name digits                 # model_store/digits.mar
    scripts/archive runs/digits --name digits --version 2.0   # model_store/digits-2.0.mar
    scripts/archive --manifest models.yaml                    # a batch, in parallel
    scripts/archive --verify                                  # every archive against the catalog
    scripts/archive runs/digits --name digits --runtime onnx  # an optimized runtime, checked against eager

`--runtime` picks how workers run the model: eager (default), torchscript, onnx, int8 or
compile (see handlers/runtimes.py). Every runtime but eager is built here and checked
against eager on the run's validation split (or --val-data) before anything is written;
one that loses more than --max-accuracy-drop points of top-1 is refused
(scripts/optimize.py). The check is kept in archive.json and the catalog.

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
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handlers.runtimes import AUTOCAST_DTYPES, RUNTIMES  # noqa: E402
from scripts.catalog import INNER_FILE, Catalog, CatalogError, sha256_file, versioned_file_name  # noqa: E402

HANDLERS = {
    "classification": "image_classifier.py",
    "segmentation": "segmenter.py",
    "generation": "generator.py",
    "embedding": "embedder.py",
    "detection": "object_detector.py",
}
CODE_PACKAGES = ("model_defs", "handlers")
OPTIONS = {  # model-config settings, their defaults and the flag that sets each
    "workers": 1, "max_workers": None, "batch_size": 8, "max_batch_delay": 10, "response_timeout": 120,
    "device": "auto", "topk": 5, "torch_threads": 0, "runtime": "eager", "handler": {},
}


class ArchiveError(ValueError):
    """The archive cannot be built; the message says why."""


def model_config(options: dict) -> dict:
    """TorchServe's per-model settings (model-config.yaml) plus our handler's own section."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ArchiveError(f"unknown model-config setting(s): {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    o = {**OPTIONS, **options}
    if o["device"] not in ("auto", "cpu", "gpu"):
        raise ArchiveError(f"device must be auto, cpu or gpu, got {o['device']!r}")
    runtime = o["runtime"]
    if runtime not in RUNTIMES:
        raise ArchiveError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "int8" and o["device"] == "gpu":
        raise ArchiveError("runtime int8 runs on the CPU only (x86 int8 kernels); use --device cpu or auto, "
                           "or another runtime for a GPU")
    if "runtime" in (o["handler"] or {}):
        raise ArchiveError("set the runtime with --runtime (the runtime option), not as a handler option")
    autocast = (o["handler"] or {}).get("autocast")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ArchiveError(f"handler option autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {autocast!r}")
    cfg = {
        "minWorkers": int(o["workers"]),
        "maxWorkers": max(int(o["workers"]), int(o["max_workers"] or o["workers"])),
        "batchSize": int(o["batch_size"]),
        "maxBatchDelay": int(o["max_batch_delay"]),
        "responseTimeout": int(o["response_timeout"]),
    }
    if o["device"] != "auto" or runtime == "int8":
        cfg["deviceType"] = "cpu" if runtime == "int8" else o["device"]
    cfg["handler"] = {"topk": int(o["topk"]), "runtime": runtime, **dict(o["handler"] or {})}
    if runtime != "eager":  # compiled / profiled before the first request, at both ends of the batch sizes
        cfg["handler"]["warmup_batch_sizes"] = sorted({1, cfg["batchSize"]})
    if o["torch_threads"]:
        cfg["handler"]["torch_threads"] = int(o["torch_threads"])
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


def code_files() -> list[Path]:
    return sorted(p for pkg in CODE_PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def inputs_sha256(run_dir: Path, name: str, version: str, config_text: str) -> str:
    """One hash over everything that goes into an archive: unchanged hash, unchanged archive."""
    h = hashlib.sha256(f"{name}\0{version}\0{config_text}\0".encode())
    files = [(p.name, p) for p in (run_dir / "model.pt", run_dir / "model.json")]
    files += [(str(p.relative_to(ROOT)), p) for p in code_files()]
    for label, path in files:
        h.update(label.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def stage_extra_files(stage: Path, run_dir: Path, meta: dict) -> Path:
    """The folder whose contents the archiver copies to the archive root (archive.json comes last)."""
    extra = stage / "extra"
    extra.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "__main__.py")
    for package in CODE_PACKAGES:
        shutil.copytree(ROOT / package, extra / package, ignore=ignore)
    shutil.copy2(run_dir / "model.json", extra / "model.json")
    labels = {str(i): name for i, name in enumerate(meta["classes"])}
    (extra / "index_to_name.json").write_text(json.dumps(labels, indent=2) + "\n")
    return extra


def build_archive(run_dir: Path, name: str, model_store: Path, options: dict | None = None, *,
                  version: str | None = None, force: bool = False, task: str | None = None,
                  val_data: Path | None = None, calibration_images: int = 256, max_accuracy_drop: float = 1.0) -> dict:
    """Build (or skip, when unchanged) one archive; returns its catalog entry plus `status`.

    A runtime other than eager (options["runtime"]) is built and checked against eager on
    the run's validation split, or `val_data`, first; int8 calibrates on
    `calibration_images` training images. Top-1 more than `max_accuracy_drop` points below
    eager refuses the archive.
    """
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    start = time.time()
    run_dir, model_store = Path(run_dir).resolve(), Path(model_store)
    meta = check_training_output(run_dir)
    if task and task != meta["task"]:
        raise ArchiveError(f"{run_dir}/model.json is a {meta['task']} model, the manifest says {task}")
    file_name = versioned_file_name(name, version) if version else f"{name}.mar"
    version = version or "1.0"
    config = model_config(options or {})
    runtime = config["handler"]["runtime"]
    if runtime != "eager":
        from scripts.optimize import RuntimeCheckError, check_supported

        try:
            check_supported(runtime, meta["task"])
        except RuntimeCheckError as e:
            raise ArchiveError(str(e)) from None
    config_text = yaml.safe_dump(config, sort_keys=False)
    inputs = inputs_sha256(run_dir, name, version, config_text)
    catalog = Catalog(model_store)
    target = model_store / file_name
    known = catalog.load().get(f"{name}/{version}")
    if known and target.is_file() and not force:
        if known["inputs_sha256"] == inputs and known["file"] == file_name and sha256_file(target) == known["sha256"]:
            return {**known, "status": "unchanged", "seconds": round(time.time() - start, 2)}
        raise ArchiveError(f"{name}/{version} already exists ({file_name}) with other inputs; "
                           "give a new --version, or --force to replace it")
    if target.exists() and not force and not known:
        raise ArchiveError(f"{target} already exists; pass --force to replace it")

    inner = {
        "name": name, "version": version, "task": meta["task"], "arch": meta["arch"],
        "source": {"run": str(run_dir), "dataset_fingerprint": meta.get("dataset", {}).get("fingerprint"),
                   "metrics": meta.get("metrics", {}), "trained": meta.get("created")},
        "inputs_sha256": inputs,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=model_store) as tmp:
        stage = Path(tmp)
        extra = stage_extra_files(stage, run_dir, meta)
        if runtime != "eager":
            inner["runtime"] = optimized_runtime(run_dir, meta, extra, config, val_data=val_data,
                                                 calibration_images=calibration_images,
                                                 max_accuracy_drop=max_accuracy_drop)
        (extra / INNER_FILE).write_text(json.dumps(inner, indent=2) + "\n")
        (stage / "model-config.yaml").write_text(config_text)
        out_dir = stage / "out"
        out_dir.mkdir()
        config = ModelArchiverConfig(
            model_name=name, handler=str(ROOT / "handlers" / HANDLERS[meta["task"]]), version=version,
            serialized_file=str(run_dir / "model.pt"), extra_files=str(extra), export_path=str(out_dir),
            config_file=str(stage / "model-config.yaml"), force=True,
        )
        # The archiver stages files in $TMPDIR/<name>: give it a private one.
        old_tempdir, tempfile.tempdir = tempfile.tempdir, str(stage)
        try:
            generate_model_archive(config)
        finally:
            tempfile.tempdir = old_tempdir
        built = out_dir / f"{name}.mar"
        if not built.is_file():
            raise ArchiveError(f"the archiver did not produce {built.name}")
        entry = {**inner, "file": file_name, "sha256": sha256_file(built), "size": built.stat().st_size}
        os.replace(built, target)  # same filesystem: atomic
    catalog.record(entry)
    return {**entry, "status": "built", "seconds": round(time.time() - start, 2)}


def optimized_runtime(run_dir: Path, meta: dict, extra: Path, config: dict, **check) -> dict:
    """Build the runtime's file into the staged archive root and check it against eager."""
    from model_defs.checkpoint import load_trained
    from scripts.optimize import RuntimeCheckError, prepare_runtime

    model, _ = load_trained(run_dir)
    try:
        return prepare_runtime(config["handler"]["runtime"], model, meta, extra, config["handler"],
                               batch_size=config["batchSize"], **check)
    except RuntimeCheckError as e:
        raise ArchiveError(str(e)) from None


# -- batches -------------------------------------------------------------------------------


def load_manifest(path: Path) -> list[dict]:
    """The manifest's entries with defaults applied and paths resolved; errors name the entry."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ArchiveError(f"manifest {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ArchiveError(f"manifest {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
        raise ArchiveError(f"manifest {path} needs a non-empty 'models:' list")
    defaults = doc.get("defaults") or {}
    entries, seen = [], set()
    for i, m in enumerate(doc["models"], start=1):
        where = f"manifest {path} entry {i}"
        if not isinstance(m, dict):
            raise ArchiveError(f"{where} is not a mapping")
        missing = [k for k in ("name", "version", "run") if not m.get(k)]
        if missing:
            raise ArchiveError(f"{where} has no {', '.join(missing)}")
        key = (str(m["name"]), str(m["version"]))
        if key in seen:
            raise ArchiveError(f"{where}: {key[0]}/{key[1]} is listed twice")
        seen.add(key)
        run = Path(m["run"])
        entries.append({"name": key[0], "version": key[1], "task": m.get("task"),
                        "run": run if run.is_absolute() else (Path(path).parent / run).resolve(),
                        "options": {**defaults, **(m.get("config") or {})}})
    return entries


def _build_entry(entry: dict, model_store: Path, force: bool) -> dict:
    """One manifest entry, in a worker process: a result row, never an exception."""
    start = time.time()
    try:
        return build_archive(entry["run"], entry["name"], model_store, entry["options"],
                             version=entry["version"], force=force, task=entry["task"])
    except (ArchiveError, CatalogError, OSError, ValueError) as e:
        return {"name": entry["name"], "version": entry["version"], "status": "failed",
                "error": str(e), "seconds": round(time.time() - start, 2)}


def build_manifest(path: Path, model_store: Path, *, force: bool = False, jobs: int | None = None) -> list[dict]:
    from tqdm import tqdm

    entries = load_manifest(path)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(entries)))
    results = []
    # spawn, not fork: a forked child of a process that already ran torch's OpenMP threads
    # can deadlock in its first parallel op.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_build_entry, e, model_store, force) for e in entries]
        for future in tqdm(as_completed(futures), total=len(futures), desc="archiving", unit="model"):
            results.append(future.result())
    order = {(e["name"], e["version"]): i for i, e in enumerate(entries)}
    return sorted(results, key=lambda r: order[(r["name"], r["version"])])


def print_table(results: list[dict]) -> None:
    rows = [("name", "version", "size", "sha256", "seconds", "status")]
    for r in results:
        size = f"{r['size'] / 1e6:.1f} MB" if r.get("size") else "-"
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        rows.append((r["name"], r["version"], size, (r.get("sha256") or "-")[:12], f"{r['seconds']:.1f}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])


# -- command line ---------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="training output folder holding model.pt and model.json")
    p.add_argument("--manifest", default=None, help="YAML manifest of many models to archive in parallel (default: none)")
    p.add_argument("--verify", action="store_true", help="check every archive in the store against the catalog and exit (default: off)")
    p.add_argument("--jobs", type=int, default=None, help="parallel builds for --manifest (default: the number of cores)")
    p.add_argument("--name", default=None, help="model name (default: the training folder's name)")
    p.add_argument("--version", default=None,
                   help="model version; when given the file is <name>-<version>.mar so versions live side by side "
                        "(default: version 1.0 in <name>.mar)")
    p.add_argument("--model-store", default=str(ROOT / "model_store"), help="where archives and the catalog live (default: model_store/)")
    p.add_argument("--workers", type=int, default=OPTIONS["workers"], help="workers TorchServe starts for the model (minWorkers) (default: 1)")
    p.add_argument("--max-workers", type=int, default=None, help="most workers it may scale to (maxWorkers) (default: --workers)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch threads per worker; 0 = cores / workers, so workers x threads fit the machine (default: 0)")
    p.add_argument("--batch-size", type=int, default=OPTIONS["batch_size"], help="most requests TorchServe batches into one call (default: 8)")
    p.add_argument("--max-batch-delay", type=int, default=OPTIONS["max_batch_delay"], help="ms TorchServe waits to fill a batch (default: 10)")
    p.add_argument("--response-timeout", type=int, default=OPTIONS["response_timeout"], help="seconds before a worker is deemed stuck (default: 120)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where the workers run: auto = a GPU if TorchServe sees one (default: auto)")
    p.add_argument("--topk", type=int, default=OPTIONS["topk"], help="classes returned per image, clamped to the number of classes (default: 5)")
    p.add_argument("--runtime", default="eager", metavar="{" + ",".join(RUNTIMES) + "}",
                   help="how workers run the model: eager PyTorch, a frozen TorchScript trace, ONNX Runtime, "
                        "int8 static quantization (CPU) or torch.compile in the worker; all but eager are checked "
                        "against eager on the validation set before the archive is written (default: eager)")
    p.add_argument("--val-data", default=None,
                   help="validation dataset folder for that check (default: the run's own validation split, "
                        "rebuilt from model.json)")
    p.add_argument("--calibration-images", type=int, default=256,
                   help="training-split images int8 calibrates its activation ranges on (default: 256)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                   help="refuse the archive when the runtime's top-1 is more than this many percentage points "
                        "below eager's (default: 1.0)")
    p.add_argument("--handler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra setting for the handler section of model-config.yaml, value parsed as YAML "
                        "(e.g. score_threshold=0.5); repeatable (default: none)")
    p.add_argument("--force", action="store_true", help="rebuild even when unchanged, and replace an archive built from other inputs (default: off)")
    return p


def options_from_args(args) -> dict:
    handler = {}
    for pair in args.handler_option:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ArchiveError(f"--handler-option expects KEY=VALUE, got {pair!r}")
        handler[key] = yaml.safe_load(value)
    return {"workers": args.workers, "max_workers": args.max_workers, "batch_size": args.batch_size,
            "max_batch_delay": args.max_batch_delay, "response_timeout": args.response_timeout,
            "device": args.device, "topk": args.topk, "torch_threads": args.torch_threads, "runtime": args.runtime,
            "handler": handler}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    store = Path(args.model_store)
    try:
        if args.verify:
            problems = Catalog(store).verify()
            for problem in problems:
                print(f"mismatch: {problem}")
            print(f"{len(Catalog(store).load())} catalogued archive(s) checked, {len(problems)} problem(s)")
            return 1 if problems else 0
        if args.manifest:
            results = build_manifest(Path(args.manifest), store, force=args.force, jobs=args.jobs)
            print_table(results)
            failed = sum(r["status"] == "failed" for r in results)
            if failed:
                print(f"error: {failed} of {len(results)} archive(s) failed", file=sys.stderr)
            return 1 if failed else 0
        if not args.run_dir:
            raise ArchiveError("give a training output folder, --manifest FILE or --verify")
        run_dir = Path(args.run_dir)
        name = args.name or run_dir.resolve().name
        result = build_archive(run_dir, name, store, options_from_args(args), version=args.version, force=args.force,
                               val_data=args.val_data, calibration_images=args.calibration_images,
                               max_accuracy_drop=args.max_accuracy_drop)
    except (ArchiveError, CatalogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = store / result["file"]
    what = "unchanged, kept" if result["status"] == "unchanged" else "wrote"
    print(f"{what} {path} ({result['size'] / 1e6:.1f} MB, sha256 {result['sha256'][:12]})")
    if result.get("runtime"):
        from scripts.optimize import summary

        print(summary(result["runtime"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
