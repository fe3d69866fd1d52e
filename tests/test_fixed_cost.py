"""The fixed-cost bench end to end, short, on the shared TorchServe: the null archive served
(real frontend, real worker, real PNG bytes, `hey` as the client), its stage split, the CPU
figures and the record. Timings are not asserted; that the stages, each from its own clock,
add up to the client's own mean is (a stage lost or counted twice would break it)."""

from __future__ import annotations

import json
import shutil

import pytest

from scripts.bench import fixed_cost, loadgen, record
from scripts.bench.harness import digit_png
from tests.conftest import serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
needs_hey = pytest.mark.skipif(shutil.which("hey") is None, reason="hey is not installed (scripts/setup.sh)")


@needs_hey
def test_null_handler_stages_add_up_to_the_client_total(tmp_path, capsys, monkeypatch, shared_server):
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    out = tmp_path / "out"
    with serving(shared_server) as ts:
        code = fixed_cost.main(["--duration", "3", "--clients", "4", "--out", str(out)], server=ts)
        left = ts.models()
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert left == []
    result = json.loads((out / "fixed_cost.json").read_text())
    stages = result["stages"]
    assert set(stages["stages_ms"]) == set(fixed_cost.STAGES)
    assert stages["requests"] == result["one_client"]["requests"]  # the counters saw the client's requests
    assert abs(stages["sum_ms"] - stages["client_mean_ms"]) <= 0.1 * stages["client_mean_ms"], stages
    # The null answer has the real classifier's shape: the top 5 labels, with probabilities.
    answer = result["bare"]["answer"]
    assert len(answer) == 5 and all(isinstance(p, float) for p in answer.values())
    saturated = result["saturated"]
    assert saturated["errors"] == 0 and saturated["generator"] == "hey"
    assert saturated["server_cpu_ms_per_request"] > 0 and saturated["generator_cpu_ms_per_request"] > 0
    assert result["fixed_cost_p50_ms"] == pytest.approx(result["one_client"]["p50"] - result["bare"]["p50_ms"])
    saved = json.loads((tmp_path / "results" / "fixed_cost.json").read_text())
    assert saved["schema"] == record.SCHEMA and saved["figures"]["stages"] == stages
    assert (out / "fixed_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unaccounted" in printed and "server CPU" in printed


@needs_hey
def test_hey_counts_requests_that_got_no_answer(tmp_path):
    """A port nobody listens on: every request fails, and the summary says so (not 0 requests)."""
    from scripts.ops.serve import free_port

    with loadgen.Load(f"http://127.0.0.1:{free_port()}/predictions/none", {}, digit_png()) as load:
        result = load.closed(2, 1.0, warm=False)
    assert result["requests"] > 0 and result["errors"] == result["requests"]
    assert result["throughput"] == 0 and result["p50"] is None


@pytest.mark.parametrize(
    "args, words",
    [
        (["--duration", "0"], "--duration"),
        (["--clients", "0"], "--clients"),
        (["--load-generator", "wrk2"], "choose one of auto, hey, python"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, args, words):
    assert fixed_cost.main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
