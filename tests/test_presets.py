"""Serving presets (scripts/ops/presets.py): the mapping from (preset, cores, GPU, task) to
settings, the rule that explicit options win, auto's pick, and what scripts/archive writes.
The served side (scripts/models status showing the preset) is in tests/test_versions.py."""

from __future__ import annotations

import json
import zipfile

import pytest
import yaml

from scripts.cli import archive
from scripts.ops.presets import PRESETS, apply_preset, pick, preset_options

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("preset", PRESETS)
def test_workers_times_threads_fit_the_cores(preset, cores):
    o = preset_options(preset, cores, task="classification")
    assert 1 <= o["workers"] * o["torch_threads"] <= cores
    assert o["runtime"] == "int8" and o["device"] == "cpu"


def test_each_preset_trades_latency_for_throughput_on_the_cpu():
    latency, throughput, balanced = (preset_options(p, 2) for p in ("latency", "throughput", "balanced"))
    # latency: a lone request gets both cores and waits for no batch mate
    assert (latency["workers"], latency["torch_threads"], latency["batch_size"], latency["max_batch_delay"]) == (
        1,
        2,
        1,
        0,
    )
    # throughput: a single-thread worker per core, batches of 2 after up to 5 ms
    assert (throughput["workers"], throughput["torch_threads"], throughput["batch_size"]) == (2, 1, 2)
    assert throughput["max_batch_delay"] == 5
    # balanced: between the two on batch delay
    assert latency["max_batch_delay"] < balanced["max_batch_delay"] < throughput["max_batch_delay"]
    big = preset_options("latency", 16)
    assert (big["workers"], big["torch_threads"]) == (2, 8)  # threads capped: more workers instead


def test_a_detector_gets_eager_and_a_gpu_target_gets_gpu_settings():
    assert preset_options("throughput", 4, task="detection")["runtime"] == "eager"
    gpu = preset_options("throughput", 16, gpu=True, task="classification")
    assert gpu["device"] == "gpu" and gpu["runtime"] == "eager" and gpu["batch_size"] > 8
    assert gpu["handler"] == {"autocast": "fp16", "gpu_decode": True}
    assert preset_options("latency", 16, gpu=True)["batch_size"] == 1
    with pytest.raises(ValueError, match="latency, throughput, balanced"):
        preset_options("fastest", 2)


def test_explicit_options_override_the_preset_and_are_recorded():
    merged, record = apply_preset({"preset": "latency", "target_cores": 8, "workers": 3, "handler": {"topk": 3}})
    assert merged["workers"] == 3 and merged["torch_threads"] == 8 and merged["batch_size"] == 1
    assert merged["handler"] == {"topk": 3} and "preset" not in merged and "target_cores" not in merged
    assert record["name"] == "latency" and record["cores"] == 8 and record["overridden"] == ["workers"]
    assert record["settings"]["workers"] == 1  # what the preset itself said
    assert apply_preset({"workers": 3}) == ({"workers": 3}, None)  # no preset: nothing added


@pytest.mark.parametrize(
    ("speedup", "cores", "picked"),
    [(1.9, 2, "latency"), (1.5, 2, "balanced"), (1.2, 2, "throughput"), (3.0, 1, "throughput"), (4.0, 8, "balanced")],
)
def test_auto_picks_from_how_well_threads_scale(speedup, cores, picked):
    assert pick({"cores": cores, "threads_speedup": speedup}) == picked


def test_archive_writes_the_preset_and_its_overrides(digits_run, tmp_path, capsys):
    store = tmp_path / "store"
    args = [str(digits_run), "--name", "digits", "--model-store", str(store), "--runtime", "eager"]
    assert archive.main([*args, "--preset", "latency", "--target-cores", "4", "--max-batch-delay", "3"]) == 0
    with zipfile.ZipFile(store / "digits.mar") as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
        record = json.loads(z.read("archive.json"))["preset"]
    assert (config["minWorkers"], config["batchSize"], config["maxBatchDelay"]) == (1, 1, 3)
    assert config["handler"]["torch_threads"] == 4 and config["handler"]["runtime"] == "eager"
    assert record["name"] == "latency" and record["cores"] == 4
    assert record["overridden"] == ["max_batch_delay", "runtime"]
    assert json.loads((store / "catalog.json").read_text())["archives"]["digits/1.0"]["preset"] == record

    # auto: a short calibration on this host picks one and is recorded with its figures
    assert archive.main([*args, "--preset", "auto", "--force"]) == 0
    record = json.loads(zipfile.ZipFile(store / "digits.mar").read("archive.json"))["preset"]
    assert record["name"] in PRESETS and record["auto"]["picked"] == record["name"]
    assert record["auto"]["ms_1_thread"] > 0 and record["auto"]["ms_all_threads"] > 0


def test_a_bad_preset_is_one_line_and_writes_nothing(digits_run, tmp_path, capsys):
    store = tmp_path / "store"
    args = [str(digits_run), "--name", "digits", "--model-store", str(store)]
    with pytest.raises(SystemExit) as e:
        archive.main([*args, "--preset", "fastest"])
    assert e.value.code == 2 and "latency" in capsys.readouterr().err
    assert archive.main([*args, "--preset", "latency", "--target-cores", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --target-cores must be") and len(err.splitlines()) == 1
    assert not store.exists()


def test_a_manifest_takes_the_preset_key(digits_run, tmp_path, capsys):
    manifest = tmp_path / "models.yaml"
    entry = {"name": "digits", "version": "1.0", "run": str(digits_run), "config": {"workers": 2}}
    manifest.write_text(yaml.safe_dump({"defaults": {"preset": "throughput", "target_cores": 4}, "models": [entry]}))
    assert archive.main(["--manifest", str(manifest), "--model-store", str(tmp_path / "s"), "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1])
    assert config["minWorkers"] == 2 and config["handler"]["torch_threads"] == 1 and config["batchSize"] == 2
    assert config["handler"]["runtime"] == "int8"
    manifest.write_text(yaml.safe_dump({"models": [{**entry, "config": {"preset": "fast"}}]}))
    assert archive.main(["--manifest", str(manifest), "--model-store", str(tmp_path / "s")]) == 2
    assert "preset must be one of latency, throughput, balanced, auto" in capsys.readouterr().err


def test_the_bench_judges_each_preset_on_the_median_of_its_rounds_ratios():
    """scripts/bench/presets.py: bare and the served loads take turns, each round's ratios are
    taken within the round, and the verdicts come from their medians: one round on a slower
    host does not decide a target, and a load with no answer gives no ratio."""
    from scripts.bench.presets import median_of, ratios, targets

    def load(rate, p50):
        return {"throughput": rate, "p50": p50, "clients": 4}

    def one_round(speed, bare_rate):  # the whole host `speed` times as fast as usual
        rows = {
            "latency": {1: load(50 * speed, 18 / speed), 4: load(52 * speed, 70 / speed)},
            "throughput": {1: load(30 * speed, 31 / speed), 4: load(75 * speed, 52 / speed)},
            "balanced": {1: load(55 * speed, 17 / speed), 4: load(70 * speed, 55 / speed)},
        }
        return rows, {"p50_batch1": 12.5 / speed, "throughput": bare_rate * speed}

    rounds = [one_round(1.0, 78), one_round(1.25, 78), one_round(0.8, 90)]  # the last bare window ran alone
    got = targets([ratios(*r) for r in rounds])
    assert got["latency"] == {"p50_over_bare": 1.44, "met": True}  # 18 / 12.5 in every round
    assert got["throughput"] == {"served_over_bare": 0.96, "met": True}  # 75 / 78: the odd round is outvoted
    assert got["balanced"] == {"p50_over_best": 0.94, "throughput_over_best": 0.93, "met": True}
    # The table's figures: each one's median over the rounds; a round without answers has none.
    assert median_of([load(80, 12), load(40, 30), load(78, 13)]) == load(78, 13)
    assert median_of([load(80, 12), load(40, None), load(78, 13)])["p50"] is None
    rows, bare = one_round(1.0, 78)
    rows["throughput"][4] = load(0, None)
    assert ratios(rows, bare) is None and "error" in targets([None, ratios(*rounds[0])])
