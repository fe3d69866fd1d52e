"""A real TorchServe, started on free loopback ports, serving real .mar files over REST."""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from model_defs import DataConfig, get_model
from model_defs.checkpoint import save_model_files
from scripts.cli import archive, serve
from scripts.ops.serve import ServeError, TorchServe
from tests.conftest import classify_in_process, encode, image_variants, serving

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """A second model: an RGB convnext_mini with named classes (untrained)."""
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("photo_run")
    cfg = DataConfig(input_size=32, resize_size=36, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = get_model("convnext_mini", num_classes=3, in_channels=3)
    save_model_files(
        out,
        model,
        {
            "arch": "convnext_mini",
            "arch_args": {"num_classes": 3, "in_channels": 3},
            "task": "classification",
            "classes": ["cat", "coffee", "rocket"],
            "preprocessing": cfg.to_dict(),
        },
    )
    return out


@pytest.fixture(scope="module")
def server(trained_digits, photo_run, shared_server):
    store = shared_server.model_store
    # A long batch delay so concurrent requests really share a batch.
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
                "300",
                "--topk",
                "10",
            ]
        )
        == 0
    )
    assert archive.main([str(photo_run), "--name", "photos", "--model-store", str(store), "--batch-size", "4"]) == 0
    with serving(shared_server, "digits", "photos") as ts:
        yield ts


def predict(ts, model, data=None, **kw):
    kw.setdefault("headers", ts.headers("inference"))
    return requests.post(f"{ts.url('inference')}/predictions/{model}", data=data, timeout=60, **kw)


def test_rest_predictions_equal_in_process_predictions(server, trained_digits, digits_dir):
    files = sorted((digits_dir / "test").rglob("*.png"))[::12]
    with ThreadPoolExecutor(8) as pool:  # concurrent, so TorchServe batches them
        answers = list(pool.map(lambda f: predict(server, "digits", f.read_bytes()), files))
    for f, r in zip(files, answers):
        assert r.status_code == 200, r.text
        served = r.json()
        probs = classify_in_process(trained_digits, f.read_bytes())
        assert list(served)[0] == str(int(probs.argmax())), f
        assert len(served) == 10
        for label, p in served.items():
            assert abs(p - probs[int(label)].item()) < 1e-4


def test_second_model_is_served_beside_the_first(server, photo_run, photos):
    assert sorted(server.models()) == ["digits", "photos"]
    data = encode(photos["chelsea"], "JPEG")
    r = predict(server, "photos", data)
    assert r.status_code == 200, r.text
    probs = classify_in_process(photo_run, data)
    names = ["cat", "coffee", "rocket"]
    assert list(r.json())[0] == names[int(probs.argmax())]
    assert all(abs(p - probs[names.index(k)].item()) < 1e-4 for k, p in r.json().items())


def test_multipart_and_base64_json_are_accepted(server, photos):
    data = encode(photos["coffee"], "PNG")
    raw = predict(server, "photos", data).json()
    multipart = predict(server, "photos", files={"data": ("coffee.png", data, "image/png")}).json()
    as_json = predict(server, "photos", json={"data": base64.b64encode(data).decode()}).json()
    assert list(raw) == list(multipart) == list(as_json)
    assert all(abs(raw[k] - multipart[k]) < 1e-6 and abs(raw[k] - as_json[k]) < 1e-6 for k in raw)


def test_every_common_format_and_mode_is_served(server, photos):
    for name, data in image_variants(photos["astronaut"]).items():
        r = predict(server, "photos", data)
        assert r.status_code == 200, (name, r.text)


def test_bad_items_get_4xx_while_their_batch_mates_succeed(server, digits_dir, trained_digits):
    good = sorted((digits_dir / "test").rglob("*.png"))[:6]
    bad = [b"not an image at all", good[0].read_bytes()[:40], b'{"image": "no data field"}']
    payloads = [f.read_bytes() for f in good] + bad
    with ThreadPoolExecutor(len(payloads)) as pool:
        answers = list(pool.map(lambda d: predict(server, "digits", d), payloads))
    for f, r in zip(good, answers[: len(good)]):
        assert r.status_code == 200, r.text
        assert list(r.json())[0] == str(int(classify_in_process(trained_digits, f.read_bytes()).argmax()))
    for r in answers[len(good) :]:
        assert r.status_code == 400, r.text
        body = r.json()
        assert set(body) == {"code", "type", "message"} and body["code"] == 400
        assert body["message"]


def test_grpc_predictions_equal_rest_with_the_token_and_refuse_without(server, digits_dir, tmp_path):
    """TorchServe's gRPC inference API (stubs compiled from its own jar's inference.proto): the
    answer equals REST's; the token goes as `authorization: Bearer KEY` metadata, and a call
    without it is refused; a bad image's JSON error comes back in the body."""
    import grpc
    from google.protobuf.empty_pb2 import Empty

    from tests.grpc_stubs import inference_stubs

    stubs = inference_stubs(tmp_path / "stubs")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.listen_ports()['grpc_inference'][1]}")
    service = stubs.service(channel)
    token = [("authorization", server.headers("inference")["Authorization"])]
    assert service.Ping(Empty(), metadata=token).health
    data = sorted((digits_dir / "test").rglob("*.png"))[0].read_bytes()
    request = stubs.pb2.PredictionsRequest(model_name="digits", input={"data": data})
    answer = json.loads(service.Predictions(request, metadata=token, timeout=60).prediction)
    assert answer == pytest.approx(predict(server, "digits", data).json(), abs=1e-6)
    with pytest.raises(grpc.RpcError) as refused:
        service.Predictions(request, timeout=60)
    assert refused.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    bad = stubs.pb2.PredictionsRequest(model_name="digits", input={"data": b"not an image"})
    error = json.loads(service.Predictions(bad, metadata=token, timeout=60).prediction)
    assert error["code"] == 400 and "image" in error["message"].lower()
    channel.close()


def test_requests_without_the_token_are_refused(server, digits_dir):
    data = next((digits_dir / "test").rglob("*.png")).read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        r = predict(server, "digits", data, headers=headers)
        assert r.status_code != 200 and "Token" in r.text
        r = requests.get(f"{server.url('management')}/models", headers=headers, timeout=10)
        assert r.status_code != 200 and "Token" in r.text
    assert predict(server, "digits", data).status_code == 200


def test_register_only_from_the_local_store(server, tmp_path):
    outside = tmp_path / "elsewhere.mar"
    outside.write_bytes((server.model_store / "photos.mar").read_bytes())
    for url in ("http://127.0.0.1:9/evil.mar", "https://example.com/model.mar", f"file://{outside}"):
        with pytest.raises(ServeError, match="does not match any allowed URL"):
            server.manage("POST", "/models", url=url, model_name="evil", initial_workers=0)
    assert sorted(server.models()) == ["digits", "photos"]


def test_apis_listen_on_loopback_only(server):
    """The sockets the server and its workers really listen on (psutil), gRPC included."""
    import psutil

    frontend = psutil.Process(server.pid())
    pids = {p.pid for p in [frontend, *frontend.children(recursive=True)]}
    # psutil.net_connections, not Process.net_connections: the psutil kserve allows (<6) has only the former.
    listening = [
        c.laddr for c in psutil.net_connections(kind="inet") if c.pid in pids and c.status == psutil.CONN_LISTEN
    ]
    assert {a.port for a in listening} == {port for _, port in server.listen_ports().values()}
    assert len(listening) == 5 and all(is_loopback(a.ip) for a in listening), listening


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as Java reports it (an IPv4-mapped IPv6 address, ::ffff:127.0.0.1)."""
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def test_prometheus_metrics_are_exported(server):
    r = requests.get(f"{server.url('metrics')}/metrics", timeout=10)
    assert r.status_code == 200 and "ts_inference_requests_total" in r.text


def test_start_refuses_a_taken_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        ts = TorchServe(run_dir=tmp_path, model_store=tmp_path, ports={"inference": taken})
        with pytest.raises(ServeError, match=f"port {taken} .* already in use"):
            ts.start([])


def test_start_says_when_java_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    ts = TorchServe(run_dir=tmp_path, model_store=tmp_path, ports={})
    with pytest.raises(ServeError, match="Java 17"):
        ts.start([])


ROOT = Path(__file__).resolve().parent.parent


def test_the_run_folder_and_the_keys_are_private(server):
    assert stat.S_IMODE(server.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.key_file.stat().st_mode) == 0o600
    for path in (server.run_dir / "logs").iterdir():  # written under umask 077
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_logs_hold_each_line_once_at_info(server, digits_dir):
    data = next((digits_dir / "test").rglob("*.png")).read_bytes()
    assert predict(server, "digits", data).status_code == 200
    # The frontend's and the workers' records (each record's first line starts with its timestamp,
    # to the ms): both, so that the module run alone, on a server with one model, has enough.
    lines = [
        line
        for log in ("ts_log.log", "model_log.log")
        for line in (server.run_dir / "logs" / log).read_text().splitlines()
        if line[:4].isdigit()
    ]
    # A record written twice (two appenders) would repeat every line. The shared server's log
    # also holds a few genuinely repeated lines: the same message from two threads in one ms.
    repeated = len(lines) - len(set(lines))
    assert len(lines) > 20 and repeated <= len(lines) // 100, (repeated, len(lines))
    assert not any("[DEBUG]" in line for line in lines)
    assert "org.pytorch.serve" not in (server.run_dir / "logs" / "console.log").read_text()


def test_key_refresh_gets_a_new_key_without_a_restart(server, digits_dir, capsys):
    data = next((digits_dir / "test").rglob("*.png")).read_bytes()
    old, pid = server.key("inference"), server.pid()
    assert serve.main(["key", "--refresh", "--run-dir", str(server.run_dir)]) == 0
    new = capsys.readouterr().out.strip()
    assert new != old and new == server.key("inference") and server.pid() == pid
    assert predict(server, "digits", data, headers={"Authorization": f"Bearer {old}"}).status_code == 400
    assert predict(server, "digits", data).status_code == 200


def test_key_and_status_answer_without_importing_torch(server):
    probe = (
        "import sys; from scripts.cli import serve; "
        f"codes = [serve.main(['key', '--run-dir', {str(server.run_dir)!r}]), "
        f"serve.main(['status', '--run-dir', {str(server.run_dir)!r}])]; "
        "print(codes, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[0, 0] False", out.stdout + out.stderr


def test_the_readme_curl_examples_send_a_5_mb_photo(server, photos, photo_run, tmp_path):
    """README's curl lines, run by bash as written (the key through a file descriptor)."""
    rng = np.random.default_rng(0)
    photo = np.asarray(photos["astronaut"].resize((2700, 2700)), dtype=np.int16)
    noisy = np.clip(photo + rng.integers(-40, 40, photo.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=95)
    path = tmp_path / "photo.jpg"
    path.write_bytes(buf.getvalue())
    assert 5_000_000 <= path.stat().st_size <= 6_500_000, path.stat().st_size
    url = f"{server.url('inference')}/predictions/photos"
    key = f"-H @<(scripts/serve key --header --run-dir {server.run_dir})"
    as_json = """{ printf '{"data": "'; base64 -w0 PATH; printf '"}'; }""".replace("PATH", str(path))
    commands = [
        f"curl -s {key} -H 'Content-Type: image/jpeg' {url} --data-binary @{path}",
        f"curl -s {key} {url} -T {path}",
        f"curl -s {key} {url} -F data=@{path}",
        f"{as_json} | curl -s {key} -H 'Content-Type: application/json' --data-binary @- {url}",
    ]
    expected = classify_in_process(photo_run, path.read_bytes())
    for command in commands:
        out = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
        answer = json.loads(out.stdout)
        assert "code" not in answer, (command, answer)
        assert list(answer)[0] == ["cat", "coffee", "rocket"][int(expected.argmax())], (command, out.stdout)


def test_no_batch_delay_with_batching_is_served_as_1_ms_not_100(server, photo_run, photos):
    """TorchServe 0.12 reads an archive's maxBatchDelay 0 as "not set" and waits its 100 ms
    default for every batch; the archiver writes 1 ms for a batch size over 1, and the running
    server's own description shows it took that."""
    store = server.model_store
    assert (
        archive.main(
            [
                str(photo_run),
                "--name",
                "nodelay",
                "--model-store",
                str(store),
                "--batch-size",
                "4",
                "--max-batch-delay",
                "0",
            ]
        )
        == 0
    )
    version = server.register("nodelay", "nodelay.mar", timeout=240)
    try:
        described = server.describe("nodelay")[0]
        assert (described["batchSize"], described["maxBatchDelay"]) == (4, 1), described
        r = predict(server, "nodelay", encode(photos["chelsea"], "JPEG"))
        assert r.status_code == 200, r.text
    finally:
        server.unregister("nodelay", version)
