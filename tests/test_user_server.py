"""A server started the way a user starts a second one: `scripts/serve start --port-offset N`
with its run folder in $BUNDLE_RUN_DIR, then found by scripts/serve, models, predict and top
from that variable alone, and called with real curl. The frontend's status codes a client
can cause are provoked here and looked up in docs/status-codes.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from scripts.cli import archive, top
from scripts.ops.serve import ROOT, TorchServe, listen_ports, port_is_free, read_properties
from tests.test_status_codes import table_rows

pytestmark = [pytest.mark.serve]

CURL = shutil.which("curl")


def free_offset() -> int:
    """An offset that puts every port of the bundle's config.properties on a free port."""
    ports = listen_ports(read_properties(ROOT / "config.properties"))
    for offset in range(1000 + os.getpid() % 500 * 10, 60000 - 8080, 37):
        if all(port_is_free(host, port + offset) for host, port in ports.values()):
            return offset
    raise AssertionError("no free ports")


def command(name: str, *args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "scripts" / name), *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def store(digits_run, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("user_store")
    assert archive.main([str(digits_run), "--name", "digits", "--model-store", str(store), "--batch-size", "4"]) == 0
    return store


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("user_run")
    return {**os.environ, "BUNDLE_RUN_DIR": str(run_dir)}


@pytest.fixture(scope="module")
def started(store, env):
    """(the TorchServe, the offset, what `scripts/serve start` printed); stopped at the end
    by `scripts/serve stop` given nothing but the environment."""
    offset = free_offset()
    start = command("serve", "--model-store", store, "start", "--port-offset", offset, "--models", "digits", env=env)
    assert start.returncode == 0, start.stderr
    ts = TorchServe(run_dir=Path(env["BUNDLE_RUN_DIR"]))
    try:
        yield ts, offset, start.stdout
    finally:
        stop = command("serve", "stop", env=env)
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stderr
        assert not ts.is_running()


@pytest.fixture
def server(started) -> TorchServe:
    return started[0]


@pytest.fixture(scope="module")
def key_header(started, tmp_path_factory) -> Path:
    """A file holding 'Authorization: Bearer KEY', for curl -H @FILE (scripts/serve key --header)."""
    path = tmp_path_factory.mktemp("key") / "header"
    path.write_text(started[0].headers()["Authorization"].join(("Authorization: ", "\n")))
    return path


def curl(*args) -> tuple[int, str]:
    r = subprocess.run(
        [CURL, "-s", "-o", "-", "-w", "\n%{http_code}", *map(str, args)], capture_output=True, timeout=120
    )
    body, _, code = r.stdout.decode(errors="replace").rpartition("\n")
    return int(code), body


def in_table(code: int, body: str) -> dict:
    """The row of docs/status-codes.md for an answer (its code and the body's type)."""
    type_ = json.loads(body)["type"] if body.strip() else ""
    rows = [r for r in table_rows() if r["code"] == code and r["type"] == type_]
    assert rows, f"docs/status-codes.md has no row for {code} {type_!r}"
    return rows[0]


# -- scripts/serve start: ports and hints --------------------------------------------------


def test_start_moves_every_port_and_names_its_run_folder(started, env):
    ts, offset, printed = started
    config = listen_ports(read_properties(ROOT / "config.properties"))
    assert {api: port for api, (_, port) in ts.listen_ports().items()} == {
        api: port + offset for api, (_, port) in config.items()
    }
    run_dir = env["BUNDLE_RUN_DIR"]
    hints = [line for line in printed.splitlines() if "scripts/serve" in line]
    assert len(hints) == 2 and all(f"--run-dir {Path(run_dir).resolve()}" in line for line in hints), printed
    assert ts.url("inference") in printed
    # Every command finds the server from $BUNDLE_RUN_DIR alone.
    status = command("serve", "status", env=env)
    assert status.returncode == 0 and ts.url("inference") in status.stdout, status.stderr
    assert command("serve", "key", env=env).stdout.strip() == ts.key("inference")
    models = command("models", "status", env=env)
    assert models.returncode == 0 and "digits" in models.stdout, models.stderr
    top = command("top", "--json", "--interval", "0.2", env=env)
    assert top.returncode == 0 and json.loads(top.stdout)["versions"][0]["model"] == "digits", top.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port-offset", "70000"], "a port is 1 to 65535"),
        (["--inference-port", "0"], "--inference-port gives the inference API port 0"),
        (["--inference-port", "9999", "--metrics-port", "9999"], "port 9999 is given to two APIs"),
    ],
)
def test_a_bad_port_is_one_line_and_starts_nothing(tmp_path, args, message):
    env = {**os.environ, "BUNDLE_RUN_DIR": str(tmp_path / "run")}
    r = command("serve", "start", *args, env=env)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_stopped_servers_hint_names_its_run_folder(tmp_path):
    run_dir = tmp_path / "nothing"
    r = command("models", "status", env={**os.environ, "BUNDLE_RUN_DIR": str(run_dir)})
    assert r.returncode == 1 and f"scripts/serve start --run-dir {run_dir.resolve()}" in r.stderr, r.stderr


# -- curl: the first calls, and the status codes a client can cause -----------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_dir) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("curl_files")
    png = sorted((digits_dir / "test" / "3").glob("*.png"))[0]
    out = {"png": root / "three.png", "jpeg": root / "three.jpg", "text": root / "notes.jpg"}
    shutil.copy(png, out["png"])
    with Image.open(png) as im:
        im.convert("RGB").save(out["jpeg"], quality=90)
    out["text"].write_text("shopping list: milk, eggs\n")
    return out


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_curl_ways_to_send_an_image(server, key_header, files):
    url = f"{server.url('inference')}/predictions/digits"
    for args in (
        ["-T", files["jpeg"]],
        ["-F", f"data=@{files['jpeg']}"],
        ["-H", "Content-Type: image/png", "--data-binary", f"@{files['png']}"],
    ):
        code, body = curl("-H", f"@{key_header}", *args, url)
        assert code == 200 and len(json.loads(body)) == 5, (args, body)


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_curl_data_binary_without_a_content_type(server, key_header, files):
    """curl sends such a body form-encoded. A body the frontend can read as form fields reaches
    the handler, which answers 415 naming the fix; an image's bytes fail the frontend's form
    decoder first: TorchServe 0.12 answers that 500 itself (docs/status-codes.md)."""
    url = f"{server.url('inference')}/predictions/digits"
    code, body = curl("-H", f"@{key_header}", "--data-binary", f"@{files['text']}", url)
    assert code == 415 and json.loads(body)["type"] == "FormEncodedBody", body
    assert "Content-Type: image/jpeg" in json.loads(body)["message"] and "-T" in json.loads(body)["message"]
    in_table(code, body)
    for image in (files["png"], files["jpeg"]):
        code, body = curl("-H", f"@{key_header}", "--data-binary", f"@{image}", url)
        assert code == 500 and json.loads(body)["type"] == "ErrorDataDecoderException", body
        row = in_table(code, body)
        assert row["by"] == "frontend"


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_frontend_statuses_are_in_the_table(server, key_header, files, tmp_path):
    base = server.url("inference")
    url = f"{base}/predictions/digits"
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(int(read_properties(server.run_dir / "config.properties")["max_request_size"]) + 1)
    seen = {}
    for name, args, want in (
        ("no token", ["-T", files["jpeg"], url], 400),
        ("wrong token", ["-H", "Authorization: Bearer nope", "-T", files["jpeg"], url], 400),
        ("unknown model", ["-H", f"@{key_header}", "-T", files["jpeg"], f"{base}/predictions/nomodel"], 404),
        ("unknown version", ["-H", f"@{key_header}", "-T", files["jpeg"], f"{url}/9.9"], 404),
        ("unknown path", ["-H", f"@{key_header}", f"{base}/nothing/here/at/all"], 404),
        ("over max_request_size", ["-H", f"@{key_header}", "-T", big, url], 413),
        ("not an image", ["-H", f"@{key_header}", "-H", "Content-Type: image/jpeg", "--data-binary", "abc", url], 400),
    ):
        code, body = curl(*args)
        assert code == want, (name, code, body)
        seen[name] = in_table(code, body)
    assert seen["over max_request_size"]["by"] == "frontend" and seen["not an image"]["type"] == "InvalidImage"
    # No worker: scaled to none, then back.
    server.scale("digits", server.describe("digits")[0]["modelVersion"], 0, 0, record=False)
    try:
        code, body = curl("-H", f"@{key_header}", "-T", files["jpeg"], url)
        assert code == 503 and in_table(code, body)["by"] == "frontend", body
    finally:
        server.scale("digits", server.describe("digits")[0]["modelVersion"], 1, 1, record=False)
        server.wait_ready(["digits"], timeout=240)


# -- scripts/predict: unreadable files -----------------------------------------------------


def test_predict_scores_answered_images_and_lists_unreadable_ones(server, env, digits_dir, tmp_path):
    data = tmp_path / "photos"
    for digit in ("1", "3", "7"):
        (data / digit).mkdir(parents=True)
        for path in sorted((digits_dir / "test" / digit).glob("*.png"))[:6]:
            shutil.copy(path, data / digit / path.name)
    whole = (data / "3" / sorted(os.listdir(data / "3"))[0]).read_bytes()
    (data / "3" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (data / "7" / "notes.png").write_text("not an image\n")
    out = tmp_path / "answers.json"
    r = command("predict", "--model", "digits", data, "--out", out, "--show", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert "2 of 20 image(s) could not be read" in r.stderr, r.stderr
    assert "3/truncated.png" in r.stderr and "7/notes.png" in r.stderr
    answers = json.loads(out.read_text())["answers"]
    good = [a for a in answers if a["status"] == 200]
    right = sum(next(iter(a["answer"])) == a["truth"] for a in good)
    line = next(line for line in r.stdout.splitlines() if line.startswith("accuracy"))
    assert line.startswith(f"accuracy {right / len(good):.4f} on the 18 answered of 20 labelled images"), line
    assert "2 unanswered" in line and "single-label classification" in line and "(single)" not in line


# -- scripts/top: scale-downs, restarts, end-to-end latency --------------------------------


def test_top_tells_a_scale_down_from_a_restart_and_shows_end_to_end_latency(server, env, files):
    version = server.describe("digits")[0]["modelVersion"]
    server.scale("digits", version, 2, 2, record=False)
    server.wait_ready(["digits"], timeout=240)
    server.scale("digits", version, 1, 1, record=False)
    url = f"{server.url('inference')}/predictions/digits"  # names no version: "default" at the frontend
    image, headers = files["jpeg"].read_bytes(), server.headers()
    done = threading.Event()

    def load():
        while not done.is_set():
            assert requests.post(url, data=image, headers=headers, timeout=60).status_code == 200

    sender = threading.Thread(target=load)
    sender.start()
    try:
        time.sleep(0.5)
        r = command("top", "--json", "--interval", "3", env=env)
    finally:
        done.set()
        sender.join()
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)["versions"]
    # Every worker slot was started once (earlier tests scaled this version too): no restart.
    assert (row["workers"], row["restarts"]) == (1, 0), row
    assert row["scaled_down"] == row["worker_starts"] - 1 >= 1, row
    assert row["requests_per_s"] > 0 and row["e2e_ms"] is not None and row["e2e_ms"] > 0, row
    assert row["e2e_ms"] >= row["queue_ms"], row
    frame = top.table(json.loads(r.stdout))
    header = frame.splitlines()[1]
    assert "e2e: mean per request" in frame and re.search(r"e2e ms +handler p50 +handler p99", header), frame
    assert header.rstrip().endswith("restarts  scaled down"), header


# -- docs/clients.md, run as written --------------------------------------------------------

CLIENTS_DOC = ROOT / "docs" / "clients.md"


def doc_blocks() -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every bash and python block of docs/clients.md."""
    blocks, section = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```(bash|python)\n(.*?)^```$", CLIENTS_DOC.read_text(), re.M | re.S):
        if match.group(1):
            section = match.group(1)
        else:
            blocks.append((section, match.group(2), match.group(3)))
    return blocks


def json_documents(text: str) -> list:
    """The JSON documents printed one after another (curl's answers)."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


def is_answer(doc) -> bool:
    return isinstance(doc, dict) and len(doc) == 5 and all(isinstance(p, float) for p in doc.values())


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_every_client_example_runs_as_written(server, store, env, files, tmp_path):
    """From a folder holding photo.jpg and digit.png (and scripts/ commands that run the
    bundle's), each block in order; only the ports are the test servers' own."""
    from PIL import Image
    from skimage import data

    from scripts.cli import kserve
    from scripts.ops.kserve_layout import layout_run_dir
    from scripts.ops.serve import free_port

    Image.fromarray(data.chelsea()).save(tmp_path / "photo.jpg", quality=90)
    shutil.copy(files["png"], tmp_path / "digit.png")
    (tmp_path / "scripts").mkdir()
    for name in ("serve", "kserve"):
        wrapper = tmp_path / "scripts" / name
        wrapper.write_text(f'#!/bin/sh\nexec "{ROOT}/scripts/{name}" "$@"\n')
        wrapper.chmod(0o755)
    layout = tmp_path / "kserve-digits"
    assert kserve.main(["digits:1.0", "--out", str(layout), "--model-store", str(store)]) == 0
    ports = {"127.0.0.1:8080": server.url("inference").removeprefix("http://"), "8085": str(free_port())}
    blocks = doc_blocks()
    assert [lang for _, lang, _ in blocks] == ["bash", "python", "bash", "bash", "python", "python", "bash"]
    outputs = []
    try:
        for section, lang, code in blocks:
            for written, real in ports.items():
                code = code.replace(written, real)
            argv = ["bash", "-c", "set -euo pipefail\n" + code] if lang == "bash" else [sys.executable, "-c", code]
            r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, (section, code, r.stdout, r.stderr)
            outputs.append(r.stdout)
    finally:
        TorchServe(run_dir=layout_run_dir(layout)).stop()
    curl_answers = json_documents(outputs[0])
    assert len(curl_answers) == 5 and all(is_answer(d) for d in curl_answers), outputs[0]
    assert "{'" in outputs[1] and "Traceback" not in outputs[1]
    assert "as KServe would" in outputs[2] and f"127.0.0.1:{ports['8085']}" in outputs[2], outputs[2]
    [v1] = json_documents(outputs[3])
    assert len(v1["predictions"]) == 2 and all(is_answer(d) for d in v1["predictions"]), v1
    assert "[b'' b'']" in outputs[4], outputs[4]  # no image refused
    assert "'name': 'labels'" in outputs[5] and "'name': 'probabilities'" in outputs[5], outputs[5]
    assert "stopped" in outputs[6] and not TorchServe(run_dir=layout_run_dir(layout)).is_running()
