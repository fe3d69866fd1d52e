"""The serving image, built and run for real: `scripts/image build` builds the Containerfile
with the demo's digits.mar in its model store, `scripts/image run` serves it, and what it
answers, seen from the host, equals the in-process model: REST predictions, explanations
(captum and matplotlib in the image), gRPC predictions, and Prometheus metrics. The build's
time and the image's size go to benchmarks/results/serving_image.json (serving_image_rebuilt.json
when an earlier build's layers were reused).

Opt-in and slow (the CUDA torch build makes a multi-GB image): `./scripts/test.sh --image`
sets BUNDLE_IMAGE_TEST=1; the normal suite skips it. It needs buildah, the one tool that runs
images on hosts where `podman run` fails (README, DEPLOYMENT), and skips without it. The base
is BUNDLE_IMAGE_BASE, else the local bookworm `scripts/image base` makes where it exists, else
python:3.11-slim-bookworm.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import requests

from scripts.bench.record import write_record
from scripts.cli import archive
from scripts.ops.serve import ROOT, free_port, read_properties
from tests.conftest import classify_in_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("BUNDLE_IMAGE_TEST") != "1", reason="builds the image: ./scripts/test.sh --image"
    ),
    pytest.mark.skipif(
        shutil.which("buildah") is None,
        reason="buildah is not installed (apt-get install -y buildah; README, DEPLOYMENT)",
    ),
]

IMAGE = ROOT / "scripts" / "image"
TAG = "localhost/torchserve-bundle:test"
LOCAL_BASE = "localhost/bookworm-python:3.11"


def base_image() -> str:
    if os.environ.get("BUNDLE_IMAGE_BASE"):
        return os.environ["BUNDLE_IMAGE_BASE"]
    local = subprocess.run(["buildah", "inspect", "--type", "image", LOCAL_BASE], capture_output=True)
    return LOCAL_BASE if local.returncode == 0 else "python:3.11-slim-bookworm"


def buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def demo_store(trained_digits, tmp_path_factory):
    """model_store/ as scripts/demo.sh leaves it: digits.mar, archived with the demo's options."""
    store = tmp_path_factory.mktemp("image_store")
    argv = [str(trained_digits), "--name", "digits", "--model-store", str(store)]
    assert archive.main([*argv, "--batch-size", "8", "--max-batch-delay", "5"]) == 0
    return store


@pytest.fixture(scope="module")
def image(demo_store):
    started = time.monotonic()
    env = {**os.environ, "IMAGE_TOOL": "buildah"}
    cmd = [str(IMAGE), "build", "--base", base_image(), "--tag", TAG, "--store", str(demo_store)]
    earlier = subprocess.run(["buildah", "images", "--quiet", TAG], capture_output=True, text=True).stdout.split()
    subprocess.run(cmd, check=True, env=env, timeout=3600)
    for image_id in set(earlier) - set(buildah("images", "--quiet", TAG).split()):
        subprocess.run(["buildah", "rmi", image_id], capture_output=True)  # the last run's, now untagged
    seconds = round(time.monotonic() - started)
    size = buildah("images", "--format", "{{.Size}}", TAG)
    print(f"\nimage {TAG}: built in {seconds} s (less where layers were cached), {size}")
    write_record(
        "serving_image_rebuilt" if earlier else "serving_image",  # a rebuild reuses the pip layer
        {"tag": TAG, "base": base_image(), "build_seconds": seconds, "size": size, "layers_cached": bool(earlier)},
        command="./scripts/test.sh --image",
    )
    return TAG


@pytest.fixture(scope="module")
def served(image, tmp_path_factory):
    with running(image, tmp_path_factory, "torchserve") as server:
        yield server


@contextlib.contextmanager
def running(image: str, tmp_path_factory, engine: str):
    """`scripts/image run --engine ENGINE` with the image's config on free loopback ports (buildah
    shares the host's network); stopped with SIGTERM as Ctrl-C stops it: nothing may be left
    listening on its ports, nor its container left."""
    props = read_properties(ROOT / "k8s" / "base" / "config.properties")
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt", "worker")}
    props.update(
        inference_address=f"http://127.0.0.1:{ports['inference']}",
        management_address=f"http://127.0.0.1:{ports['management']}",
        metrics_address=f"http://127.0.0.1:{ports['metrics']}",
        grpc_inference_address="127.0.0.1",
        grpc_inference_port=str(ports["grpc"]),
        grpc_management_port=str(ports["grpc_mgmt"]),
        initial_worker_port=str(ports["worker"]),
    )
    config = tmp_path_factory.mktemp("image_config") / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    before = set(buildah("containers", "--quiet").split())
    log = (tmp_path_factory.mktemp("image_run") / "run.log").open("w")
    env = {**os.environ, "IMAGE_TOOL": "buildah"}
    proc = subprocess.Popen(
        [str(IMAGE), "run", "--tag", image, "--config", str(config), "--engine", engine],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = props["inference_address"]
    try:
        deadline, healthy = time.monotonic() + 300, False
        while not healthy and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(requests.RequestException):
                healthy = requests.get(f"{url}/ping", timeout=5).json().get("status") == "Healthy"
            time.sleep(0 if healthy else 2)
        assert healthy, f"scripts/image run did not become healthy (exit {proc.poll()}): {log.name}"
        yield url, ports, proc
    finally:
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C: the script stops TorchServe, removes the container
        try:
            proc.wait(timeout=120)
        finally:
            left = listeners(ports)
            for p in left:  # never leave a server behind, even when the test fails
                for child in p.children(recursive=True):
                    child.kill()
                p.kill()
            if proc.poll() is None:
                proc.kill()
            log.close()
    # Either engine is stopped by its own stop command inside the container; the script's exit
    # status is then that of the wait its trap cut short (128 + SIGTERM).
    assert proc.returncode == 128 + signal.SIGTERM and not left, f"exit {proc.returncode}; left running: {left}"
    assert set(buildah("containers", "--quiet").split()) <= before, "the run's container was not removed"


def listeners(ports: dict[str, int]) -> list[psutil.Process]:
    conns = psutil.net_connections("tcp")
    return [psutil.Process(c.pid) for c in conns if c.status == "LISTEN" and c.laddr.port in ports.values() and c.pid]


def test_image_serves_the_demo_mar_as_in_process(served, trained_digits, digits_dir):
    url, _, _ = served
    files = sorted((digits_dir / "test").rglob("*.png"))[::60][:6]
    for f in files:
        r = requests.post(f"{url}/predictions/digits", data=f.read_bytes(), timeout=60)
        assert r.status_code == 200, r.text
        probs = classify_in_process(trained_digits, f.read_bytes())
        top = probs.topk(len(r.json()))
        assert list(r.json()) == [str(i) for i in top.indices.tolist()]
        assert list(r.json().values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    bad = requests.post(f"{url}/predictions/digits", data=b"this is not an image", timeout=60)
    assert bad.status_code == 400 and "image" in bad.text.lower()


def test_image_runs_as_non_root_with_its_healthcheck(served, image):
    """The server inside is the image's model-server user (uid 1000), and the image keeps its
    HEALTHCHECK (the docker format; OCI has none)."""
    _, ports, _ = served
    (server,) = {p.pid: p for p in listeners(ports)}.values()  # the frontend holds every port
    assert server.uids().real == 1000 and server.cmdline()[0] == "java"
    check = buildah("inspect", "--type", "image", "--format", "{{.Docker.Config.Healthcheck.Test}}", image)
    assert "/ping" in check


def test_image_explains_with_the_heatmap_it_promises(served, trained_digits, digits_dir):
    """/explanations needs captum and matplotlib inside the image: the top class's explanation,
    with a heatmap of the image's size, for the class the in-process model predicts."""
    from PIL import Image

    url, _, _ = served
    data = sorted((digits_dir / "test").rglob("*.png"))[0].read_bytes()
    r = requests.post(f"{url}/explanations/digits", data=data, timeout=300)
    assert r.status_code == 200, r.text
    answer = r.json()
    probs = classify_in_process(trained_digits, data)
    assert answer["target"] == str(int(probs.argmax()))
    assert answer["probability"] == pytest.approx(probs.max().item(), abs=1e-4)
    heatmap = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"])))
    assert heatmap.size == Image.open(io.BytesIO(data)).size == (answer["width"], answer["height"])


def test_image_answers_grpc_as_rest(served, digits_dir, tmp_path):
    import grpc

    from tests.grpc_stubs import inference_stubs

    url, ports, _ = served
    stubs = inference_stubs(tmp_path / "stubs")
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        service = stubs.service(channel)
        data = sorted((digits_dir / "test").rglob("*.png"))[1].read_bytes()
        request = stubs.pb2.PredictionsRequest(model_name="digits", input={"data": data})
        answer = json.loads(service.Predictions(request, timeout=120).prediction)
    assert answer == pytest.approx(requests.post(f"{url}/predictions/digits", data=data, timeout=60).json(), abs=1e-6)


def test_image_exports_the_handler_metrics(served, digits_dir):
    """After the predictions above and one bad image, /metrics (Prometheus) counts them."""
    from prometheus_client.parser import text_string_to_metric_families

    url, ports, _ = served
    requests.post(f"{url}/predictions/digits", data=b"not an image", timeout=60)
    text = requests.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=30).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    names = {s.name for s in samples}
    assert any("ts_inference_requests_total" in n for n in names), sorted(names)[:20]
    refused = [s for s in samples if "refused" in s.name and s.labels.get("model_name") == "digits"]
    assert refused and sum(s.value for s in refused) >= 1, sorted(names)


def test_image_serves_with_the_kserve_engine_as_in_process(image, tmp_path_factory, trained_digits, digits_dir):
    """The same image, `--engine kserve`: KServe's ModelServer serves the image's archives with
    no Java, its answers equal the in-process model's, and the Open Inference Protocol's
    readiness and metadata answer (TorchServe answers neither)."""
    with running(image, tmp_path_factory, "kserve") as (url, ports, _):
        (server,) = {p.pid: p for p in listeners(ports)}.values()
        assert "java" not in server.cmdline()[0]
        assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
        assert requests.get(f"{url}/v2/models/digits/ready", timeout=30).status_code == 200
        assert requests.get(f"{url}/v2/models/digits", timeout=30).json()["name"] == "digits"
        for f in sorted((digits_dir / "test").rglob("*.png"))[::90][:4]:
            r = requests.post(f"{url}/predictions/digits", data=f.read_bytes(), timeout=60)
            assert r.status_code == 200, r.text
            top = classify_in_process(trained_digits, f.read_bytes()).topk(len(r.json()))
            assert list(r.json()) == [str(i) for i in top.indices.tolist()]
            assert list(r.json().values()) == pytest.approx(top.values.tolist(), abs=1e-4)
