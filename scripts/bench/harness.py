"""What every benchmark measures with: the same real JPEG, a run of random weights, an archive's
own handler unpacked and called in-process (the bare baseline), and the closed- and open-loop
HTTP loads with their percentiles. scripts/bench/serving.py, presets.py, gpu.py, metrics.py,
explain.py and steps.py all measure with these, so a figure means the same in each."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from scripts.ops.client import Client, percentile_ms


def cat_jpeg() -> bytes:
    """scikit-image's 451x300 photo of a cat as JPEG bytes (quality 90)."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def digit_png(size: int = 32) -> bytes:
    """The first of scikit-learn's real handwritten digits at `size` px as PNG bytes, as the
    demo's digits model is served (training.sample_data writes its dataset the same way)."""
    from training.sample_data import digit_images

    buf = io.BytesIO()
    digit_images(size)[0][0].save(buf, format="PNG")
    return buf.getvalue()


def random_weights_run(arch: str, out: Path, num_classes: int = 10, classes: list[str] | None = None) -> Path:
    """A training-output folder with random weights: speed does not depend on the weights."""
    import torch

    from model_defs import get_entry, get_model
    from model_defs.checkpoint import save_model_files

    torch.manual_seed(0)
    entry = get_entry(arch)
    classes = classes or [f"class_{i}" for i in range(num_classes)]
    num_classes = len(classes)
    model = get_model(arch, num_classes=num_classes)
    meta = {
        "arch": arch,
        "arch_args": {"num_classes": num_classes},
        "task": entry.task,
        "classes": classes,
        "preprocessing": entry.data_config.to_dict(),
        "note": "random weights, for speed measurements only",
    }
    save_model_files(out, model, meta)
    return out


def percentiles_ms(latencies: list[float]) -> dict:
    return {f"p{q}": percentile_ms(latencies, q) for q in (50, 90, 99)}


def summary(latencies: list[float], errors: int, seconds: float, items: int | None = None) -> dict:
    done = items if items is not None else len(latencies)
    return {
        "throughput": round(done / seconds, 2),
        "requests": len(latencies) + errors,
        "errors": errors,
        **percentiles_ms(latencies),
        "mean_ms": round(sum(latencies) / len(latencies) * 1000, 3) if latencies else None,
    }


def unpack_handler(
    mar: Path, dest: Path, torch_threads: int | None = None, gpu: int | None = None, handler_class: type | None = None
):
    """Our handler initialized in-process from the archive itself, as a worker would
    (with `torch_threads`, the handler's thread count is overridden; `handler_class`
    instead of the task's handler)."""
    from ts.context import Context

    from handlers.image_classifier import ImageClassifier
    from handlers.object_detector import ObjectDetector

    with zipfile.ZipFile(mar) as z:
        z.extractall(dest)
    config = yaml.safe_load((dest / "model-config.yaml").read_text())
    if torch_threads:
        config["handler"] = {**config.get("handler", {}), "torch_threads": torch_threads}
    task = json.loads((dest / "model.json").read_text())["task"]
    handler = (handler_class or {"classification": ImageClassifier, "detection": ObjectDetector}[task])()
    ctx = Context(
        mar.stem,
        str(dest),
        {"model": {"modelName": mar.stem}},
        int(config["batchSize"]),
        gpu,
        "0.12.0",
        model_yaml_config=config,
    )
    handler.initialize(ctx)
    return handler, config


def request_context(n: int):
    """A TorchServe context for a batch of `n` requests, as the worker passes to handle()."""
    from ts.context import Context, RequestProcessor

    ctx = Context("bench", "", {}, n, None, "0.12.0")
    ctx.request_processor = [RequestProcessor({}) for _ in range(n)]
    return ctx


def bare(handler, image: bytes, batch: int, seconds: float) -> dict:
    """The handler's whole handle() on `batch` copies of the image, back to back."""
    rows = [{"body": image} for _ in range(batch)]
    ctx = request_context(batch)
    for _ in range(3):
        handler.handle(rows, ctx)
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        handler.handle(rows, ctx)
        latencies.append(time.perf_counter() - t)
    return summary(latencies, 0, time.perf_counter() - start, items=len(latencies) * batch) | {"batch": batch}


def preprocessing_ms(handler, image: bytes, n: int = 300) -> float:
    """Median ms of the handler's preprocess_one (decode, resize, crop, normalize) per image."""
    for _ in range(20):
        handler.preprocess_one({"body": image})
    times = []
    for _ in range(n):
        t = time.perf_counter()
        handler.preprocess_one({"body": image})
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1000, 3)


def closed_loop(url: str, headers: dict, image: bytes, clients: int, seconds: float) -> dict:
    """`clients` threads, each sending its next request when the last one is answered."""
    latencies, errors = closed_loop_raw(url, headers, image, clients, seconds)
    return summary(latencies, errors, seconds) | {"clients": clients}


def closed_loop_raw(url: str, headers: dict, image: bytes, clients: int, seconds: float) -> tuple[list[float], int]:
    """closed_loop's (latencies in s, error count), for load spread over several processes."""
    latencies, errors, lock = [], [0], threading.Lock()
    warm_until = time.perf_counter() + min(2.0, seconds / 4)
    stop_at = warm_until + seconds

    def client():
        session = Client(url, headers)
        while True:
            t = time.perf_counter()
            if t >= stop_at:
                return
            ok, _ = session.post(image)
            if t >= warm_until:
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, errors[0]


def open_loop(url: str, headers: dict, image: bytes, rate: float, seconds: float) -> dict:
    """Requests sent at a fixed rate whatever the answers do; latency counts from the
    scheduled send time, so queueing inside an overloaded client is charged to the server."""
    n = max(1, int(rate * seconds))
    sessions = threading.local()
    latencies, errors, lock = [], [0], threading.Lock()

    def one(scheduled: float):
        if not hasattr(sessions, "s"):
            sessions.s = Client(url, headers)
        ok, _ = sessions.s.post(image)
        with lock:
            if ok:
                latencies.append(time.perf_counter() - scheduled)
            else:
                errors[0] += 1

    start = time.perf_counter() + 0.2
    with ThreadPoolExecutor(max_workers=64) as pool:
        for i in range(n):
            scheduled = start + i / rate
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            pool.submit(one, scheduled)
    return summary(latencies, errors[0], time.perf_counter() - start) | {"rate": rate}
