"""scripts/bench/soak.py against a real TorchServe: a short run with good and bad requests mixed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from scripts.bench import soak
from scripts.cli import archive
from tests.conftest import serving

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def digits_server(trained_digits, shared_server):
    store = shared_server.model_store
    assert (
        archive.main(
            [
                str(trained_digits),
                "--name",
                "digits",
                "--model-store",
                str(store),
                "--batch-size",
                "8",
                "--max-batch-delay",
                "5",
            ]
        )
        == 0
    )
    with serving(shared_server, "digits") as ts:
        yield ts


def test_short_soak_answers_good_200_bad_4xx_and_reads_worker_rss(digits_server, digits_dir, tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = soak.main(
        [
            "--model",
            "digits",
            "--run-dir",
            str(digits_server.run_dir),
            "--data",
            str(digits_dir / "test"),
            "--duration",
            "8",
            "--clients",
            "4",
            "--warmup",
            "5",
            "--rss-every",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["passed"] and result["failures"] == []
    assert result["good_total"] > 0 and result["status_counts"]["good"] == {"200": result["good_total"]}
    assert result["bad_total"] > 0 and result["bad_4xx"] == result["bad_total"]
    assert all(400 <= int(s) < 500 for s in result["status_counts"]["bad"])
    assert result["requests"] == result["good_total"] + result["bad_total"]
    rss = result["rss"]
    assert rss["start_bytes"] > 0 and rss["end_bytes"] > 0 and len(rss["samples"]) >= 2
    assert not rss["workers_restarted"] and not rss["checked"]  # the limit applies from 600 s only
    workers = {f"worker {p}" for p in rss["samples"][0]["pids"]}
    assert set(rss["growth_percent_by_process"]) == {"frontend"} | workers and workers
    assert result["latency_ms"]["good_p50"] > 0 and result["latency_ms"]["good_p99"] >= result["latency_ms"]["good_p50"]
    assert (
        capsys.readouterr().out.strip().splitlines()[-1].startswith(f"soak: {result['requests']} requests, good 5xx=0")
    )


def test_a_worker_killed_during_the_soak_is_reported_as_a_restart(digits_server, digits_dir, tmp_path, capsys):
    out = tmp_path / "soak.json"
    victim = [w["pid"] for w in digits_server.describe("digits")[0]["workers"]][0]
    killer = threading.Timer(6, lambda: os.kill(victim, signal.SIGKILL))
    killer.start()
    try:
        code = soak.main(
            [
                "--model",
                "digits",
                "--run-dir",
                str(digits_server.run_dir),
                "--data",
                str(digits_dir / "test"),
                "--duration",
                "14",
                "--clients",
                "2",
                "--warmup",
                "2",
                "--rss-every",
                "2",
                "--out",
                str(out),
            ]
        )
    finally:
        killer.join()
    result = json.loads(out.read_text())
    assert code == 1 and not result["passed"]
    assert result["rss"]["restarts"] and any(f.startswith("worker restarted") for f in result["failures"]), result[
        "failures"
    ]
    assert str(victim) in result["rss"]["restarts"][0]
    deadline = time.time() + 60  # leave the server serving for the other tests
    while time.time() < deadline and not any(
        w["status"] == "READY" for w in digits_server.describe("digits")[0]["workers"]
    ):
        time.sleep(0.5)
