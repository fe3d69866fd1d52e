"""scripts/bench/metrics.py end to end, short: one server (the shared one, through the bench's
Python API: the command line starts its own), the same archive with and without handler
metrics, real JPEG bytes. The figures are not asserted (this machine is noisy)."""

from __future__ import annotations

import json
import re

import pytest

from scripts.bench import metrics as bench_metrics
from tests.conftest import serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_bench_metrics_measures_both_sides_in_one_run(tmp_path, capsys, shared_server):
    out = tmp_path / "bench"
    with serving(shared_server) as ts:
        code = bench_metrics.main(
            [
                "--model",
                "small_cnn",
                "--duration",
                "1",
                "--rounds",
                "2",
                "--clients",
                "2",
                "--warmup",
                "1",
                "--out",
                str(out),
            ],
            server=ts,
        )
        left = ts.models()
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert left == []  # both sides were unregistered once measured
    result = json.loads((out / "bench_metrics.json").read_text())
    for side in ("with", "without"):
        assert len(result["rounds"][side]) == 2
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in result["rounds"][side]), side
        assert all(r["server_cpu_ms_per_request"] > 0 for r in result["rounds"][side]), side
    assert len(result["round_ratios"]) == 2
    assert (out / "bench_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("bench-metrics-*")), "work folders are removed unless --keep"
    last = printed.strip().splitlines()[-1]
    match = re.fullmatch(r"with/without=(\d+\.\d{3}) overhead=(-?\d+\.\d)%", last)
    assert match, last
    assert float(match[1]) == round(result["with_over_without"], 3)


def test_bench_metrics_refuses_bad_arguments(capsys):
    assert bench_metrics.main(["--rounds", "0"]) == 2
    assert "error: --clients, --rounds" in capsys.readouterr().err
