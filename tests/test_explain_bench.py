"""scripts/bench/explain.py end to end, briefly: it times real explanations against real
predictions of an archived handler and writes what it measured."""

from __future__ import annotations

import json

import pytest

from scripts.bench import explain as bench_explain

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_bench_times_explanations_against_predictions(tmp_path, capsys):
    assert (
        bench_explain.main(
            ["--models", "small_cnn", "--steps", "2", "4", "--rounds", "1", "--seconds", "0.05", "--out", str(tmp_path)]
        )
        == 0
    )
    rows = json.loads((tmp_path / "explain.json").read_text())["rows"]
    assert [r["call"] for r in rows] == ["prediction", "IG 2 steps", "IG 4 steps"]
    assert all(r["ms_per_image"] > 0 for r in rows) and rows[0]["x_prediction"] == 1.0
    assert [r["n_steps"] for r in rows] == [None, 2, 4]
    assert all(1 <= r["internal_batch"] <= r["n_steps"] for r in rows[1:])
    assert "IG 4 steps" in capsys.readouterr().out


def test_bench_refuses_an_unknown_model_in_one_line(tmp_path, capsys):
    assert bench_explain.main(["--models", "resnet_huge", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --models: 'resnet_huge'") and err.count("\n") == 1
    assert not (tmp_path / "explain.json").exists()
