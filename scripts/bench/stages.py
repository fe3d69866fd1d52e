"""Where one request's time goes at one client, from TorchServe's own metrics and the handler's.

scripts/bench_steps ends with this: the model archived with a preset, served, and sent
`--requests` requests one after the other from one keep-alive client. The counters of
/metrics before and after give each stage's mean per request:

- frontend queue: ts_queue_latency_microseconds (from the frontend's receipt to a worker
  taking the batch) less the batch wait;
- batch wait:     a lone request with batchSize > 1 waits maxBatchDelay for a batch mate
                  (TorchServe's aggregator polls that long); 0 with batchSize 1. From the
                  archive's settings, as TorchServe does not count it apart;
- decode, preprocess, inference, postprocess: the handler's histograms
  (handler_{preprocess,inference,postprocess}_seconds, handlers/metrics.py); decode is the
  handler's own decode of the same JPEG timed in-process, taken out of preprocess;
- worker hand-off: ts_inference_latency_microseconds less the queue and the handler's
  whole batch (handler_batch_seconds): the frontend-to-worker socket and Python around handle();
- response:       what the client waited less ts_inference_latency: writing the answer,
                  HTTP and the client itself.
"""

from __future__ import annotations

import time
from pathlib import Path

from scripts.bench.harness import cat_jpeg
from scripts.ops.client import Client
from scripts.ops.packaging import build_archive
from scripts.ops.serve import ROOT, TorchServe
from scripts.ops.top import scrape, total

STAGES = (
    "frontend queue",
    "batch wait",
    "decode",
    "preprocess",
    "inference",
    "postprocess",
    "worker hand-off",
    "response",
)


def decode_ms(handler_run: Path, image: bytes, n: int = 200) -> float:
    """Median ms of the served decode (torchvision.io, as load_image_tensor) of the JPEG."""
    import statistics

    from model_defs.checkpoint import data_config_from_meta, read_meta
    from model_defs.preprocessing import load_image_tensor

    channels = data_config_from_meta(read_meta(handler_run)).channels
    times = []
    for _ in range(n):
        t = time.perf_counter()
        load_image_tensor(image, channels)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def stages(run: Path, work: Path, preset: str = "latency", requests: int = 200, runtime: str | None = None) -> dict:
    """Mean ms per stage of one request at one client, and the client's own mean and p50."""
    store = work / "store_stages"
    options = {"preset": preset, **({"runtime": runtime} if runtime else {})}
    entry = build_archive(run, "stages", store, options, force=True)
    settings = entry["preset"]["settings"]
    image = cat_jpeg()
    ts = TorchServe(run_dir=work / "serve_stages", model_store=store, config=ROOT / "config.properties", ports={})
    ts.start(["stages"], timeout=300)
    try:
        client = Client(f"{ts.url('inference')}/predictions/stages", ts.headers("inference"))
        for _ in range(10):  # warm: the first calls pay for lazy initialization
            client.post(image)
        before, waited = scrape(ts), []
        for _ in range(requests):
            t = time.perf_counter()
            ok, answer = client.post(image)
            if not ok:
                raise RuntimeError(f"the served model refused the benchmark image: {answer}")
            waited.append(time.perf_counter() - t)
        after = scrape(ts)
    finally:
        ts.stop()

    def delta(name: str) -> float:  # a counter's samples may carry the client's _total suffix
        names = (name, f"{name}_total") if not name.endswith("_total") else (name,)
        return sum(total(after, n, model_name="stages") - total(before, n, model_name="stages") for n in names)

    n = delta("ts_inference_requests_total")
    batches = delta("handler_batch_seconds_count")
    if not n or not batches:
        raise RuntimeError("TorchServe's /metrics counted no requests or no handler batches")
    queue = delta("ts_queue_latency_microseconds") / n / 1000
    frontend = delta("ts_inference_latency_microseconds") / n / 1000
    per_request = {step: delta(f"handler_{step}_seconds_sum") / n * 1000 for step in ("preprocess", "inference")}
    per_request["postprocess"] = delta("handler_postprocess_seconds_sum") / n * 1000
    batch = delta("handler_batch_seconds_sum") / n * 1000
    wait = float(settings["max_batch_delay"]) if settings["batch_size"] > 1 else 0.0
    decode = min(decode_ms(run, image), per_request["preprocess"])
    client_mean = sum(waited) / len(waited) * 1000
    ms = {
        "frontend queue": queue - wait,
        "batch wait": wait,
        "decode": decode,
        "preprocess": per_request["preprocess"] - decode,
        "inference": per_request["inference"],
        "postprocess": per_request["postprocess"],
        "worker hand-off": frontend - queue - batch,
        "response": client_mean - frontend,
    }
    return {
        "preset": preset,
        "settings": settings,
        "requests": int(n),
        "client_mean_ms": round(client_mean, 3),
        "client_p50_ms": round(sorted(waited)[len(waited) // 2] * 1000, 3),
        "stages_ms": {k: round(v, 3) for k, v in ms.items()},
        "handle_other_ms": round(batch - sum(per_request.values()), 3),  # inside handle(), outside the three steps
    }


def print_stages(result: dict) -> None:
    total_ms = result["client_mean_ms"]
    s = result["settings"]
    print(
        f"\none request at one client, preset {result['preset']} ({s['workers']} worker x {s['torch_threads']} "
        f"threads, batch {s['batch_size']}, delay {s['max_batch_delay']} ms), mean of {result['requests']} requests"
    )
    print(f"{'stage':18} {'ms':>8} {'share':>6}")
    for stage in STAGES:
        v = result["stages_ms"][stage]
        print(f"{stage:18} {v:8.2f} {v / total_ms:6.0%}")
    print(f"{'client total':18} {total_ms:8.2f} (p50 {result['client_p50_ms']:.2f})")
