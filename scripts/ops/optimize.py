"""The archive-time side of the optimized runtimes: build each one's file, then prove it.

scripts/archive calls `prepare_runtime` for any runtime other than eager, before the
archive is written. It builds the runtime's file into the archive's staged folder
(TorchScript, ONNX, or an int8 model calibrated on training images), loads it exactly as
a worker will (handlers/runtimes.py) and runs it beside the eager model over the run's
validation split, so an optimized archive that answers worse than the trained model is
refused instead of served. The check's numbers go into archive.json and the catalog.

The validation split is rebuilt from what model.json records under `dataset`, with the
same functions training/train.py made it with; `--val-data DIR` replaces it. A classifier is
checked by its top-1 here; a segmenter, an embedder and a detector by how closely the
runtime's answers follow eager's (scripts/ops/runtime_checks.py). A runtime a task cannot
have (handlers/runtimes.py, TASK_RUNTIMES) is refused in one line before any work. Worker
code stays in handlers/runtimes.py (it ships inside every archive; this module never does).
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from handlers.runtimes import (
    ARTIFACTS,
    EagerDetector,
    EagerRunner,
    RuntimeConfigError,
    check_task_runtime,
    load_detection_runtime,
    load_runtime,
    require_cpp_compiler,
)
from model_defs.checkpoint import data_config_from_meta
from model_defs.preprocessing import eval_transform
from scripts.ops import runtime_checks
from scripts.ops.runtime_checks import RuntimeCheckError
from training.datasets import (
    DatasetError,
    ImageDataset,
    Sample,
    SkipCollate,
    parse_split_source,
    read_dataset,
    stratified_split,
)

INT8 = ("int8",)  # the runtimes calibrated on training images
ONNX_OPSET = 17  # torchvision's detectors export with the TorchScript-based exporter at this opset


def check_supported(kind: str, task: str) -> None:
    """Refuse, before any work, a runtime this model or machine cannot have."""
    try:
        check_task_runtime(kind, task)
    except RuntimeConfigError as e:
        raise RuntimeCheckError(str(e)) from None
    if kind == "compile":
        try:
            require_cpp_compiler()
        except RuntimeConfigError as e:
            raise RuntimeCheckError(str(e)) from None


def one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


@contextlib.contextmanager
def quiet_deprecations():
    """torch 2.14 warns on every torch.jit and torch.ao.quantization call; both still work."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.ao\.quantization")
        warnings.filterwarnings("ignore", message=r".*(reduce_range will be deprecated|quantized tensor creation)")
        yield


# -- data -----------------------------------------------------------------------------------


def recorded_split(meta: dict) -> tuple[list[Sample], list[Sample]]:
    """The run's (train, validation) samples, rebuilt as training made them from model.json."""
    ds = meta.get("dataset") or {}
    if not ds.get("root") or not ds.get("val_source"):
        raise DatasetError("model.json records no training dataset")
    layout = ds.get("layout", "auto")
    spec = read_dataset(ds["root"], layout)
    stratified = parse_split_source(ds["val_source"])
    if stratified:
        train, val = stratified_split(spec.samples, *stratified)
    else:
        train, val = spec.samples, read_dataset(ds["val_source"], layout, classes=meta["classes"]).samples
    if (len(train), len(val)) != (ds.get("train_images", len(train)), ds.get("val_images", len(val))):
        raise DatasetError(
            f"{ds['root']} changed since training: {len(train)} train / {len(val)} validation "
            f"images now, model.json says {ds['train_images']} / {ds['val_images']}"
        )
    return train, val


def check_images(meta: dict, kind: str, val_data: Path | None, calibration_images: int) -> tuple[list, list, str]:
    """(validation samples, calibration samples, where the validation images come from)."""
    try:
        split = None if val_data and kind not in INT8 else recorded_split(meta)
    except DatasetError as e:
        need = "training split for int8 calibration" if val_data else "validation split for the accuracy check"
        hint = "" if val_data else "; give --val-data DIR"
        raise RuntimeCheckError(f"cannot rebuild the run's {need}: {e}{hint}") from None
    if val_data:
        try:
            val = read_dataset(val_data, "auto", classes=meta["classes"]).samples
        except DatasetError as e:
            raise RuntimeCheckError(f"--val-data: {e}") from None
        source = str(val_data)
    else:
        val, source = split[1], f"{meta['dataset']['val_source']}, --data {meta['dataset']['root']}"
    calibration = []
    if kind in INT8:
        train = split[0]
        calibration = random.Random(0).sample(train, min(max(1, calibration_images), len(train)))
    return val, calibration, source


def image_batches(samples: list[Sample], meta: dict, batch_size: int):
    """(images, targets) batches, preprocessed exactly as the handler does (load_image + eval_transform)."""
    cfg = data_config_from_meta(meta)
    dataset = ImageDataset(
        samples, len(meta["classes"]), bool(meta.get("multi_label")), cfg.channels, eval_transform(cfg)
    )
    for batch, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=SkipCollate()):
        if batch is not None:
            yield batch


# -- the files each runtime loads -----------------------------------------------------------


def save_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace (any batch size runs afterwards) and freeze: weights become constants, BN folds into conv."""
    with quiet_deprecations(), torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(model.eval(), example))
        frozen.save(str(path))


def save_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export with a dynamic batch dimension: the dynamo exporter, else the TorchScript-based one."""
    common = dict(input_names=["input"], output_names=["output"], verbose=False)
    try:
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            **common,
        )
    except Exception as e:  # noqa: BLE001 - any failure of the new exporter: try the old one
        warnings.warn(f"dynamo ONNX export failed ({type(e).__name__}: {e}); using dynamo=False", stacklevel=2)
        with quiet_deprecations():
            torch.onnx.export(
                model.eval(),
                (example,),
                str(path),
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                **common,
            )


def save_int8(model: nn.Module, example: torch.Tensor, calibration, path: Path) -> None:
    """Post-training static quantization (FX graph mode, x86 qconfig), then saved as TorchScript."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with quiet_deprecations():
        prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for images, _ in calibration:
                prepared(images)
        quantized = convert_fx(prepared)
    save_torchscript(quantized, example, path)


def save_detector(kind: str, model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A torchvision detector as TorchScript (scripted: tracing would fix its box count) or as
    ONNX from one image (3, H, W), its height and width dynamic (the handler keeps each image's
    aspect ratio), its number of boxes dynamic."""
    with quiet_deprecations(), torch.no_grad():
        if kind == "torchscript":
            torch.jit.script(model.eval()).save(str(path))
            return
        outputs = list(model([example])[0])  # the answer's keys, in the order the graph returns them
        torch.onnx.export(
            model.eval(),
            ([example],),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={"image": {1: "height", 2: "width"}, **{name: {0: "boxes"} for name in outputs}},
        )


def save_artifact(
    kind: str, model: nn.Module, example: torch.Tensor, calibration, folder: Path, task: str = "classification"
) -> None:
    """The file `kind` loads, into `folder`, from a copy of `model` (for detection: `example`
    is one image)."""
    if kind not in ARTIFACTS:
        return  # compile: nothing to build, the worker compiles
    path, model = Path(folder) / ARTIFACTS[kind], copy.deepcopy(model)
    if task == "detection":
        save_detector(kind, model, example, path)
    elif kind == "torchscript":
        save_torchscript(model, example, path)
    elif kind == "onnx":
        save_onnx(model, example, path)
    else:
        save_int8(model, example, calibration, path)


# -- the check ------------------------------------------------------------------------------


def compare(eager, runner, batches, multi_label: bool) -> dict:
    """Top-1 of both, their top-1 agreement and the largest probability difference."""
    to_probs = torch.sigmoid if multi_label else (lambda logits: torch.softmax(logits, dim=1))
    n = eager_hits = hits = agree = 0
    max_diff = 0.0
    for images, targets in batches:
        p_eager, p_runtime = to_probs(eager(images).float()), to_probs(runner(images).float())
        top_eager, top_runtime = p_eager.argmax(1), p_runtime.argmax(1)

        def correct(top, targets=targets):  # single-label: the target; multi-label: any of its labels
            return targets.gather(1, top[:, None])[:, 0] > 0 if targets.dim() == 2 else top == targets

        n += len(images)
        eager_hits += int(correct(top_eager).sum())
        hits += int(correct(top_runtime).sum())
        agree += int((top_eager == top_runtime).sum())
        max_diff = max(max_diff, (p_eager - p_runtime).abs().max().item())
    if not n:
        raise RuntimeCheckError("no readable validation images for the accuracy check")
    return {
        "images": n,
        "eager_top1": 100 * eager_hits / n,
        "top1": 100 * hits / n,
        "agreement": 100 * agree / n,
        "max_prob_diff": max_diff,
    }


def prepare_runtime(
    kind: str,
    model: nn.Module,
    meta: dict,
    folder: Path,
    handler_config: dict,
    *,
    batch_size: int,
    val_data: Path | None = None,
    calibration_images: int = 256,
    max_accuracy_drop: float = 1.0,
) -> dict:
    """Build `kind`'s file into `folder` (the archive root) and check it against eager on CPU.

    Returns the record archive.json keeps; raises RuntimeCheckError when the runtime loses
    more than `max_accuracy_drop` points of top-1 (a classifier) or agrees with eager less
    than 100 - `max_accuracy_drop` percent (the other tasks), or cannot be built or checked.
    """
    start = time.time()
    check_supported(kind, meta["task"])
    if meta["task"] != "classification":
        check = dict(val_data=val_data, calibration_images=calibration_images, max_accuracy_drop=max_accuracy_drop)
        return prepare_task_runtime(kind, model, meta, folder, handler_config, batch_size=batch_size, **check)
    val, calibration, source = check_images(meta, kind, Path(val_data) if val_data else None, calibration_images)
    cpu = torch.device("cpu")
    model = copy.deepcopy(model).to(cpu).eval()
    first = next(image_batches(val[:batch_size], meta, batch_size), None)
    if first is None:
        raise RuntimeCheckError(f"the first {batch_size} validation images are unreadable ({source})")
    try:
        save_artifact(kind, model, first[0], image_batches(calibration, meta, batch_size), folder)
    except Exception as e:  # noqa: BLE001 - tracing/export/quantization failures, named in one line
        raise RuntimeCheckError(f"runtime {kind}: building {ARTIFACTS.get(kind, 'it')} failed: {one_line(e)}") from e
    try:  # the runtime loaded as a worker loads it (the folder is the archive root to be)
        runner = load_runtime(handler_config, folder, copy.deepcopy(model), cpu)
    except RuntimeConfigError as e:
        raise RuntimeCheckError(f"runtime {kind}: {e}") from None
    eager = EagerRunner(model, cpu, channels_last=False)  # the trained model as evaluated
    try:
        with quiet_deprecations():
            record = compare(eager, runner, image_batches(val, meta, batch_size), bool(meta.get("multi_label")))
    except RuntimeCheckError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a batch size the exported file cannot take
        raise RuntimeCheckError(f"runtime {kind} failed on the validation images: {one_line(e)}") from e
    drop = record["eager_top1"] - record["top1"]
    record = {
        "kind": kind,
        "images": record["images"],
        "eager_top1": round(record["eager_top1"], 2),
        "top1": round(record["top1"], 2),
        "agreement": round(record["agreement"], 2),
        "max_prob_diff": float(f"{record['max_prob_diff']:.3g}"),
        "seconds": round(time.time() - start, 1),
        "validation": source,
        **({"calibration_images": len(calibration)} if kind in INT8 else {}),
    }
    if drop > max_accuracy_drop:
        raise RuntimeCheckError(
            f"runtime {kind} loses {drop:.2f} points of top-1 on {record['images']} validation "
            f"images (eager {record['eager_top1']:.2f}%, {kind} {record['top1']:.2f}%), more than "
            f"--max-accuracy-drop {max_accuracy_drop:g}; no archive written"
        )
    return record


def prepare_task_runtime(
    kind: str,
    model: nn.Module,
    meta: dict,
    folder: Path,
    handler_config: dict,
    *,
    batch_size: int,
    val_data: Path | None,
    calibration_images: int,
    max_accuracy_drop: float,
) -> dict:
    """prepare_runtime for a segmenter, an embedder or a detector: built as a classifier's,
    checked by its agreement with eager (scripts/ops/runtime_checks.py)."""
    start, task = time.time(), meta["task"]
    paths, calibration, source = runtime_checks.check_images(
        meta, kind, Path(val_data) if val_data else None, calibration_images, kind in INT8
    )
    cpu = torch.device("cpu")
    model = copy.deepcopy(model).to(cpu).eval()
    first = next(runtime_checks.batches(paths[:batch_size], meta, batch_size), None)
    if first is None:
        raise RuntimeCheckError(f"the first {batch_size} images of the check are unreadable ({source})")
    example = first[0] if task == "detection" else first
    calibrate = ((images, None) for images in runtime_checks.batches(calibration, meta, batch_size))
    try:
        save_artifact(kind, model, example, calibrate, folder, task)
    except Exception as e:  # noqa: BLE001 - scripting/export/quantization failures, named in one line
        raise RuntimeCheckError(
            f"runtime {kind}: building {ARTIFACTS.get(kind, 'it')} for {meta['arch']} failed: {one_line(e)}; "
            f"archive it with another runtime"
        ) from e
    try:  # the runtime loaded as a worker loads it (the folder is the archive root to be)
        load = load_detection_runtime if task == "detection" else load_runtime
        runner = load(handler_config, folder, copy.deepcopy(model), cpu)
    except RuntimeConfigError as e:
        raise RuntimeCheckError(f"runtime {kind}: {e}") from None
    eager = EagerDetector(model, cpu) if task == "detection" else EagerRunner(model, cpu, channels_last=False)
    inputs = runtime_checks.batches(paths, meta, batch_size)
    try:
        with quiet_deprecations():
            found = runtime_checks.compare(task, eager, runner, inputs, meta, handler_config)
    except Exception as e:  # noqa: BLE001 - e.g. an input shape the exported file cannot take
        raise RuntimeCheckError(f"runtime {kind} failed on the check images: {one_line(e)}") from e
    if not found["images"]:
        raise RuntimeCheckError(f"no readable images for the check of runtime {kind} ({source})")
    metric = runtime_checks.METRICS[task]
    record = {
        "kind": kind,
        "metric": metric,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in found.items()},
        "seconds": round(time.time() - start, 1),
        "validation": source,
        **({"calibration_images": len(calibration)} if kind in INT8 else {}),
    }
    if 100 - found["agreement"] > max_accuracy_drop:
        raise RuntimeCheckError(
            f"runtime {kind} agrees with eager at {found['agreement']:.2f}% ({metric}, {task}) on "
            f"{found['images']} images, more than --max-accuracy-drop {max_accuracy_drop:g} below 100; "
            "no archive written"
        )
    return record


def summary(record: dict) -> str:
    """One line for the command line."""
    if "metric" in record:
        return runtime_checks.summary(record)
    return (
        f"runtime {record['kind']}: top-1 {record['top1']:.2f}% vs eager {record['eager_top1']:.2f}%, "
        f"agreement {record['agreement']:.2f}%, max prob diff {record['max_prob_diff']:.2g} "
        f"on {record['images']} validation images ({record['seconds']:.1f}s)"
    )
