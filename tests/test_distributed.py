"""Training under torchrun on this CPU machine: 2 processes, DDP over gloo. The commands are
the multi-GPU and multi-node lines of docs/training.md with only the sizes changed (process
and node counts, batch size, paths, the rendezvous address), read from that page itself.

- a 2-process run of the digits classifier reaches the validation accuracy of a 1-process
  run with the same global batch and epochs, within 1 point;
- a 2-process run killed mid-way (SIGKILL to the whole torchrun group) resumes and finishes;
- a 2-process detection run writes a model that archives and a real TorchServe serves.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from scripts.cli import archive
from tests.conftest import serving
from tests.test_detection_serving import assert_same, in_process
from training import shapes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
COMMON = ["--workers", "0", "--no-progress"]


def readme_command(marker: str) -> str:
    """The docs/training.md line (with its continuation lines) holding `marker`."""
    text = (ROOT / "docs" / "training.md").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(".venv/bin/torchrun") and marker in line]
    assert len(lines) == 1, f"docs/training.md has {len(lines)} torchrun lines with {marker!r}"
    return re.sub(r"\s+", " ", lines[0])


def resized(command: str, **sizes) -> list[str]:
    """The page's command with only the sizes changed: `--flag value` replaced for each size given
    (flag names with _ as in the command), HOST:port by a free local port, .venv by this venv."""
    argv = shlex.split(command)
    argv[0] = TORCHRUN
    for flag, value in sizes.items():
        name = "--" + flag.replace("__", "-")
        assert name in argv, f"{name} not in the page's command {command}"
        argv[argv.index(name) + 1] = str(value)
    if "--rdzv-endpoint" in argv:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            argv[argv.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{s.getsockname()[1]}"
    return argv


def torchrun(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: int = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def best(run: Path) -> float:
    return json.loads((run / "model.json").read_text())["metrics"]["best_val"]


def test_two_processes_match_one_with_the_same_global_batch(digits_dir, tmp_path):
    cmd = readme_command("runs/digits_4gpu")
    epochs = ["--epochs", "6", "--threads", "1"]
    two = tmp_path / "two"
    ddp = torchrun(
        resized(
            cmd, nproc_per_node=2, data=digits_dir / "train", val__data=digits_dir / "test", batch__size=32, out=two
        )
        + COMMON
        + epochs
    )
    log = finish(ddp)
    assert "on cpu x 2 processes" in log and "epoch 6/6" in log
    one = tmp_path / "one"
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            "--data",
            str(digits_dir / "train"),
            "--val-data",
            str(digits_dir / "test"),
            "--model",
            "small_cnn",
            "--channels",
            "1",
            "--hflip-prob",
            "0",
            "--batch-size",
            "64",
            "--out",
            str(one),
            *COMMON,
            *epochs,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert single.returncode == 0, single.stderr
    meta = json.loads((two / "model.json").read_text())
    assert meta["training"]["processes"] == 2 and meta["training"]["global_batch_size"] == 64
    assert best(one) > 0.9 and abs(best(two) - best(one)) <= 0.01, (best(one), best(two))


def test_a_killed_two_process_run_resumes_and_finishes(digits_dir, tmp_path):
    cmd = readme_command("runs/digits_8gpu")
    out = tmp_path / "run"
    argv = (
        resized(
            cmd,
            nnodes=1,
            nproc_per_node=2,
            data=digits_dir / "test",
            val__data=digits_dir / "test",
            batch__size=16,
            out=out,
        )
        + COMMON
        + ["--epochs", "4", "--threads", "1"]
    )
    run = torchrun(argv)
    deadline = time.time() + 600
    while not (out / "checkpoint.pt").exists():
        assert run.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    # torchrun starts each worker in its own session: SIGKILL both workers, then torchrun
    workers = [int(p) for p in Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()]
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    import torch

    done = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    assert 1 <= done < 4
    log = finish(
        torchrun(
            resized(
                cmd,
                nnodes=1,
                nproc_per_node=2,
                data=digits_dir / "test",
                val__data=digits_dir / "test",
                batch__size=16,
                out=out,
            )
            + COMMON
            + ["--epochs", "4", "--threads", "1", "--resume", str(out)]
        )
    )
    assert f"after epoch {done}" in log, log[-3000:]
    epochs = [line.split()[1] for line in log.splitlines() if line.startswith("epoch ")]
    assert epochs == [f"{e}/4" for e in range(done + 1, 5)]  # only the lost epochs, each once (rank 0 prints)
    assert (out / "metrics.csv").read_text().count("\n") == 5
    assert json.loads((out / "model.json").read_text())["metrics"]["epochs_run"] == 4


@pytest.fixture(scope="module")
def ddp_detector(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_det")
    data = shapes.generate(root / "voc", "voc", 8, 128, seed=0, aspect=1.6, progress=False)
    out = root / "run"
    argv = (
        resized(
            readme_command("runs/shapes_det_4gpu"), nproc_per_node=2, data=data, val__data=data, batch__size=2, out=out
        )
        + COMMON
        + ["--epochs", "1", "--threads", "1", "--pictures", "1"]
    )
    log = finish(torchrun(argv))
    assert "x 2 processes" in log
    return out, data


@pytest.mark.serve
def test_a_two_process_detector_archives_and_serves(ddp_detector, shared_server):
    run, data = ddp_detector
    meta = json.loads((run / "model.json").read_text())
    assert meta["task"] == "detection" and meta["training"]["processes"] == 2
    store = shared_server.model_store
    assert (
        archive.main(
            [
                str(run),
                "--name",
                "ddpshapes",
                "--model-store",
                str(store),
                "--handler-option",
                "score_threshold=0",
                "--handler-option",
                "max_detections=10",
            ]
        )
        == 0
    )
    with serving(shared_server, "ddpshapes") as ts:
        image = sorted((data / "JPEGImages").glob("*"))[0].read_bytes()
        r = requests.post(
            f"{ts.url('inference')}/predictions/ddpshapes", data=image, headers=ts.headers("inference"), timeout=120
        )
        assert r.status_code == 200, r.text
        expected = in_process(run, image, 0.0, 10)
        assert expected, "the detector answered nothing: nothing to compare"
        assert_same(r.json(), expected)
