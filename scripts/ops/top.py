"""The numbers scripts/top shows, per served version: a scrape of /metrics read into samples,
totals and histogram quantiles (as Prometheus computes them), and a report over an interval
joined with the management API's workers. scripts/bench/metrics.py reads the same samples."""

from __future__ import annotations

import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from handlers.metrics import ANSWERED, BATCH_SECONDS, REFUSED, WORKER_STARTS
from scripts.ops.serve import ServeError, TorchServe

Samples = dict[tuple[str, tuple], float]


# TorchServe's Java Prometheus client exports a counter with "_total" appended; older
# clients exported the bare name. Only one of the two is ever present.
QUEUE_LATENCY = ("ts_queue_latency_microseconds", "ts_queue_latency_microseconds_total")
# Microseconds from the frontend receiving each request to its answer being sent.
INFERENCE_LATENCY = ("ts_inference_latency_microseconds", "ts_inference_latency_microseconds_total")


def scrape(ts: TorchServe) -> Samples:
    """/metrics as {(sample name, sorted labels without the host): value}."""
    try:
        text = requests.get(f"{ts.url('metrics')}/metrics", timeout=10).text
    except requests.ConnectionError:
        raise ServeError(f"TorchServe's metrics API is not answering at {ts.url('metrics')}") from None
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k.lower() != "hostname"))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile on cumulative counts {upper bound: count}: linear
    interpolation inside the bucket that holds the rank; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower  # as Prometheus: the highest finite bound
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def served_versions(ts: TorchServe) -> list[dict]:
    """Each registered version with its workers and whether it is the default."""
    out = []
    for name in ts.models():
        default = ts.describe(name)[0]["modelVersion"]
        for v in ts.versions(name):
            workers = v.get("workers", [])
            out.append(
                {
                    "model": name,
                    "version": v["modelVersion"],
                    "default": v["modelVersion"] == default,
                    "workers_ready": sum(w.get("status") == "READY" for w in workers),
                    "workers": len(workers),
                }
            )
    return out


def report(served: list[dict], before: Samples, after: Samples, seconds: float) -> list[dict]:
    """Per version, what happened between two scrapes `seconds` apart."""

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    rows = []
    for v in served:
        labels = {"model_name": v["model"], "model_version": v["version"]}
        answered, refused = delta(ANSWERED, **labels), delta(REFUSED, **labels)
        items = answered + refused
        buckets = {}
        for (n, ls), _ in after.items():
            ls = dict(ls)
            if n == BATCH_SECONDS + "_bucket" and all(ls.get(k) == x for k, x in labels.items()):
                le = float(ls["le"])
                buckets[le] = delta(n, **labels, le=ls["le"])
        p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
        # The frontend labels a request by the version it named, "default" when it named none:
        # those are counted for the version that is the default now.
        asked = [v["version"]] + (["default"] if v["default"] else [])

        queued_us, latency_us, requests_in = (
            sum(delta(name, model_name=v["model"], model_version=a) for a in asked for name in names)
            for names in (QUEUE_LATENCY, INFERENCE_LATENCY, ("ts_inference_requests_total",))
        )  # the frontend's counters, under either spelling
        # Worker starts per slot (handlers/metrics.py: worker_slot): a slot started again is a
        # worker restarted after it died; slots beyond today's workers were scaled down.
        slots = [
            value
            for (n, ls), value in after.items()
            if n == WORKER_STARTS and all(dict(ls).get(k) == x for k, x in labels.items())
        ]
        starts = sum(slots)
        rows.append(
            {
                **v,
                "requests_per_s": round(items / seconds, 2),
                "error_ratio": round(refused / items, 4) if items else None,
                "p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "p99_ms": None if p99 is None else round(p99 * 1000, 1),
                "worker_starts": int(starts),
                "restarts": int(sum(n - 1 for n in slots if n >= 1)),
                "scaled_down": max(0, sum(n >= 1 for n in slots) - v["workers"]),
                "queue_ms": round(queued_us / requests_in / 1000, 1) if requests_in else None,
                "e2e_ms": round(latency_us / requests_in / 1000, 1) if requests_in else None,
            }
        )
    return rows


def snapshot(ts: TorchServe, last: tuple[Samples, float] | None, interval: float) -> tuple[dict, tuple[Samples, float]]:
    """One report since the `last` scrape (or over `interval` seconds); returns it and this scrape."""
    if last is None:
        last = scrape(ts), time.monotonic()
        time.sleep(interval)
    now = scrape(ts), time.monotonic()
    seconds = now[1] - last[1]
    report_ = {
        "time": round(time.time(), 3),
        "seconds": round(seconds, 3),
        "versions": report(served_versions(ts), last[0], now[0], seconds),
    }
    return report_, now
