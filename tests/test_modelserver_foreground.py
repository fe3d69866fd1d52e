"""`scripts/serve start --engine kserve --foreground`: the kserve engine as a container's main
process, started as the serving image's start command starts it (scripts/container_serve.sh) on
the layout `scripts/kserve --engine kserve` writes for its ServingRuntime: a real archive served
by the command itself (it execs into the server: one pid), asked over REST and gRPC with no
token, its log on stdout, then SIGTERM: exit 0, both ports free, no process left."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests
import tritonclient.grpc as triton_grpc

from scripts.cli import archive, kserve, serve
from scripts.ops.modelserver import ModelServerEngine
from scripts.ops.serve import ROOT, port_is_free

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def layout(trained_digits, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("foreground_store")
    assert archive.main([str(trained_digits), "--name", "digits", "--model-store", str(store)]) == 0
    out = tmp_path_factory.mktemp("foreground") / "layout"
    assert kserve.main(["digits:1.0", "--engine", "kserve", "--model-store", str(store), "--out", str(out)]) == 0
    return out


def test_foreground_serves_the_layout_as_the_process_and_stops_cleanly_on_sigterm(layout, digits_dir, tmp_path):
    http, grpc_port = free_port(), free_port()
    run_dir = tmp_path / "run"
    # The layout's config as the pod reads it, on loopback here rather than every interface, with
    # the metrics list where this checkout has it rather than where the image copies it.
    text = (layout / "config" / "config.properties").read_text()
    assert "metrics_config=/etc/torchserve/metrics.yaml" in text.splitlines()
    text = text.replace("/etc/torchserve/metrics.yaml", str(ROOT / "monitoring" / "metrics.yaml"))
    config = tmp_path / "config.properties"
    config.write_text(text.replace("0.0.0.0", "127.0.0.1"))
    command = [
        *(str(ROOT / "scripts" / "serve"), "--run-dir", str(run_dir), "--config", str(config)),
        *("--model-store", str(layout / "model-store")),
        *("start", "--engine", "kserve", "--foreground", "--models", "all"),  # as container_serve.sh
        *("--inference-port", str(http), "--grpc-inference-port", str(grpc_port)),
    ]
    log = tmp_path / "stdout.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{http}"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if requests.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        ms = ModelServerEngine(run_dir=run_dir, model_store=layout / "model-store")
        assert ms.pid() == proc.pid  # exec: the command is the server, as a container needs
        assert requests.get(url + "/v2/models/digits/ready", timeout=10).status_code == 200  # no token: the layout's
        image = sorted((digits_dir / "test").rglob("*.png"))[0]
        answer = requests.post(url + "/predictions/digits", data=image.read_bytes(), timeout=30)
        assert answer.status_code == 200 and isinstance(answer.json(), dict) and len(answer.json()) > 0
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_model_ready("digits")
        assert "Uvicorn running on" in log.read_text()  # the log is on stdout, not in a file only
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, f"exit {code}; stderr: {proc.stderr.read().decode() if proc.stderr else ''}"
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert port_is_free("127.0.0.1", http) and port_is_free("127.0.0.1", grpc_port)
    assert not ms.is_running()


def test_foreground_with_torchserve_is_one_line_and_exit_2(tmp_path, capsys):
    assert serve.main(["--run-dir", str(tmp_path / "run"), "start", "--foreground"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--foreground" in err and "--engine kserve" in err
    assert not (tmp_path / "run").exists()
