"""The serving benchmark runs end to end, short: a real server (the shared one, through the
bench's Python API: the command line starts its own), real archives, real JPEG bytes.

The figures themselves are not asserted (this machine is noisy); what is asserted is that
every side was measured without errors, that the served model answers what the bare
handler answers, and that the report (table, JSON, PNG, last line) says what it measured.
"""

from __future__ import annotations

import json
import re

import pytest

from scripts.bench import serving as bench
from tests.conftest import serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_bench_measures_bare_served_stock_and_the_detector(tmp_path, capsys, shared_server):
    out = tmp_path / "bench"
    with serving(shared_server) as ts:
        code = bench.main(["--duration", "2", "--clients", "1,4", "--rate", "3", "--out", str(out)], server=ts)
        left = ts.models()
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert left == []  # each side was unregistered once measured
    result = json.loads((out / "bench.json").read_text())
    assert [b["batch"] for b in result["bare"]] == [1, 2]  # the CPU default batch size
    for side in ("served", "stock"):
        closed = result[side]["closed"]
        assert [c["clients"] for c in closed] == [1, 4]
        assert all(c["requests"] > 0 and c["errors"] == 0 and c["p50"] <= c["p99"] for c in closed), side
        assert result[side]["open"]["errors"] == 0 and result[side]["open"]["rate"] == 3
    # Our archive and the stock one serve the same weights: the same top class.
    assert next(iter(result["served"]["answer"])) == next(iter(result["stock"]["answer"]))
    assert result["detector"]["served"]["errors"] == 0 and result["detector"]["bare"]["requests"] > 0
    assert 0 < result["preprocess_ms"] < 1000
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("bench-*")), "work folders are removed unless --keep"

    last = printed.strip().splitlines()[-1]
    match = re.fullmatch(r"served/bare=(\d+\.\d\d) served/stock=(\d+\.\d\d)", last)
    assert match, last
    served4 = result["served"]["closed"][1]["throughput"]
    assert float(match[1]) == pytest.approx(served4 / result["bare"][-1]["throughput"], abs=0.006)
    assert float(match[2]) == pytest.approx(served4 / result["stock"]["closed"][1]["throughput"], abs=0.006)
    assert "bare" in printed and "stock" in printed and "p99 ms" in printed


@pytest.mark.parametrize(
    "args, words",
    [
        (["--clients", "four"], "--clients expects numbers"),
        (["--clients", "0"], "at least 1"),
        (["--run", "/nonexistent/run"], "does not exist"),
        (["--presets", "latency,fastest"], "unknown fastest"),
        (["--preset-runtimes", "int8,tensorrt"], "unknown tensorrt"),
    ],
)
def test_bench_refuses_bad_flags_in_one_line(tmp_path, capsys, args, words):
    assert bench.main([*args, "--out", str(tmp_path)]) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
