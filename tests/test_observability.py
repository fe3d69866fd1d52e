"""Handler metrics and JSON logs, read back from a real TorchServe's /metrics and model log."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from handlers import metrics as hm
from scripts.cli import archive
from scripts.ops.serve import ROOT
from scripts.ops.top import scrape, total
from tests.conftest import serving

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(trained_digits, shared_server):
    store = shared_server.model_store
    assert (
        archive.main(
            [
                str(trained_digits),
                "--name",
                "digits_obs",
                "--model-store",
                str(store),
                "--version",
                "2.0",
                "--batch-size",
                "4",
                "--max-batch-delay",
                "200",
                "--handler-option",
                "json_logs=true",
            ]
        )
        == 0
    )
    with serving(shared_server) as ts:
        assert ts.register("digits_obs", "digits_obs-2.0.mar") == "2.0"
        yield ts


def post(ts, data: bytes, content_type="application/octet-stream"):
    return requests.post(
        f"{ts.url('inference')}/predictions/digits_obs",
        data=data,
        timeout=60,
        headers={**ts.headers("inference"), "Content-Type": content_type},
    )


def grey_jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


MARKER = b"SECRET-PIXELS-0123456789"


@pytest.fixture(scope="module")
def load(server, digits_dir):
    """A mixed load, sent concurrently so that TorchServe batches it: what each request got."""
    pngs = [p.read_bytes() for p in sorted((digits_dir / "test").rglob("*.png"))[:12]]
    jpegs = [grey_jpeg(p) for p in pngs[:6]]
    bad = [b"not an image at all " + MARKER, b"", b'{"data": "%%%"}', b"\xff\xd8\xff" + MARKER]
    bodies = pngs + jpegs + bad
    before = scrape(server)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: post(server, b), bodies))
    return {
        "before": before,
        "after": scrape(server),
        "answers": answers,
        "pngs": len(pngs),
        "jpegs": len(jpegs),
        "bodies": bodies,
    }


def delta(load, name, **labels):
    return total(load["after"], name, **labels) - total(load["before"], name, **labels)


def test_answered_and_refused_items_are_counted_by_model_version_code_and_type(load):
    labels = {"model_name": "digits_obs", "model_version": "2.0"}
    codes = [r.status_code for r in load["answers"]]
    assert codes.count(200) == load["pngs"] + load["jpegs"]
    assert delta(load, hm.ANSWERED, **labels) == codes.count(200)
    refused = {}
    for r in load["answers"]:
        if r.status_code != 200:
            key = (r.status_code, r.json()["type"])
            refused[key] = refused.get(key, 0) + 1
    assert sum(refused.values()) == 4
    for (code, type_), n in refused.items():
        assert delta(load, hm.REFUSED, **labels, code=str(code), error_type=type_) == n, (code, type_)
    assert delta(load, hm.REFUSED, **labels) == 4


def test_decode_fallbacks_count_the_images_pil_decoded(load):
    # The digits PNGs go to PIL; the grey JPEGs are decoded by torchvision.io.
    assert delta(load, hm.DECODE_FALLBACKS, model_name="digits_obs", model_version="2.0") == load["pngs"]


def test_time_and_batch_size_histograms_have_buckets_and_count_every_batch(load):
    labels = {"model_name": "digits_obs", "model_version": "2.0"}
    batches = delta(load, hm.BATCH_SIZE + "_count", **labels)
    assert 0 < batches < len(load["bodies"])  # concurrent requests shared batches
    assert delta(load, hm.BATCH_SIZE + "_sum", **labels) == len(load["bodies"])
    for name in (*hm.STEP_SECONDS.values(), hm.BATCH_SECONDS):
        assert delta(load, name + "_count", **labels) == batches, name
        assert delta(load, name + "_bucket", **labels, le="+Inf") == batches, name
        # Cumulative buckets in seconds: the 10 s bucket holds every batch, and buckets never decrease.
        les = sorted(
            (float(dict(ls)["le"]), v)
            for (n, ls), v in load["after"].items()
            if n == name + "_bucket" and ("model_version", "2.0") in ls
        )
        assert [v for _, v in les] == sorted(v for _, v in les), name
        assert dict(les)[10.0] == dict(les)[float("inf")], name
    whole = delta(load, hm.BATCH_SECONDS + "_sum", **labels)
    steps = sum(delta(load, n + "_sum", **labels) for n in hm.STEP_SECONDS.values())
    assert 0 < steps <= whole


def test_per_request_chatter_is_not_logged_but_metrics_and_the_access_log_are(server, load):
    """TorchServe logs each backend [METRICS] line again in ts_log.log, and a few lines per request
    that /metrics and the access log already carry; scripts/log4j2.xml drops those (part of the
    metrics' cost), while the frontend still parses and exports the metrics."""
    assert delta(load, hm.ANSWERED, model_name="digits_obs", model_version="2.0") > 0
    logs = server.run_dir / "logs"
    ts_log = (logs / "ts_log.log").read_text(errors="replace")
    assert "ModelManager" in ts_log  # the frontend's other INFO lines are still written
    for chatter in ("result=[METRICS]", "Sending response for jobId", "Backend response time", "Looping backend"):
        assert chatter not in ts_log, chatter
    assert "Backend received inference at" not in (logs / "model_log.log").read_text(errors="replace")
    access = (logs / "access_log.log").read_text(errors="replace")
    assert access.count("/predictions/digits_obs") >= len(load["bodies"])


def test_worker_start_is_counted(server):
    assert total(scrape(server), hm.WORKER_STARTS, model_name="digits_obs", model_version="2.0") == 1


def json_log_lines(ts) -> list[dict]:
    text = (ts.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    return [json.loads(line[line.index("{") :]) for line in text.splitlines() if '{"event": ' in line]


def test_json_logs_give_one_line_per_refused_item_and_per_batch_without_bytes_or_keys(server, load):
    lines = json_log_lines(server)
    refused = [x for x in lines if x["event"] == "refused"]
    batches = [x for x in lines if x["event"] == "batch"]
    assert len(refused) == 4
    assert {(x["status"], x["error_type"]) for x in refused} == {
        (r.status_code, r.json()["type"]) for r in load["answers"] if r.status_code != 200
    }
    assert sum(b["size"] for b in batches) == len(load["bodies"])  # the module's only load
    assert sum(b["refused"] for b in batches) == 4
    for x in refused:
        assert x["model"] == "digits_obs" and x["version"] == "2.0" and x["request_id"]
        assert x["preprocess_ms"] >= 0 and x["batch_ms"] >= x["preprocess_ms"]
    for b in batches:
        assert len(b["request_ids"]) == b["size"] == len(b["statuses"]) and all(b["request_ids"])
        assert set(b) >= {"inference_ms", "postprocess_ms", "decode_fallbacks", "model", "version"}
    refused_ids = {x["request_id"] for x in refused}
    assert refused_ids <= {i for b in batches for i in b["request_ids"]}
    text = (server.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    assert MARKER.decode() not in text
    assert "%%%" not in text
    for kind in ("inference", "management", "API"):
        assert server.key(kind) not in text


@pytest.fixture
def model_dir(trained_digits, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    for name in ("model.pt", "model.json"):
        (out / name).write_bytes((trained_digits / name).read_bytes())
    return out


def in_process(model_dir, handler_options: dict):
    """The classifier in process, its metrics going to TorchServe's own metrics cache built
    from the bundle's metrics yaml, as in a worker; returns it and a context for 2 requests."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from tests.test_handler import load_handler, make_context

    cache = MetricsCacheYamlImpl(str(ROOT / "monitoring" / "metrics.yaml"))
    cache.initialize_cache()
    handler = load_handler(model_dir, {"handler": handler_options})
    ctx = make_context(model_dir, 2)
    ctx.metrics = cache
    handler.metrics = hm.HandlerMetrics(ctx, handler_options)
    return handler, ctx


def metric_lines(caplog) -> list[str]:
    return [line for r in caplog.records for line in r.getMessage().splitlines() if line.startswith("[METRICS]")]


def test_metrics_can_be_turned_off_and_json_logs_are_off_by_default(digits_dir, model_dir, caplog):
    png = next((digits_dir / "test").rglob("*.png")).read_bytes()
    for option, expect_lines in ((True, True), (False, False)):
        handler, ctx = in_process(model_dir, {"metrics": option})
        caplog.clear()
        with caplog.at_level("INFO"):
            handler.handle([{"body": png}, {"body": b"junk"}], ctx)
        lines = metric_lines(caplog)
        assert bool(lines) == expect_lines
        if expect_lines:
            names = {m[len("[METRICS]") :].split(".")[0] for m in lines}
            assert {hm.ANSWERED, hm.REFUSED, hm.DECODE_FALLBACKS, hm.BATCH_SIZE, *hm.STEP_SECONDS.values()} <= names
        assert not [r for r in caplog.records if r.name == "handlers.requests"]


def test_a_batch_that_raises_counts_each_item_refused_with_the_workers_code(digits_dir, model_dir, caplog):
    png = next((digits_dir / "test").rglob("*.png")).read_bytes()
    handler, ctx = in_process(model_dir, {})

    def broken(batch):
        raise RuntimeError("model exploded")

    handler.inference = broken
    with caplog.at_level("INFO"), pytest.raises(RuntimeError):
        handler.handle([{"body": png}, {"body": png}], ctx)
    refused = [m for m in metric_lines(caplog) if m.startswith(f"[METRICS]{hm.REFUSED}.")]
    assert len(refused) == 1 and refused[0].split(":")[1].startswith("2|")  # both items, in one update
    assert "code:503,error_type:RuntimeError|" in refused[0]
    assert not [m for m in metric_lines(caplog) if m.startswith(f"[METRICS]{hm.ANSWERED}.")]


# -- scripts/top (after the tests above: they read the module's first load alone) ----------


def test_histogram_quantile_interpolates_like_prometheus():
    from scripts.ops.top import histogram_quantile

    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # the first bucket starts at 0
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 10.0}) == 0.1  # beyond the last bound
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


def test_top_reports_rate_errors_quantiles_workers_and_queue_of_a_known_load(server, digits_dir):
    import time

    from scripts.ops import top

    pngs = [p.read_bytes() for p in sorted((digits_dir / "test").rglob("*.png"))[20:26]]
    before, start = top.scrape(server), time.monotonic()
    latencies = []
    for body in pngs + [b"junk", b""]:  # one at a time: each request is a batch of one
        t = time.perf_counter()
        post(server, body)
        latencies.append(time.perf_counter() - t)
    after, seconds = top.scrape(server), time.monotonic() - start
    rows = top.report(top.served_versions(server), before, after, seconds)
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["version"], row["default"]) == ("digits_obs", "2.0", True)
    assert row["requests_per_s"] == round(8 / seconds, 2)
    assert row["error_ratio"] == 0.25
    assert 0 < row["p50_ms"] <= row["p99_ms"] <= 10_000
    # The handler's time is part of each client's latency: its p99 lies at most in the
    # bucket (default bounds, in seconds) that holds the slowest client latency.
    bounds = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
    assert row["p99_ms"] <= 1000 * min(b for b in bounds if b >= max(latencies))
    assert (row["workers_ready"], row["workers"], row["restarts"], row["scaled_down"]) == (1, 1, 0, 0)
    # The frontend's mean end-to-end time per request holds the queue and the handler's time.
    assert row["e2e_ms"] is not None and row["e2e_ms"] >= row["queue_ms"]
    assert row["queue_ms"] is not None and row["queue_ms"] > 0  # requests wait for their batch mates


def test_top_json_prints_one_snapshot(server, capsys):
    from scripts.cli import top

    assert top.main(["--run-dir", str(server.run_dir), "--json", "--interval", "0.3"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["seconds"] >= 0.3
    [row] = snap["versions"]
    assert row["model"] == "digits_obs" and row["workers"] == 1 and row["requests_per_s"] == 0


def test_top_counts_a_killed_worker_as_a_restart(server):
    """Last in the module: it kills the worker."""
    import os
    import signal
    import time

    from scripts.ops import top

    def worker():
        return server.versions("digits_obs")[0]["workers"][0]

    old = worker()
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.time() + 120
    while time.time() < deadline and not (worker().get("pid") != old["pid"] and worker()["status"] == "READY"):
        time.sleep(0.5)
    assert worker()["status"] == "READY"
    deadline = time.time() + 30
    version = {"model_name": "digits_obs", "model_version": "2.0"}
    while time.time() < deadline and total(scrape(server), hm.WORKER_STARTS, **version) < 2:
        time.sleep(0.5)
    [row] = top.report(top.served_versions(server), {}, top.scrape(server), 1.0)
    assert (row["worker_starts"], row["restarts"], row["scaled_down"], row["workers_ready"]) == (2, 1, 0, 1)
