"""Packaging: a training output folder (model.pt + model.json) into a `.mar` archive in a
model store, one at a time (`build_archive`, `plan_archive` for a dry run) or a manifest's
worth in parallel (`build_manifest`), each recorded in the store's catalog with its sha256
and the hash of its inputs. What an archive holds and the refusals are described in
scripts/archive's help (scripts/cli/archive.py), its command line."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import yaml

from handlers.options import OptionError, check_keys, check_options
from handlers.runtimes import CPU_ONLY, RUNTIMES
from model_defs.usage import UsageError
from scripts.ops.catalog import INNER_FILE, Catalog, CatalogError, sha256_file, versioned_file_name
from scripts.ops.names import check_name, check_version, inside
from scripts.ops.presets import apply_preset, calibrate
from scripts.ops.serve import default_run_dir, served_versions

ROOT = Path(__file__).resolve().parents[2]

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
    (scripts/ops/presets.py) fills what the options do not set explicitly."""
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
        "maxBatchDelay": served_batch_delay(int(o["batch_size"]), int(o["max_batch_delay"])),
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


def served_batch_delay(batch_size: int, delay_ms: int) -> int:
    """The maxBatchDelay to write: TorchServe 0.12 reads an archive's 0 as "not set" and waits
    its 100 ms default for each batch instead (ModelManager keeps only a delay > 0), so a lone
    request to a batch size over 1 would wait 100 ms. 1 ms is the shortest wait it honours."""
    return 1 if batch_size > 1 and delay_ms == 0 else delay_ms


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
        from scripts.ops.optimize import RuntimeCheckError, check_supported

        try:
            check_supported(runtime, meta["task"])
        except RuntimeCheckError as e:
            raise ArchiveError(str(e)) from None
    if config["handler"].get("explain_method") == "attention_rollout":
        from handlers.explain import rollout_refusal
        from model_defs.checkpoint import build_from_meta

        why = rollout_refusal(build_from_meta(meta), meta["task"], meta["arch"])
        if why:
            raise ArchiveError(f"{where}handler option explain_method: {why}")
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
    picks (scripts/ops/presets.py); a GPU target gets balanced without one."""
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
    run_dir = Path(serving_run_dir or default_run_dir())
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
    from scripts.ops.optimize import RuntimeCheckError, prepare_runtime

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


# -- command line ---------------------------------------------------------------------------
