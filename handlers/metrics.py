"""What each batch did, for the people who run the server: metrics and (optionally) JSON logs.

Metrics are TorchServe's backend metrics: the metric objects come from the worker's metrics
cache (`context.metrics`, built from the server's `metrics_config`, monitoring/metrics.yaml,
so only declared metrics are used), and each update is one `[METRICS]` line on the worker's
stdout, in the format of TorchServe's own `CachingMetric`, that the frontend parses and
exports at /metrics in Prometheus mode. Every metric is labelled by model_name and
model_version, the version being the archive's own (the frontend's `ts_inference_*` series
say "default" for requests that name no version).

To keep the cost small (measured by scripts/bench/metrics.py) a batch writes a handful of
lines, not one per item, in one logging call rather than the one call per update that
`CachingMetric.add_or_update` makes (that alone cost ~10% of a tiny model's throughput):
counters carry the batch's counts, and the time histograms are observed once per batch,
so their quantiles are over batches (with batch size 1, over requests).

With the handler option `json_logs: true`, each batch and each refused item also gives one
JSON line in the model log: request ids, model, version, status, error type, timings. They
never hold request bodies, image bytes or headers (so no keys).

Worker starts are labelled by the worker's slot, the port the frontend gave it: TorchServe
keeps a worker's port when it restarts a worker that died and gives a new one to each worker
a scale-up adds, so a slot started more than once is a restart after a crash, and slots
beyond the workers there are now were scaled down (scripts/top tells them apart).

The handler option `metrics: false` turns the metrics off (the benchmark's baseline).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

logger = logging.getLogger(__name__)
metrics_log = logging.getLogger("handlers.metrics.lines")
request_log = logging.getLogger("handlers.requests")

ANSWERED = "handler_items_answered_total"
REFUSED = "handler_items_refused_total"  # also labelled by code and error_type
DECODE_FALLBACKS = "handler_decode_fallbacks_total"  # images decoded by PIL, not torchvision.io
WORKER_STARTS = "handler_worker_starts_total"  # also labelled by worker (worker_slot)
STEPS = ("preprocess", "inference", "postprocess")
STEP_SECONDS = {step: f"handler_{step}_seconds" for step in STEPS}
BATCH_SECONDS = "handler_batch_seconds"  # the whole handle() of a batch
BATCH_SIZE = "handler_batch_size"
COUNTERS = (ANSWERED, REFUSED, DECODE_FALLBACKS, WORKER_STARTS)
HISTOGRAMS = (*STEP_SECONDS.values(), BATCH_SECONDS, BATCH_SIZE)


def worker_slot(argv: list[str] | None = None) -> str:
    """This worker's port at the frontend, from the worker's command line (`--sock-name
    /tmp/.ts.sock.9000` or `--port 9000`); "none" outside a TorchServe worker."""
    argv = sys.argv if argv is None else argv
    for flag in ("--sock-name", "--port"):
        if flag in argv[:-1]:
            return re.sub(r".*\D", "", argv[argv.index(flag) + 1]) or "none"
    return "none"


def _declared_metrics(context) -> dict:
    """name → TorchServe metric object, for the metrics the server's metrics_config declares."""
    cache = getattr(context, "metrics", None)
    if cache is None:  # the handler driven in-process (tests, bench): no frontend to report to
        return {}
    from ts.metrics.metric_cache_errors import MetricsCacheKeyError
    from ts.metrics.metric_type_enum import MetricTypes

    found, missing = {}, []
    for names, kind in ((COUNTERS, MetricTypes.COUNTER), (HISTOGRAMS, MetricTypes.HISTOGRAM)):
        for name in names:
            try:
                found[name] = cache.get_metric(name, kind)
            except MetricsCacheKeyError:
                missing.append(name)
    if missing:
        logger.warning(
            "metrics not declared in the server's metrics_config, not reported: %s "
            "(start TorchServe with monitoring/metrics.yaml)",
            ", ".join(missing),
        )
    return found


class HandlerMetrics:
    """One worker's recorder: `begin` a batch, time its `step`s, count `decode_fallback`s,
    `end` it with the refused items; the batch's metrics and log lines are written at `end`."""

    def __init__(self, context, handler_config: dict):
        self.model = context.model_name
        self.version = str((context.manifest or {}).get("model", {}).get("modelVersion", "unknown"))
        self.labels = [self.model, self.version]
        self.metrics = _declared_metrics(context) if handler_config.get("metrics", True) else {}
        self.json_logs = bool(handler_config.get("json_logs", False))
        self.host = socket.gethostname()
        self.lines: list[str] = []  # queued [METRICS] lines
        self.formats: dict[tuple, tuple[str, str]] = {}  # (name, extra labels) -> the line's head and tail
        self._emit(WORKER_STARTS, 1, worker_slot())
        self._flush()
        self.begin(None, 0)

    def _emit(self, name: str, value: float, *extra_labels: str) -> None:
        """Queue one update of a declared metric; `_flush` writes the queued lines."""
        key = (name, extra_labels)
        if key not in self.formats:
            metric = self.metrics.get(name)
            if metric is None:
                return
            dims = ",".join(f"{k}:{v}" for k, v in zip(metric.dimension_names, [*self.labels, *extra_labels]))
            self.formats[key] = (
                f"[METRICS]{metric.metric_name}.{metric.unit}:",
                f"|#{dims}|#type:{metric.metric_type.name}|#hostname:{self.host},",
            )
        head, tail = self.formats[key]
        self.lines.append(f"{head}{value}{tail}{int(time.time())}")

    def _flush(self) -> None:
        if self.lines:
            metrics_log.info("\n".join(self.lines))  # the worker logs bare messages to stdout
            self.lines = []

    def begin(self, context, size: int) -> None:
        self.context, self.size = context, size
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.fallbacks = 0

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def decode_fallback(self) -> None:
        self.fallbacks += 1

    def end(self, errors: dict) -> None:
        """Report the batch begun last; `errors` maps each refused item's index to its RequestError."""
        seconds = time.perf_counter() - self.start
        if self.metrics:
            answered = self.size - len(errors)
            if answered:
                self._emit(ANSWERED, answered)
            for (code, type_), n in Counter((e.code, e.type) for e in errors.values()).items():
                self._emit(REFUSED, n, str(code), type_)
            if self.fallbacks:
                self._emit(DECODE_FALLBACKS, self.fallbacks)
            for step, name in STEP_SECONDS.items():
                self._emit(name, self.seconds[step])
            self._emit(BATCH_SECONDS, seconds)
            self._emit(BATCH_SIZE, self.size)
            self._flush()
        if self.json_logs:
            self._log(errors, seconds)

    def failed(self, error: Exception) -> None:
        """The batch raised: TorchServe answers each item with the code its worker gives
        (507 out of memory, the PredictionException's own, else 503)."""
        code = 507 if isinstance(error, MemoryError) or "CUDA" in str(error) else getattr(error, "error_code", 503)
        refused = SimpleNamespace(code=code, type=type(error).__name__, message="prediction failed")
        self.end(dict.fromkeys(range(self.size), refused))

    def _log(self, errors: dict, seconds: float) -> None:
        ids = getattr(self.context, "request_ids", None) or {}
        timings = {f"{step}_ms": round(s * 1000, 2) for step, s in self.seconds.items()} | {
            "batch_ms": round(seconds * 1000, 2)
        }
        base = {"model": self.model, "version": self.version}
        for idx, err in sorted(errors.items()):
            request_log.info(
                json.dumps(
                    {
                        "event": "refused",
                        "request_id": ids.get(idx),
                        **base,
                        "status": err.code,
                        "error_type": err.type,
                        "message": err.message,
                        **timings,
                    }
                )
            )
        request_log.info(
            json.dumps(
                {
                    "event": "batch",
                    **base,
                    "request_ids": [ids.get(i) for i in range(self.size)],
                    "statuses": [errors[i].code if i in errors else 200 for i in range(self.size)],
                    "size": self.size,
                    "answered": self.size - len(errors),
                    "refused": len(errors),
                    "decode_fallbacks": self.fallbacks,
                    **timings,
                }
            )
        )
