"""Serving presets: workers, torch threads, batching and runtime for a kind of traffic.

`scripts/archive --preset latency|throughput|balanced|auto` (or `preset:` in a manifest)
fills the model-config settings from `preset_options`, a pure function of the preset, the
target machine's cores and whether it serves from a GPU; any option given explicitly
(a flag, or a manifest key) overrides the preset's value. The choices follow what
scripts/bench_serving measured on a 2-core host (docs/performance.md):

- latency:    a lone request gets every core: one worker with all the threads (up to 8;
              more workers beyond that), batch 1, no batch delay, so nobody waits for a
              batch mate who never comes;
- throughput: one single-thread worker per core, batches of 2 after up to 5 ms, so the
              cores never stall on each other's OpenMP barriers and two batches run at once;
- balanced:   a worker per 4 cores (one on a small host) with batches of 2 after at most
              1 ms: a lone request is near latency's, a busy server near throughput's.

On a GPU the worker count stays small and batches grow (the GPU, not the cores, does the
work). The runtime is int8 for a classifier on the CPU, eager otherwise. `auto` times the
model on this host (`calibrate`) and picks one of the three.
"""

from __future__ import annotations

import os
import time

from handlers.options import PRESETS as CHOICES  # the three below and auto

PRESETS = tuple(c for c in CHOICES if c != "auto")
# The tasks a preset gives int8: a classifier's int8 keeps its top-1 within the default bound;
# segmenters and embedders may have int8 too (handlers/runtimes.py), chosen with --runtime.
INT8_TASKS = ("classification",)


def preset_options(preset: str, cores: int, gpu: bool = False, task: str | None = None) -> dict:
    """The model options (scripts/archive's keys) `preset` sets for a host of `cores` cores."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    cores = max(1, int(cores))
    if gpu:
        threads = min(cores, 4)  # CPU threads for decoding and the Python side of each worker
        options = {
            "latency": {"workers": 1, "batch_size": 1, "max_batch_delay": 0},
            "throughput": {"workers": 2, "batch_size": 32, "max_batch_delay": 10},
            "balanced": {"workers": 1, "batch_size": 8, "max_batch_delay": 2},
        }[preset]
        handler = {} if preset == "latency" else {"autocast": "fp16", "gpu_decode": True}
        return {**options, "torch_threads": threads, "device": "gpu", "runtime": "eager", "handler": handler}
    threads = {"latency": min(cores, 8), "throughput": 1, "balanced": min(cores, 4)}[preset]
    batch, delay = {"latency": (1, 0), "throughput": (2, 5), "balanced": (2, 1)}[preset]
    runtime = "int8" if task in (None, *INT8_TASKS) else "eager"
    return {
        "workers": max(1, cores // threads),
        "torch_threads": threads,
        "batch_size": batch,
        "max_batch_delay": delay,
        "device": "cpu",
        "runtime": runtime,
    }


def apply_preset(options: dict, task: str | None = None) -> tuple[dict, dict | None]:
    """(options with the preset's values under the explicit ones, the record archive.json keeps).

    `options` may hold `preset` (already resolved from auto), `target_cores` (default: this
    host's) and `device` (gpu = a GPU target); every other key in it was given explicitly.
    """
    preset = options.get("preset")
    rest = {k: v for k, v in options.items() if k not in ("preset", "target_cores")}
    if not preset:
        return rest, None
    if preset == "auto":  # resolved by the caller (calibrate); the settings are checked as balanced
        preset = "balanced"
    cores = int(options.get("target_cores") or os.cpu_count() or 1)
    gpu = rest.get("device") == "gpu"
    chosen = preset_options(preset, cores, gpu, task)
    handler = {**chosen.get("handler", {}), **(rest.get("handler") or {})}
    merged = {**chosen, **rest, **({"handler": handler} if handler or "handler" in rest else {})}
    overridden = sorted(k for k in rest if k in chosen and k != "handler" and rest[k] != chosen[k])
    overridden += sorted(f"handler.{k}" for k in rest.get("handler") or {} if k in chosen.get("handler", {}))
    record = {"name": preset, "cores": cores, "gpu": gpu, "settings": chosen, "overridden": overridden}
    return merged, record


def pick(calibration: dict) -> str:
    """The preset `auto` picks from `calibrate`'s figures.

    threads_speedup: batch-1 speed with every core over one thread. Where extra threads give
    at least 0.75 of a core each, latency costs little throughput: latency. Where they give
    under 0.4 (cores fight, or one core), single-thread workers win: throughput. Between: balanced.
    """
    cores = calibration["cores"]
    if cores <= 1:
        return "throughput"
    efficiency = (calibration["threads_speedup"] - 1) / (cores - 1)
    if efficiency >= 0.75:
        return "latency"
    return "throughput" if efficiency < 0.4 else "balanced"


def calibrate(model, meta: dict, seconds: float = 1.0) -> dict:
    """Time the eager model at batch 1 with one thread and with every core (a few seconds)."""
    import torch

    from model_defs.checkpoint import data_config_from_meta

    cfg = data_config_from_meta(meta)
    x = torch.zeros(1, cfg.channels, cfg.input_size, cfg.input_size)
    model = model.eval()
    cores, before = os.cpu_count() or 1, torch.get_num_threads()

    def ms_per_call(threads: int) -> float:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or n < 3:
                model(x)
                n += 1
        return (time.perf_counter() - start) / n * 1000

    try:
        one, every = ms_per_call(1), ms_per_call(cores)
    finally:
        torch.set_num_threads(before)
    result = {"cores": cores, "ms_1_thread": round(one, 2), "ms_all_threads": round(every, 2)}
    result["threads_speedup"] = round(one / every, 2)
    return {**result, "picked": pick(result)}
