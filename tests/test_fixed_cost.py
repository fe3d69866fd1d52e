"""The fixed-cost bench end to end, short, on the shared TorchServe: the null archive served
(real frontend, real worker, real PNG bytes, `hey` as the client), its stage split, the CPU
figures and the record. Timings are not asserted; that the stages, each from its own clock,
add up to the client's own mean is (a stage lost or counted twice would break it)."""

from __future__ import annotations

import json
import time

import pytest

from scripts.bench import fixed_cost, loadgen, record
from scripts.bench.harness import digit_png
from tests.conftest import serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
needs_native = pytest.mark.skipif(
    bool(loadgen.native_missing()), reason="wrk and hey are not installed (scripts/setup.sh)"
)


@needs_native
def test_null_handler_stages_add_up_to_the_client_total(tmp_path, capsys, monkeypatch, shared_server):
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    out = tmp_path / "out"
    with serving(shared_server) as ts:
        code = fixed_cost.main(["--duration", "8", "--clients", "4", "--out", str(out)], server=ts)
        left = ts.models()
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert left == []
    result = json.loads((out / "fixed_cost.json").read_text())
    stages = result["stages"]
    assert set(stages["stages_ms"]) == set(fixed_cost.STAGES)
    # The counters saw the client's requests, and in each round the last one wrk abandons at its
    # end and the one the load sends after it to wait for it (Load.drain).
    assert 0 <= stages["requests"] - result["one_client"]["requests"] <= 2 * result["one_client"]["rounds"]
    # The split adds up: what no clock covers is reported as such, and every stage is there. The
    # stages come from separate clocks (the /ping run, the frontend's counters, the handler's), so
    # only a gross error, a stage lost or counted twice, moves the sum far from the client's mean.
    assert stages["unaccounted_ms"] == pytest.approx(stages["client_mean_ms"] - stages["sum_ms"], abs=1e-3)
    assert all(v >= -0.01 for v in stages["stages_ms"].values()), stages  # differences of sums, rounded
    assert 0.5 * stages["client_mean_ms"] <= stages["sum_ms"] <= 1.5 * stages["client_mean_ms"], stages
    # The null answer has the real classifier's shape: the top 5 labels, with probabilities.
    answer = result["bare"]["answer"]
    assert len(answer) == 5 and all(isinstance(p, float) for p in answer.values())
    saturated = result["saturated"]
    assert saturated["errors"] == 0 and saturated["generator"] == "wrk"
    assert saturated["server_cpu_ms_per_request"] > 0 and saturated["generator_cpu_ms_per_request"] > 0
    fixed = result["one_client"]["p50"] - result["bare"]["p50_ms"]
    assert result["fixed_cost_p50_ms"] == pytest.approx(fixed, abs=1e-3)
    saved = json.loads((tmp_path / "results" / "fixed_cost.json").read_text())
    assert saved["schema"] == record.SCHEMA and saved["figures"]["stages"] == stages
    assert (out / "fixed_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unaccounted" in printed and "server CPU" in printed


@needs_native
def test_native_loads_count_answers_that_are_errors(tmp_path):
    """A real TorchServe-less endpoint that answers 404 to every POST: wrk (closed) and hey
    (open) count each answer as an error and state no throughput; a port nobody listens on
    fails the load in one error that names wrk."""
    import subprocess
    import sys

    from scripts.ops.serve import free_port, port_is_free

    def port_is_taken(port: int) -> bool:
        return not port_is_free("127.0.0.1", port)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while not port_is_taken(port) and time.time() < deadline:
            time.sleep(0.2)
        with loadgen.Load(f"http://127.0.0.1:{port}/predictions/none", {}, digit_png()) as load:
            closed = load.closed(2, 1.0, warm=False)
            opened = load.open(5, 1.0)
    finally:
        server.terminate()
        server.wait()
    assert closed["generator"] == "wrk" and closed["requests"] > 0 and closed["errors"] == closed["requests"]
    assert opened["generator"] == "hey" and opened["requests"] > 0 and opened["errors"] == opened["requests"]
    assert closed["throughput"] == 0 and opened["throughput"] == 0
    with (
        loadgen.Load(f"http://127.0.0.1:{free_port()}/x", {}, b"x") as load,
        pytest.raises(loadgen.LoadError, match="wrk exited"),
    ):
        load.closed(1, 1.0, warm=False)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--duration", "0"], "--duration"),
        (["--clients", "0"], "--clients"),
        (["--load-generator", "wrk2"], "choose one of auto, native, python"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, args, words):
    assert fixed_cost.main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
