"""A real Prometheus, started on loopback with the bundle's scrape config and rules, scraping a
real TorchServe under a short mixed load of good and bad images: what Prometheus records
agrees with what the load generator measured.

Tolerances, and why:
- error ratio: within 0.04 (absolute). Both counters are scraped at the same instants, so
  the only difference is rate()'s extrapolation at the window's edges, the same for both
  to within a sample.
- p99: TorchServe 0.12 histograms have fixed buckets (5, 10, 25, 50, 75, 100, 250 ms, ...),
  and Prometheus interpolates inside them, so the two can only agree to a bucket: the
  recorded p99 (the handler's time) lies at or below the upper bound of the bucket that holds
  the client's p99 (which adds HTTP and the frontend) over the same requests.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import requests
import yaml

from scripts.cli import archive
from scripts.ops.serve import ROOT, free_port
from tests.conftest import serving

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]
# Its own name: the counters Prometheus reads are totals, and the shared server has served
# other "digits" models before this module.
MODEL = "digits_prom"

BOUNDS = [0.0, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]


@pytest.fixture(scope="module")
def server(trained_digits, shared_server):
    store = shared_server.model_store
    # Batch size 1: each request is its own batch, so the handler's time per batch is per request.
    assert (
        archive.main(
            [
                str(trained_digits),
                "--name",
                MODEL,
                "--model-store",
                str(store),
                "--batch-size",
                "1",
                "--max-batch-delay",
                "1",
            ]
        )
        == 0
    )
    with serving(shared_server, MODEL) as ts:
        yield ts


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus with monitoring/prometheus.yml, its target and intervals set for the test."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus not found: run scripts/setup.sh (installs Debian's prometheus package)")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ROOT / "monitoring" / f) for f in config["rule_files"]]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [server.url("metrics").split("://")[1]]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 -- held by prometheus until teardown closes it
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (work / "prometheus.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def query(url: str, expr: str) -> dict[tuple, float]:
    r = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", r
    return {
        tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__")): float(s["value"][1])
        for s in r["data"]["result"]
    }


def wait_for(url: str, expr: str, check, timeout: float = 30):
    deadline = time.time() + timeout
    while True:
        result = query(url, expr)
        if check(result) or time.time() > deadline:
            return result
        time.sleep(0.5)


def test_recorded_error_ratio_and_p99_agree_with_the_load_generator(server, prometheus, digits_dir):
    url = f"{server.url('inference')}/predictions/{MODEL}"
    good = [p.read_bytes() for p in sorted((digits_dir / "test").rglob("*.png"))[:40]]
    bad = [b"not an image", b"\xff\xd8\xff truncated jpeg", b'{"data": "***"}']
    session = requests.Session()
    session.headers.update(server.headers("inference"))
    # One good item and each bad one first, so that every series (refused is labelled by code
    # and error type) exists before the measured load: rate() cannot see the increase that
    # brings a series into being, so a series born during the load would be undercounted.
    items = f'sum({{__name__=~"handler_items_(answered|refused)_total", model_name="{MODEL}"}})'
    # Their latencies count too: the recorded p99 covers every batch in its 5-minute window.
    latencies, statuses, errors = [], [], []
    for body, code in [(good[0], 200)] + [(b, 400) for b in bad]:
        t = time.perf_counter()
        assert session.post(url, data=body).status_code == code
        latencies.append(time.perf_counter() - t)
    warm = len(latencies)
    wait_for(prometheus, items, lambda r: r and next(iter(r.values())) == warm)
    time.sleep(2)

    def client(k: int):
        try:
            s = requests.Session()
            s.headers.update(server.headers("inference"))
            for i in range(60):  # one bad item in four
                body = bad[(i + k) % len(bad)] if (i + k) % 4 == 0 else good[(i * 7 + k) % len(good)]
                t = time.perf_counter()
                r = s.post(url, data=body, timeout=60)
                latencies.append(time.perf_counter() - t)
                statuses.append(r.status_code)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert set(statuses) == {200, 400}
    client_ratio = statuses.count(400) / len(statuses)
    client_p99 = float(np.percentile(latencies, 99))

    # Every item of the load scraped: the counters hold the load plus the first items.
    total = len(latencies)
    got = wait_for(prometheus, items, lambda r: r and next(iter(r.values())) == total)
    assert next(iter(got.values())) == total
    time.sleep(2)  # the rules evaluated on the last scrape

    labels = (("model_name", MODEL), ("model_version", "1.0"))
    this = f'{{model_name="{MODEL}"}}'  # earlier modules' models are still in /metrics, idle
    [ratio] = query(prometheus, "model_version:handler_error_ratio:rate5m" + this).items()
    [p99] = query(prometheus, "model_version:handler_batch_seconds:p99_5m" + this).items()
    assert ratio[0] == labels and p99[0] == labels
    # rate() extrapolates the counters to the edges of a load of a few seconds: every series
    # alike, since all exist before the load, but the ratio may still move by a scrape's worth.
    assert abs(ratio[1] - client_ratio) <= 0.04, (ratio[1], client_ratio)

    # The handler's batch time is part of each client's latency, so its p99 lies at most in
    # the bucket that holds the client's p99 over the same requests, the first ones included.
    # No lower bound follows: on a quiet machine the client's time is mostly HTTP, the
    # frontend and the batch delay (0.044 s vs 0.086 s seen).
    upper = min(b for b in BOUNDS if b >= client_p99)
    assert 0 < p99[1] <= upper, (p99[1], client_p99)
    print(
        f"\nerror ratio: Prometheus {ratio[1]:.4f}, client {client_ratio:.4f}; "
        f"p99: Prometheus {p99[1] * 1000:.1f} ms, client {client_p99 * 1000:.1f} ms"
    )
