"""Optimized runtimes (torchscript, onnx, int8, compile): built at archive time, checked
against eager on the run's real validation split, then loaded by the real handler from the
unpacked archive and compared with eager on real digit images; and the refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import yaml
from torch._dynamo.utils import counters

from handlers import runtimes
from scripts.cli import archive
from scripts.ops import optimize
from tests.conftest import classify_in_process, serving
from tests.test_handler import load_handler, run

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

BATCH_SIZE = 4
NO_COMPILER = "no C++ compiler (cc/gcc/g++/clang) for torch.compile's inductor"
KINDS = [
    "torchscript",
    "onnx",
    "int8",
    pytest.param("compile", marks=pytest.mark.skipif(runtimes.cpp_compiler() is None, reason=NO_COMPILER)),
]
RUNNERS = {
    "torchscript": runtimes.TorchScriptRunner,
    "onnx": runtimes.OnnxRunner,
    "int8": runtimes.TorchScriptRunner,
    "compile": runtimes.CompiledRunner,
}
# How far a runtime's probabilities may be from eager's: float kernels vs an int8 model.
PROB_TOLERANCE = {
    "torchscript": 1e-4,
    "onnx": 1e-4,
    "compile": 1e-4,
    "int8": 0.15,
}


def store_listing(store) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def unpack(mar, folder):
    with zipfile.ZipFile(mar) as z:
        z.extractall(folder)
    return folder


def archive_cli(run_dir, store, *extra) -> int:
    return archive.main([str(run_dir), "--name", "digits", "--model-store", str(store), *extra])


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_is_checked_at_archive_time_and_answers_like_eager(kind, trained_digits, digits_dir, tmp_path, capsys):
    store = tmp_path / "store"
    assert archive_cli(trained_digits, store, "--runtime", kind, "--batch-size", str(BATCH_SIZE), "--topk", "10") == 0
    out = capsys.readouterr().out
    assert f"runtime {kind}: top-1" in out and "validation images" in out

    # The check: on the run's own validation split, recorded in the catalog and in the archive.
    entry = json.loads((store / "catalog.json").read_text())["archives"]["digits/1.0"]
    record = entry["runtime"]
    meta = json.loads((trained_digits / "model.json").read_text())
    assert record["kind"] == kind and record["images"] == meta["dataset"]["val_images"]
    assert record["eager_top1"] > 80  # a trained model, really evaluated
    assert record["eager_top1"] - record["top1"] <= 1.0
    assert record["agreement"] >= (95 if kind in optimize.INT8 else 99.5)
    assert record["max_prob_diff"] <= PROB_TOLERANCE[kind]
    assert set(record) >= {"images", "eager_top1", "top1", "agreement", "max_prob_diff", "seconds"}
    with zipfile.ZipFile(store / "digits.mar") as z:
        assert json.loads(z.read("archive.json"))["runtime"] == record
        config = yaml.safe_load(z.read("model-config.yaml"))
        assert config["handler"]["runtime"] == kind
        if kind in runtimes.ARTIFACTS:
            assert runtimes.ARTIFACTS[kind] in z.namelist()
    assert archive.main(["--verify", "--model-store", str(store)]) == 0

    # The handler, loaded from the unpacked archive as a worker loads it, against eager.
    model_dir = unpack(store / "digits.mar", tmp_path / "unpacked")
    handler = load_handler(model_dir, config)
    assert type(handler.runner) is RUNNERS[kind]
    if kind == "compile":
        assert hasattr(handler.runner.model, "_orig_mod")  # torch.compile's wrapper
    compiled_graphs = dict(counters["stats"])
    eager = load_handler(model_dir, {"handler": {"topk": 10}})
    assert type(eager.runner) is runtimes.EagerRunner
    files = sorted((digits_dir / "test").rglob("*.png"))[::9]
    agree = total = start = 0
    for n in [1, 2, 3, 4] * 3:  # every batch size up to batchSize
        rows = [{"body": f.read_bytes()} for f in files[start : start + n]]
        start += n
        answers, codes = run(handler, model_dir, rows)
        expected, _ = run(eager, model_dir, rows)
        assert codes == [200] * n
        for got, want in zip(answers, expected):
            total += 1
            agree += list(got)[0] == list(want)[0]
            assert max(abs(got[k] - want[k]) for k in want) <= PROB_TOLERANCE[kind]
    assert agree >= (total - 1 if kind in optimize.INT8 else total)
    assert dict(counters["stats"]) == compiled_graphs  # warmed up at 1 and batchSize: no compiling on requests


def test_int8_calibrates_on_the_training_split_only(trained_digits):
    meta = json.loads((trained_digits / "model.json").read_text())
    val, calibration, _ = optimize.check_images(meta, "int8", None, 10**6)
    assert len(val) == meta["dataset"]["val_images"]
    assert len(calibration) == meta["dataset"]["train_images"]
    assert not {s.path for s in calibration} & {s.path for s in val}
    assert len(optimize.check_images(meta, "int8", None, 16)[1]) == 16


def test_workers_import_the_runtimes_without_onnx():
    code = (
        "import sys, handlers.runtimes; sys.exit(any(m in sys.modules for m in ('onnx', 'onnxruntime', 'onnxscript')))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=archive.ROOT).returncode == 0


def test_help_names_the_runtime_flags():
    text = archive.get_args_parser().format_help()
    for flag in ("--runtime", "--val-data", "--calibration-images", "--max-accuracy-drop"):
        assert flag in text
    assert all(kind in text for kind in runtimes.RUNTIMES)


def test_unknown_runtime_is_one_line_exit_2(trained_digits, tmp_path, capsys):
    store = tmp_path / "store"
    assert archive_cli(trained_digits, store, "--runtime", "tensorrt") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown runtime 'tensorrt'") and "onnx" in err
    assert len(err.splitlines()) == 1
    assert store_listing(store) == []


def test_int8_on_a_gpu_is_refused(trained_digits, tmp_path, capsys):
    store = tmp_path / "store"
    assert archive_cli(trained_digits, store, "--runtime", "int8", "--device", "gpu") == 2
    err = capsys.readouterr().err
    assert "int8" in err and "CPU only" in err
    assert store_listing(store) == []


def test_missing_validation_data_is_refused_and_val_data_replaces_it(trained_digits, digits_dir, tmp_path, capsys):
    run_dir = tmp_path / "moved"
    shutil.copytree(trained_digits, run_dir)
    meta = json.loads((run_dir / "model.json").read_text())
    meta["dataset"]["root"] = str(tmp_path / "gone")
    (run_dir / "model.json").write_text(json.dumps(meta))
    store = tmp_path / "store"
    assert archive_cli(run_dir, store, "--runtime", "onnx") == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "--val-data" in err and len(err.splitlines()) == 1
    assert store_listing(store) == []
    assert archive_cli(run_dir, store, "--runtime", "int8", "--val-data", str(digits_dir / "test")) == 2
    assert "int8 calibration" in capsys.readouterr().err  # int8 calibrates on the training split
    assert archive_cli(run_dir, store, "--runtime", "onnx", "--val-data", str(digits_dir / "test")) == 0
    record = json.loads((store / "catalog.json").read_text())["archives"]["digits/1.0"]["runtime"]
    assert record["images"] == len(list((digits_dir / "test").rglob("*.png")))
    assert record["validation"] == str(digits_dir / "test")


def test_a_too_strict_accuracy_bound_refuses_and_writes_nothing(trained_digits, tmp_path, capsys):
    store = tmp_path / "store"
    assert archive_cli(trained_digits, store, "--runtime", "torchscript", "--max-accuracy-drop", "-100") == 2
    err = capsys.readouterr().err.strip()
    assert "--max-accuracy-drop" in err and "no archive written" in err and len(err.splitlines()) == 1
    assert store_listing(store) == []
    with pytest.raises(archive.ArchiveError, match="max-accuracy-drop"):
        archive.build_archive(trained_digits, "digits", store, {"runtime": "onnx"}, max_accuracy_drop=-100)
    assert store_listing(store) == []


def test_torchserve_serves_an_onnx_archive(trained_digits, digits_dir, shared_server):
    store = shared_server.model_store
    assert (
        archive_cli(
            trained_digits, store, "--runtime", "onnx", "--batch-size", "8", "--max-batch-delay", "200", "--topk", "10"
        )
        == 0
    )
    with serving(shared_server, "digits") as ts:
        files = sorted((digits_dir / "test").rglob("*.png"))[::15]

        def post(f):
            return requests.post(
                f"{ts.url('inference')}/predictions/digits",
                data=f.read_bytes(),
                headers=ts.headers("inference"),
                timeout=60,
            )

        with ThreadPoolExecutor(8) as pool:  # concurrent, so batches of several images reach ONNX Runtime
            answers = list(pool.map(post, files))
        assert "runtime onnx ready" in ts.log_tail("model_log.log", 400)
    for f, r in zip(files, answers):
        assert r.status_code == 200, r.text
        probs = classify_in_process(trained_digits, f.read_bytes())
        served = r.json()
        assert list(served)[0] == str(int(probs.argmax())), f
        assert all(abs(p - probs[int(k)].item()) < 1e-4 for k, p in served.items())


def test_bf16_autocast_runs_on_cpu_and_agrees_with_fp32(trained_digits, digits_dir):
    """autocast is meant for GPUs; bf16 autocast also runs on the CPU, which is what is
    tested here (fp16 and the GPU paths need a GPU this machine does not have)."""
    from model_defs.checkpoint import data_config_from_meta, load_trained
    from model_defs.preprocessing import eval_transform, load_image

    model, meta = load_trained(trained_digits)
    cfg = data_config_from_meta(meta)
    paths = sorted((digits_dir / "test").rglob("*.png"))[::12]
    batch = torch.stack([eval_transform(cfg)(load_image(p, cfg.channels)) for p in paths])
    cpu = torch.device("cpu")
    fp32 = runtimes.EagerRunner(model, cpu)(batch)
    bf16 = runtimes.load_runtime({"autocast": "bf16"}, trained_digits, model, cpu)(batch)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float().argmax(1) == fp32.argmax(1)).float().mean() >= 0.95


def test_an_unknown_autocast_dtype_is_refused_at_archive_time(trained_digits, tmp_path, capsys):
    assert archive_cli(trained_digits, tmp_path / "store", "--handler-option", "autocast=fp8") == 2
    err = capsys.readouterr().err.strip()
    assert "autocast must be one of bf16, fp16, got 'fp8'" in err and len(err.splitlines()) == 1
    assert store_listing(tmp_path / "store") in ([], ["catalog.json"])
