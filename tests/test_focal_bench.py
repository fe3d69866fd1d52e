"""scripts/bench/focal.py end to end, short (one epoch per run): the record it writes says
what it ran, where, with which packages, and holds every class's recall for both losses."""

from __future__ import annotations

import json

import pytest

from scripts.bench import focal as bench

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_the_record_holds_both_runs_raw_figures(tmp_path, capsys):
    out = tmp_path / "focal.json"
    assert bench.main(["--epochs", "1", "--minority", "3", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["schema"] == "bundle-record/1" and written["name"] == "focal_recall-1-epochs"
    assert written["command"] == f"python -m scripts.bench.focal --epochs 1 --minority 3 --out {out}"
    assert written["machine"]["cores"] >= 1 and written["machine"]["cpu"]
    assert set(written["versions"]) >= {"torch", "torchvision"}
    record = written["figures"]
    counts = record["settings"]["train_images_per_class"]
    assert counts["3"] == 7 and all(n > 100 for c, n in counts.items() if c != "3")
    assert record["runs"]["ce"]["loss"]["name"] == "ce"
    assert record["runs"]["focal"]["loss"] == {"name": "focal", "gamma": 2.0, "alpha": None}
    for run in record["runs"].values():
        assert sorted(run["test_recall"]) == [str(d) for d in range(10)]
        assert all(0.0 <= r <= 1.0 for r in run["test_recall"].values())
    assert record["minority_recall"] == {k: r["test_recall"]["3"] for k, r in record["runs"].items()}
    assert "minority class 3 recall" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, words",
    [(["--minority", "x"], "--minority 'x' is not a digit class"), (["--minority-share", "1"], "--minority-share")],
)
def test_bad_flags_are_one_line(tmp_path, capsys, args, words):
    assert bench.main([*args, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not (tmp_path / "r.json").exists()
