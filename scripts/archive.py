"""Pack training output folders (model.pt + model.json) into `.mar` archives in model_store/.

    scripts/archive runs/digits --name digits                 # model_store/digits.mar
    scripts/archive runs/digits --name digits --version 2.0   # model_store/digits-2.0.mar
    scripts/archive --manifest models.yaml                    # a batch, in parallel
    scripts/archive --verify                                  # every archive against the catalog
    scripts/archive runs/digits --name digits --runtime onnx  # an optimized runtime, checked against eager
    scripts/archive runs/digits --name digits --preset latency  # settings for a kind of traffic

`--preset latency|throughput|balanced|auto` sets workers, threads, batching and runtime for
this host or `--target-cores` (scripts/presets.py); explicit flags override it.

`--runtime` picks how workers run the model: eager (default), torchscript, onnx, int8,
compile, openvino or openvino_int8 (see handlers/runtimes.py). Every runtime but eager is built here and checked
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
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handlers.options import OptionError, check_keys, check_options  # noqa: E402
from handlers.runtimes import CPU_ONLY, RUNTIMES  # noqa: E402
from scripts.catalog import INNER_FILE, REJECTED, Catalog, CatalogError, sha256_file, versioned_file_name  # noqa: E402
from scripts.names import OneLineParser, UsageError, check_name, check_version, inside  # noqa: E402
from scripts.presets import CHOICES, apply_preset, calibrate  # noqa: E402
from scripts.serve import DEFAULT_RUN_DIR, served_versions  # noqa: E402

HANDLERS = {
    "classification": "image_classifier.py",
    "segmentation": "segmenter.py",
    "generation": "generator.py",
    "embedding": "embedder.py",
    "detection": "object_detector.py",
}
CODE_PACKAGES = ("model_defs", "handlers")
OPTIONS = {  # model-config settings, their defaults and the flag that sets each
    "workers": 1,
    "max_workers": None,
    "batch_size": 8,
    "max_batch_delay": 10,
    "response_timeout": 120,
    "device": "auto",
    "topk": 5,
    "torch_threads": 0,
    "runtime": "eager",
    "handler": {},
}


class ArchiveError(UsageError):
    """The archive cannot be built from what was given (a folder, a name, an option, a
    manifest); the message says why. Conflicts with the store are CatalogErrors."""


def model_config(options: dict, where: str = "", task: str | None = None) -> dict:
    """TorchServe's per-model settings (model-config.yaml) plus our handler's own section,
    after checking every option against the one schema (handlers/options.py). A `preset`
    (scripts/presets.py) fills what the options do not set explicitly."""
    runtime = options.get("runtime", OPTIONS["runtime"])
    if isinstance(runtime, str) and runtime not in RUNTIMES:
        raise ArchiveError(f"{where}unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    try:
        options, _ = apply_preset(check_options(options, where), task)
        o = {**OPTIONS, **check_options(options, where)}
    except OptionError as e:
        raise ArchiveError(str(e)) from None
    cfg = {
        "minWorkers": int(o["workers"]),
        "maxWorkers": max(int(o["workers"]), int(o["max_workers"] or o["workers"])),
        "batchSize": int(o["batch_size"]),
        "maxBatchDelay": int(o["max_batch_delay"]),
        "responseTimeout": int(o["response_timeout"]),
    }
    runtime = o["runtime"]
    if o["device"] != "auto" or runtime in CPU_ONLY:
        cfg["deviceType"] = "cpu" if runtime in CPU_ONLY else o["device"]
    cfg["handler"] = {"topk": int(o["topk"]), "runtime": o["runtime"], **dict(o["handler"] or {})}
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


def plan_archive(
    run_dir: Path,
    name: str,
    model_store: Path,
    options: dict | None = None,
    *,
    version: str | None = None,
    force: bool = False,
    task: str | None = None,
    serving_run_dir: Path | None = None,
    where: str = "",
) -> dict:
    """Everything build_archive checks, with nothing written: what would be built, where, and
    whether it is new, unchanged or a --force replacement. Raises what build_archive would."""
    name = check_name(name)
    if version is None:
        version, file_name = "1.0", f"{name}.mar"
    else:
        version = check_version(version)
        file_name = versioned_file_name(name, version)
    store = Path(model_store)
    target = inside(store, file_name)
    run_dir = Path(run_dir).resolve()
    meta = check_training_output(run_dir)
    if task and task != meta["task"]:
        raise ArchiveError(f"{where}{run_dir}/model.json is a {meta['task']} model, the manifest says {task}")
    options = resolve_auto(dict(options or {}), run_dir, meta)
    preset = preset_record(options, meta["task"])  # takes auto's calibration out of the options
    config = model_config(options, where, meta["task"])
    runtime = config["handler"]["runtime"]
    if runtime != "eager":
        from scripts.optimize import RuntimeCheckError, check_supported

        try:
            check_supported(runtime, meta["task"])
        except RuntimeCheckError as e:
            raise ArchiveError(str(e)) from None
    config_text = yaml.safe_dump(config, sort_keys=False)
    inputs = inputs_sha256(run_dir, name, version, config_text)
    entries = Catalog(store).load()
    key = f"{name}/{version}"
    known = entries.get(key)
    plan = {
        "name": name,
        "version": version,
        "file": file_name,
        "run_dir": run_dir,
        "meta": meta,
        "config": config,
        "config_text": config_text,
        "inputs": inputs,
        "known": known,
        "preset": preset,
    }
    holder = next((k for k, e in entries.items() if e["file"] == file_name and k != key), None)
    if holder:  # never, even with --force: that would silently change another version
        raise CatalogError(f"{file_name} already holds {holder} in {store}; give another --name or --version")
    if known and not force:
        if (
            known["inputs_sha256"] == inputs
            and known["file"] == file_name
            and target.is_file()
            and sha256_file(target) == known["sha256"]
        ):
            return {**plan, "status": "unchanged"}
        if known["inputs_sha256"] != inputs:
            why = f"in {known['file']}, built from other inputs"
        elif known["file"] != file_name:
            why = f"in {known['file']}"
        else:
            why = f"its archive {file_name} " + ("changed since it was built" if target.is_file() else "is missing")
        raise CatalogError(
            f"{key} already exists ({why}); give a new --version, or --force to replace it "
            f"(scripts/archive --remove {name} {version} drops it)"
        )
    if not known and target.exists() and not force:
        raise CatalogError(
            f"{target} already exists and is not in the catalog; pass --force to replace it, "
            "or scripts/archive --verify --repair to set it aside"
        )
    if force:
        refuse_if_served(
            store,
            {key} | ({f"file {known['file']}"} if known else set()) | {f"file {file_name}"},
            serving_run_dir,
            "replace",
        )
    return {**plan, "status": "replaced" if known or target.exists() else "new"}


def resolve_auto(options: dict, run_dir: Path, meta: dict) -> dict:
    """Options with `preset: auto` replaced by the preset a short calibration on this host
    picks (scripts/presets.py); a GPU target gets balanced without one."""
    if options.get("preset") != "auto":
        return options
    if options.get("device") == "gpu":
        calibration = {"picked": "balanced", "why": "a GPU target: not calibrated on this host"}
    else:
        from model_defs.checkpoint import load_trained

        calibration = calibrate(load_trained(run_dir)[0], meta)
    return {**options, "preset": calibration["picked"], "calibration": calibration}


def preset_record(options: dict, task: str) -> dict | None:
    """What archive.json says of the preset: its name, the target, its settings, what was overridden."""
    calibration = options.pop("calibration", None)
    _, record = apply_preset(options, task)
    if record and calibration:
        record["auto"] = calibration
    return record


def refuse_if_served(store: Path, wanted: set[str], serving_run_dir: Path | None, action: str) -> None:
    """Refuse to `action` a version ("name/version") or a file ("file NAME.mar") that the
    running server of `serving_run_dir` (default .serve/) serves from this store."""
    run_dir = Path(serving_run_dir or DEFAULT_RUN_DIR)
    served = served_versions(run_dir, store)
    hits = sorted(k for k, file in served.items() if k in wanted or f"file {file}" in wanted)
    if hits:
        name, version = hits[0].split("/")
        raise CatalogError(
            f"{hits[0]} is served from this store (run folder {run_dir}); refusing to {action} "
            f"it: unregister it first with scripts/models unregister {name} {version}"
        )


def build_archive(
    run_dir: Path,
    name: str,
    model_store: Path,
    options: dict | None = None,
    *,
    version: str | None = None,
    force: bool = False,
    task: str | None = None,
    val_data: Path | None = None,
    calibration_images: int = 256,
    max_accuracy_drop: float = 1.0,
    serving_run_dir: Path | None = None,
) -> dict:
    """Build (or skip, when unchanged) one archive; returns its catalog entry plus `status`.

    Without `version` the file is <name>.mar holding version 1.0; with it,
    <name>-<version>.mar. A name and version already catalogued are never replaced
    without `force`, and never while served. A runtime other than eager
    (options["runtime"]) is built and checked against eager on the run's validation
    split, or `val_data`, first; int8 calibrates on `calibration_images` training images.
    Top-1 more than `max_accuracy_drop` points below eager refuses the archive.
    """
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    start = time.time()
    model_store = Path(model_store)
    plan = plan_archive(
        run_dir, name, model_store, options, version=version, force=force, task=task, serving_run_dir=serving_run_dir
    )
    name, version, file_name, meta, run_dir = plan["name"], plan["version"], plan["file"], plan["meta"], plan["run_dir"]
    if plan["status"] == "unchanged":
        return {**plan["known"], "status": "unchanged", "seconds": round(time.time() - start, 2)}
    config, config_text = plan["config"], plan["config_text"]
    runtime = config["handler"]["runtime"]
    target = inside(model_store, file_name)
    inner = {
        "name": name,
        "version": version,
        "task": meta["task"],
        "arch": meta["arch"],
        "source": {
            "run": str(run_dir),
            "dataset_fingerprint": meta.get("dataset", {}).get("fingerprint"),
            "metrics": meta.get("metrics", {}),
            "trained": meta.get("created"),
        },
        "inputs_sha256": plan["inputs"],
        **({"preset": plan["preset"]} if plan["preset"] else {}),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=model_store) as tmp:
        stage = Path(tmp)
        extra = stage_extra_files(stage, run_dir, meta)
        if runtime != "eager":
            inner["runtime"] = optimized_runtime(
                run_dir,
                meta,
                extra,
                config,
                val_data=val_data,
                calibration_images=calibration_images,
                max_accuracy_drop=max_accuracy_drop,
            )
        (extra / INNER_FILE).write_text(json.dumps(inner, indent=2) + "\n")
        (stage / "model-config.yaml").write_text(config_text)
        out_dir = stage / "out"
        out_dir.mkdir()
        config = ModelArchiverConfig(
            model_name=name,
            handler=str(ROOT / "handlers" / HANDLERS[meta["task"]]),
            version=version,
            serialized_file=str(run_dir / "model.pt"),
            extra_files=str(extra),
            export_path=str(out_dir),
            config_file=str(stage / "model-config.yaml"),
            force=True,
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
    catalog = Catalog(model_store)
    catalog.record(entry)
    old = plan["known"]
    if old and old["file"] != file_name:  # --force under another file name: the old file goes
        inside(model_store, old["file"]).unlink(missing_ok=True)
    return {
        **entry,
        "status": "built" if plan["status"] == "new" else "replaced",
        "seconds": round(time.time() - start, 2),
    }


def optimized_runtime(run_dir: Path, meta: dict, extra: Path, config: dict, **check) -> dict:
    """Build the runtime's file into the staged archive root and check it against eager."""
    from model_defs.checkpoint import load_trained
    from scripts.optimize import RuntimeCheckError, prepare_runtime

    model, _ = load_trained(run_dir)
    try:
        return prepare_runtime(
            config["handler"]["runtime"], model, meta, extra, config["handler"], batch_size=config["batchSize"], **check
        )
    except RuntimeCheckError as e:
        raise ArchiveError(str(e)) from None


# -- batches -------------------------------------------------------------------------------


MANIFEST_KEYS = ("defaults", "models")
ENTRY_KEYS = ("name", "version", "run", "task", "config")


def load_manifest(path: Path) -> list[dict]:
    """The manifest's entries with defaults applied and paths resolved, every key and value
    checked; errors name the entry and the key (with a "did you mean" for a misspelling)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ArchiveError(f"manifest {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ArchiveError(f"manifest {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise ArchiveError(f"manifest {path} needs a non-empty 'models:' list")
    try:
        check_keys(doc, MANIFEST_KEYS, f"manifest {path}: ")
    except OptionError as e:
        raise ArchiveError(str(e)) from None
    if not isinstance(doc.get("models"), list) or not doc["models"]:
        raise ArchiveError(f"manifest {path} needs a non-empty 'models:' list")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ArchiveError(f"manifest {path}: defaults must be a mapping of options, got {defaults!r}")
    entries, seen = [], set()
    for i, m in enumerate(doc["models"], start=1):
        where = f"manifest {path} entry {i}: "
        if not isinstance(m, dict):
            raise ArchiveError(f"{where}not a mapping")
        try:
            check_keys(m, ENTRY_KEYS, where)
        except OptionError as e:
            raise ArchiveError(str(e)) from None
        missing = [k for k in ("name", "version", "run") if m.get(k) in (None, "")]
        if missing:
            raise ArchiveError(f"{where}has no {', '.join(missing)}")
        key = (check_name(m["name"], f"{where}name"), check_name(m["version"], f"{where}version"))
        if key in seen:
            raise ArchiveError(f"{where}{key[0]}/{key[1]} is listed twice")
        seen.add(key)
        config = m.get("config") or {}
        if not isinstance(config, dict):
            raise ArchiveError(f"{where}config must be a mapping of options, got {config!r}")
        options = {**defaults, **config}
        model_config(options, where)  # every option checked now, before any build starts
        run = Path(str(m["run"]))
        entries.append(
            {
                "name": key[0],
                "version": key[1],
                "task": m.get("task"),
                "run": run if run.is_absolute() else (Path(path).parent / run).resolve(),
                "options": options,
            }
        )
    return entries


def _build_entry(
    entry: dict, model_store: Path, force: bool, serving_run_dir: Path | None = None, dry_run: bool = False
) -> dict:
    """One manifest entry, in a worker process: a result row, never an exception."""
    start = time.time()
    try:
        if dry_run:
            plan = plan_archive(
                entry["run"],
                entry["name"],
                model_store,
                entry["options"],
                version=entry["version"],
                force=force,
                task=entry["task"],
                serving_run_dir=serving_run_dir,
            )
            status = {"new": "would build", "replaced": "would replace", "unchanged": "unchanged"}[plan["status"]]
            return {
                "name": plan["name"],
                "version": plan["version"],
                "file": plan["file"],
                "status": status,
                "config": plan["config"],
                "seconds": round(time.time() - start, 2),
            }
        return build_archive(
            entry["run"],
            entry["name"],
            model_store,
            entry["options"],
            version=entry["version"],
            force=force,
            task=entry["task"],
            serving_run_dir=serving_run_dir,
        )
    except (ArchiveError, CatalogError, OSError, ValueError) as e:
        return {
            "name": entry["name"],
            "version": entry["version"],
            "status": "failed",
            "error": str(e),
            "seconds": round(time.time() - start, 2),
        }


def build_manifest(
    path: Path,
    model_store: Path,
    *,
    force: bool = False,
    jobs: int | None = None,
    serving_run_dir: Path | None = None,
    dry_run: bool = False,
) -> list[dict]:
    from tqdm import tqdm

    entries = load_manifest(path)
    if dry_run:  # nothing is built: checked in this process, one entry after another
        return [_build_entry(e, model_store, force, serving_run_dir, dry_run=True) for e in entries]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(entries)))
    results = []
    # spawn, not fork: a forked child of a process that already ran torch's OpenMP threads
    # can deadlock in its first parallel op.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_build_entry, e, model_store, force, serving_run_dir) for e in entries]
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
        default=str(DEFAULT_RUN_DIR),
        help="the run folder of the server whose serving record protects archives from --force, --remove "
        "and --repair (default: .serve/)",
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
        help="ms TorchServe waits to fill a batch (default: 10)",
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
        "int8 static quantization (CPU) or torch.compile in the worker; all but eager are checked "
        "against eager on the validation set before the archive is written (default: eager)",
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
        "below eager's (default: 1.0)",
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
    handler = {}
    for pair in args.handler_option:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ArchiveError(f"--handler-option expects KEY=VALUE, got {pair!r}")
        try:
            handler[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ArchiveError(f"--handler-option {key}: {value!r} is not a readable value") from None
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
        from scripts.optimize import summary

        print(summary(result["runtime"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when done, 2 for a usage mistake (a name, option, folder or manifest), 1 when the
    store or a server refuses (exists, served, changed); each refusal is one line on stderr."""
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CatalogError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
