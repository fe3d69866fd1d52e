"""The serving benchmark runs end to end, short: a real server (the shared one, through the
bench's Python API: the command line starts its own), real archives, real JPEG bytes.

The figures themselves are not asserted (this machine is noisy); what is asserted is that
every side was measured without errors, that the served model answers what the bare
handler answers, and that the report (table, JSON, PNG, last line) says what it measured.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from scripts.bench import loadgen, record
from scripts.bench import serving as bench
from tests.conftest import serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_bench_measures_bare_served_stock_and_the_detector(tmp_path, capsys, monkeypatch, shared_server):
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    out = tmp_path / "bench"
    with serving(shared_server) as ts:
        code = bench.main(
            ["--duration", "2", "--clients", "1,4", "--rate", "3", "--litserve", "off", "--out", str(out)], server=ts
        )
        left = ts.models()
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert left == []  # each side was unregistered once measured
    result = json.loads((out / "bench.json").read_text())
    assert [b["batch"] for b in result["bare"]] == [1, 2]  # the CPU default batch size
    for side in ("served", "stock"):
        closed = result[side]["closed"]
        assert [c["clients"] for c in closed] == [1, 4]
        assert all(c["requests"] > 0 and c["errors"] == 0 for c in closed), side
        assert all(c["p50"] <= c["p99"] for c in closed), side  # wrk's own percentiles
        assert result[side]["open"]["errors"] == 0 and result[side]["open"]["rate"] == 3
    # Our archive and the stock one serve the same weights: the same top class.
    assert next(iter(result["served"]["answer"])) == next(iter(result["stock"]["answer"]))
    assert result["detector"]["served"]["errors"] == 0 and result["detector"]["bare"]["requests"] > 0
    assert 0 < result["preprocess_ms"] < 1000
    # The load came from the native generator where it is installed, with its own CPU cost.
    assert result["load_generator"] == ("python" if loadgen.native_missing() else "wrk")
    assert all(c["generator_cpu_ms_per_request"] > 0 for c in result["served"]["closed"])
    assert all(c["server_cpu_ms_per_request"] > 0 for c in result["served"]["closed"])
    saved = json.loads((tmp_path / "results" / "serving_resnet18_eager_cpu.json").read_text())
    assert saved["schema"] == record.SCHEMA and saved["figures"]["served"] == result["served"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("bench-*")), "work folders are removed unless --keep"

    last = printed.strip().splitlines()[-1]
    match = re.fullmatch(r"served/bare=(\d+\.\d\d) served/stock=(\d+\.\d\d)", last)
    assert match, last
    served4 = result["served"]["closed"][1]["throughput"]
    assert float(match[1]) == pytest.approx(served4 / result["bare"][-1]["throughput"], abs=0.006)
    assert float(match[2]) == pytest.approx(served4 / result["stock"]["closed"][1]["throughput"], abs=0.006)
    assert "bare" in printed and "stock" in printed and "p99 ms" in printed


@pytest.mark.skipif(bool(loadgen.native_missing()), reason="wrk and hey are not installed (scripts/setup.sh)")
def test_bench_the_digits_cnn_with_kserve_bodies(tmp_path, capsys, monkeypatch, shared_server):
    """The digits CNN (a PNG digit, no stock side) with KServe v1/v2 bodies of 1 and 4 images
    on a TorchServe of its own started with service_envelope=kservev2."""
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    out = tmp_path / "bench"
    args = ["--model", "small_cnn", "--no-detector", "--duration", "1", "--clients", "2", "--rate", "0"]
    with serving(shared_server) as ts:
        code = bench.main([*args, "--bodies", "1,4", "--litserve", "off", "--out", str(out)], server=ts)
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((out / "bench.json").read_text())
    assert result["image"].endswith("PNG") and "stock" not in result and "stock: skipped" in printed
    rows = result["bodies"]["rows"]
    assert [(r["protocol"], r["images"]) for r in rows] == [("plain", 1), ("v1", 1), ("v2", 1), ("v1", 4), ("v2", 4)]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in rows)
    assert "kserve v2 x4" in printed


@pytest.mark.parametrize(
    "args, words",
    [
        (["--clients", "four"], "--clients expects numbers"),
        (["--clients", "0"], "at least 1"),
        (["--run", "/nonexistent/run"], "does not exist"),
        (["--presets", "latency,fastest"], "unknown fastest"),
        (["--preset-runtimes", "int8,tensorrt"], "unknown tensorrt"),
        (["--bodies", "eight"], "--bodies expects numbers"),
        (["--load-generator", "wrk2"], "choose one of auto, native, python"),
    ],
)
def test_bench_refuses_bad_flags_in_one_line(tmp_path, capsys, args, words):
    assert bench.main([*args, "--out", str(tmp_path)]) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("litserve") is None, reason="litserve is not installed in this Python")
def test_bench_litserve_side_answers_as_the_bare_handler(tmp_path, capsys, monkeypatch, shared_server):
    """LitServe, started by the bench from this Python, serves the same model: its answer's
    top class is the bare handler's (the bench refuses otherwise), and every load is measured."""
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    out = tmp_path / "bench"
    args = ["--model", "small_cnn", "--no-detector", "--duration", "1", "--clients", "1,4", "--rate", "0"]
    with serving(shared_server) as ts:
        code = bench.main([*args, "--litserve", "on", "--out", str(out)], server=ts)
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((out / "bench.json").read_text())
    lit = result["litserve"]
    assert lit["settings"]["workers"] == result["config"]["minWorkers"]
    assert lit["settings"]["max_batch_size"] == result["config"]["batchSize"]
    assert next(iter(lit["answer"])) == next(iter(result["served"]["answer"]))
    assert [c["clients"] for c in lit["closed"]] == [1, 4] and all(c["errors"] == 0 for c in lit["closed"])
    assert "p99_served_over_litserve_4" in result["ratios"]
