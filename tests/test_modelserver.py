"""The kserve engine (`scripts/serve start --engine kserve`): the same catalogued archives served
by KServe's ModelServer, asked with the real clients (requests for v1 and TorchServe's routes,
tritonclient.http in JSON and binary data, tritonclient.grpc), its answers compared with a real
TorchServe's for the same archive, bad items included; then batching, versions, metrics, the
token, loopback, the serving record across a restart, and the commands it refuses."""

from __future__ import annotations

import base64
import ipaddress
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from scripts.cli import archive, models, serve
from scripts.ops.modelserver import ModelServerEngine, engine_of
from scripts.ops.serve import ServeError
from tests.conftest import encode, serving
from tests.test_task_serving import MAX_N, runs  # noqa: F401 - runs: the untrained task models, a fixture

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

NOT_AN_IMAGE = b"this is not an image"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def digit_files(digits_dir) -> list[Path]:
    return sorted((digits_dir / "test").rglob("*.png"))[::40][:6]


@pytest.fixture(scope="module")
def bad_items(digit_files, photos) -> dict[str, bytes]:
    png = digit_files[0].read_bytes()
    return {
        "not_an_image": NOT_AN_IMAGE,
        "truncated_png": png[: len(png) // 2],
        "empty": b"",
        "too_many_pixels": encode(photos["astronaut"].resize((2500, 2500)), "JPEG"),
    }


@pytest.fixture(scope="module")
def torchserve(trained_digits, runs, shared_server):  # noqa: F811 - runs is the imported fixture
    """The shared TorchServe serving digits 1.0 (from a store that also holds digits 2.0) and
    the other tasks' models: segmentation, generation, embedding."""
    store = shared_server.model_store
    common = ["--model-store", str(store), "--batch-size", "8", "--max-batch-delay", "200"]
    # max_pixels: a 2500x2500 image is refused (413) by the handler, under either engine.
    limits = ["--handler-option", "max_pixels=4000000"]
    assert archive.main([str(trained_digits), "--name", "digits", "--topk", "10", *common, *limits]) == 0
    two = ["--version", "2.0", "--topk", "3", "--workers", "2"]
    assert archive.main([str(trained_digits), "--name", "digits", *two, *common]) == 0
    for name, run in runs.items():
        extra = ["--handler-option", f"max_n={MAX_N}"] if name == "digit_gan" else []
        assert archive.main([str(run), "--name", name, *common, *extra]) == 0
    with serving(shared_server, "digits", *runs, timeout=300) as ts:
        yield ts


@pytest.fixture(scope="module")
def engine(torchserve, tmp_path_factory):
    """ModelServer serving every catalogued version of the same store, on free loopback ports."""
    ms = ModelServerEngine(run_dir=tmp_path_factory.mktemp("modelserver"), model_store=torchserve.model_store, ports={})
    assert ms.start(everything=True, timeout=240) == []
    try:
        yield ms
    finally:
        ms.stop()


def post(server, path: str, **kw) -> requests.Response:
    kw.setdefault("headers", server.headers())
    return requests.post(server.url("inference") + path, timeout=120, **kw)


def http_client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url("inference").removeprefix("http://"), network_timeout=120)


def grpc_client(server) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(f"127.0.0.1:{server.listen_ports()['grpc_inference'][1]}")


def grpc_headers(server) -> dict:
    return {"authorization": server.headers()["Authorization"]}


def close(a: dict, b: dict) -> bool:
    return list(a) == list(b) and np.allclose(list(a.values()), list(b.values()), atol=1e-4)


# -- the same answers as TorchServe -------------------------------------------------------------


def test_plain_predictions_equal_torchserves_bad_items_included(torchserve, engine, digit_files, bad_items):
    bodies = [f.read_bytes() for f in digit_files] + list(bad_items.values())
    for body in bodies:
        want = post(
            torchserve, "/predictions/digits", data=body, headers={**torchserve.headers(), "Content-Type": "image/png"}
        )
        got = post(engine, "/predictions/digits", data=body, headers={**engine.headers(), "Content-Type": "image/png"})
        assert got.status_code == want.status_code, (got.text, want.text)
        if want.status_code == 200:
            assert close(got.json(), want.json())
            assert len(got.json()) == 10  # version 1.0, the default, answers its top 10
        else:
            assert got.json() == want.json()  # the same error object: code, type and message
    assert {post(engine, "/predictions/digits", data=b).status_code for b in bad_items.values()} == {400, 413}


def same(got, want) -> bool:
    """Equal JSON answers, numbers within 1e-4."""
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want) and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(want, float):
        return isinstance(got, (int, float)) and abs(got - want) <= 1e-4
    return got == want


def test_every_task_answers_as_torchserve_bad_requests_included(torchserve, engine, runs, photos):  # noqa: F811
    picture = encode(photos["coffee"].resize((96, 64)), "PNG")
    asked = {
        "shapes_seg": [{"data": picture}, {"data": NOT_AN_IMAGE}],
        "embedder": [{"data": picture}, {"data": NOT_AN_IMAGE}],
        "digit_gan": [{"json": {"seed": 7, "n": 3}}, {"json": {"seed": 7, "n": MAX_N + 1}}, {"json": {"n": "x"}}],
    }
    assert set(asked) == set(runs)
    for name, requests_ in asked.items():
        for kw in requests_:
            want, got = post(torchserve, f"/predictions/{name}", **kw), post(engine, f"/predictions/{name}", **kw)
            assert got.status_code == want.status_code, (name, got.text, want.text)
            assert same(got.json(), want.json()), name
        assert {post(engine, f"/predictions/{name}", **kw).status_code for kw in requests_[1:]} <= {400, 413, 422}


def test_v1_instances_equal_torchserves_a_bad_image_among_good_ones(torchserve, engine, digit_files, bad_items):
    instances = [{"data": b64(f.read_bytes())} for f in digit_files[:3]] + [b64(bad_items["not_an_image"])]
    want = post(torchserve, "/v1/models/digits:predict", json={"instances": instances})
    got = post(engine, "/v1/models/digits:predict", json={"instances": instances})
    assert got.status_code == want.status_code == 200
    pairs = list(zip(got.json()["predictions"], want.json()["predictions"]))
    assert all(close(g, w) for g, w in pairs[:3])
    assert pairs[3][0] == pairs[3][1] and pairs[3][0]["code"] == 400 and pairs[3][0]["type"] == "InvalidImage"
    # Every image bad: the request's 4xx, as TorchServe answers it.
    only_bad = {"instances": [b64(NOT_AN_IMAGE)]}
    want, got = (
        post(torchserve, "/v1/models/digits:predict", json=only_bad),
        post(engine, "/v1/models/digits:predict", json=only_bad),
    )
    assert got.status_code == want.status_code == 400 and got.json() == want.json()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary_data"])
def test_v2_rest_through_tritonclient_equals_torchserve(torchserve, engine, digit_files, binary):
    images = [f.read_bytes() for f in digit_files] + [NOT_AN_IMAGE]
    inp = triton.InferInput("images", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images if binary else [b64(x) for x in images], dtype=object), binary_data=binary)
    client = http_client(engine)
    result = client.infer("digits", [inp], headers=engine.headers())
    labels, probs, errors = result.as_numpy("labels"), result.as_numpy("probabilities"), result.as_numpy("error")
    assert labels.shape == probs.shape == (len(images), 10) and probs.dtype == np.float32
    for row, image in enumerate(images[:-1]):
        want = post(
            torchserve, "/predictions/digits", data=image, headers={**torchserve.headers(), "Content-Type": "image/png"}
        ).json()
        assert [x.decode() for x in labels[row]] == list(want) and np.allclose(
            probs[row], list(want.values()), atol=1e-4
        )
        assert errors[row] == b""
    assert errors[-1].decode() == "image data is not an image format PIL can read"
    assert result.get_response()["model_version"] == "1.0"


def test_v2_grpc_through_tritonclient_answers_as_rest(engine, digit_files):
    images = [f.read_bytes() for f in digit_files[:3]] + [NOT_AN_IMAGE]
    client = grpc_client(engine)
    inp = triton_grpc.InferInput("images", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object))
    result = client.infer("digits", [inp], headers=grpc_headers(engine))
    rest = http_client(engine)
    rest_inp = triton.InferInput("images", [len(images)], "BYTES")
    rest_inp.set_data_from_numpy(np.array(images, dtype=object))
    want = rest.infer("digits", [rest_inp], headers=engine.headers())
    for name in ("labels", "error"):
        assert result.as_numpy(name).tolist() == want.as_numpy(name).tolist()
    assert np.allclose(result.as_numpy("probabilities"), want.as_numpy("probabilities"), atol=1e-6)
    # A request whose every image is bad: INVALID_ARGUMENT with the handler's message.
    bad = triton_grpc.InferInput("images", [1], "BYTES")
    bad.set_data_from_numpy(np.array([NOT_AN_IMAGE], dtype=object))
    with pytest.raises(InferenceServerException, match="not an image format") as e:
        client.infer("digits", [bad], headers=grpc_headers(engine))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


# -- health, metadata, versions ----------------------------------------------------------------


def test_health_readiness_and_metadata_answer_over_rest_and_grpc(engine):
    rest, grpc = http_client(engine), grpc_client(engine)
    h, g = engine.headers(), grpc_headers(engine)
    assert (
        rest.is_server_live(headers=h) and rest.is_server_ready(headers=h) and rest.is_model_ready("digits", headers=h)
    )
    assert (
        grpc.is_server_live(headers=g) and grpc.is_server_ready(headers=g) and grpc.is_model_ready("digits", headers=g)
    )
    assert not rest.is_model_ready("nothing", headers=h)
    meta = rest.get_model_metadata("digits", headers=h)
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["labels", "probabilities", "error"]
    assert grpc.get_model_metadata("digits", headers=g).inputs[0].datatype == "BYTES"
    versioned = rest.get_model_metadata("digits", "2.0", headers=h)
    assert versioned["versions"] == ["1.0", "2.0"] and rest.is_model_ready("digits", "2.0", headers=h)
    r = requests.get(engine.url() + "/v2/models/digits/versions/9.9", headers=h, timeout=10)
    assert r.status_code == 404 and "9.9" in r.json()["message"]


def test_versioned_inference_reaches_that_version_and_the_default_answers_unversioned(engine, digit_files):
    image = digit_files[0].read_bytes()
    inp = triton.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image], dtype=object))
    client = http_client(engine)
    two = client.infer("digits", [inp], model_version="2.0", headers=engine.headers())
    default = client.infer("digits", [inp], headers=engine.headers())
    assert two.as_numpy("labels").shape == (1, 3) and two.get_response()["model_version"] == "2.0"
    assert default.as_numpy("labels").shape == (1, 10) and default.get_response()["model_version"] == "1.0"
    g = grpc_client(engine)
    ginp = triton_grpc.InferInput("images", [1], "BYTES")
    ginp.set_data_from_numpy(np.array([image], dtype=object))
    assert g.infer("digits", [ginp], model_version="2.0", headers=grpc_headers(engine)).as_numpy("labels").shape == (
        1,
        3,
    )
    assert len(post(engine, "/predictions/digits/2.0", data=image).json()) == 3
    r = post(engine, "/v2/models/digits/versions/7.0/infer", json={"inputs": []})
    assert r.status_code == 404 and r.json()["type"] == "ModelVersionNotFoundException"
    assert post(engine, "/predictions/nothing", data=image).status_code == 404


# -- batching and metrics ----------------------------------------------------------------------


def scrape(server) -> dict[tuple, float]:
    """/metrics, which needs no token, as {(name, sorted labels): value}."""
    text = requests.get(server.url() + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_concurrent_requests_are_batched_per_version_and_a_bad_item_fails_only_itself(engine, digit_files):
    before = scrape(engine)
    sent = [("1.0", f.read_bytes()) for f in digit_files] + [("2.0", f.read_bytes()) for f in digit_files]
    sent += [("1.0", NOT_AN_IMAGE), ("2.0", NOT_AN_IMAGE)]

    def ask(pair):
        version, body = pair
        return post(
            engine,
            f"/predictions/digits/{version}",
            data=body,
            headers={**engine.headers(), "Content-Type": "image/png"},
        )

    with ThreadPoolExecutor(len(sent)) as pool:
        answers = list(pool.map(ask, sent))
    for (version, body), r in zip(sent, answers):
        if body == NOT_AN_IMAGE:
            assert r.status_code == 400 and r.json()["type"] == "InvalidImage"
        else:
            assert r.status_code == 200 and len(r.json()) == (10 if version == "1.0" else 3)  # never the other version
    after = scrape(engine)
    for version in ("1.0", "2.0"):

        def delta(name: str, version: str = version, **extra) -> float:
            labels = {"model_name": "digits", "model_version": version, **extra}
            return total(after, name, **labels) - total(before, name, **labels)

        assert delta("handler_items_answered_total") == len(digit_files)
        assert delta("handler_items_refused_total", code="400", error_type="InvalidImage") == 1
        batches, items = delta("handler_batch_size_count"), delta("handler_batch_size_sum")
        assert items == len(digit_files) + 1 and batches < items  # some requests shared a batch


def test_metrics_carry_torchserves_names_and_labels_for_the_rules(engine, digit_files):
    post(engine, "/predictions/digits", data=digit_files[0].read_bytes())
    samples = scrape(engine)
    names = {n for n, _ in samples}
    for name in (
        "handler_items_answered_total",
        "handler_batch_seconds_bucket",
        "handler_preprocess_seconds_bucket",
        "handler_worker_starts_total",
        "ts_inference_requests_total",
        "ts_queue_latency_microseconds",
    ):
        assert name in names, name
    # The archive's worker count: version 2.0 declares 2 workers, each a handler of its own.
    assert total(samples, "handler_worker_starts_total", model_name="digits", model_version="2.0") == 2
    assert total(samples, "handler_worker_starts_total", model_name="digits", model_version="1.0") == 1
    assert total(samples, "ts_inference_requests_total", model_name="digits", model_version="default") >= 1


# -- the rules of every server -----------------------------------------------------------------


def test_every_route_but_metrics_needs_the_token_over_rest_and_grpc(engine, digit_files):
    image = digit_files[0].read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for path in ("/predictions/digits", "/v1/models/digits:predict", "/v2/models/digits/infer"):
            r = post(engine, path, data=image, headers=headers)
            assert r.status_code == 401 and "Token" in r.json()["message"]
        assert requests.get(engine.url() + "/v2/health/ready", headers=headers, timeout=10).status_code == 401
    inp = triton_grpc.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image], dtype=object))
    with pytest.raises(InferenceServerException, match="Token") as e:
        grpc_client(engine).infer("digits", [inp])
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    assert requests.get(engine.url() + "/metrics", timeout=10).status_code == 200


def test_a_body_over_max_request_size_is_a_json_413(engine):
    limit = int(engine.props["max_request_size"])
    r = post(engine, "/v2/models/digits/infer", data=b"\0" * (limit + 1))
    assert r.status_code == 413 and r.json()["type"] == "RequestTooLarge" and f"{limit:,}" in r.json()["message"]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # gRPC's dual-stack socket: ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_listens_on_loopback_only_and_runs_no_java(engine):
    proc = psutil.Process(engine.pid())
    listening = [
        c.laddr for c in psutil.net_connections("inet") if c.pid == proc.pid and c.status == psutil.CONN_LISTEN
    ]
    ports = {port for _, port in engine.listen_ports().values()}
    assert {a.port for a in listening} == ports
    assert all(is_loopback(a.ip) for a in listening), listening
    assert all("java" not in p.name() for p in [proc, *proc.children(recursive=True)])


def test_management_commands_refuse_with_one_line(engine, capsys):
    base = ["--run-dir", str(engine.run_dir), "--model-store", str(engine.model_store)]
    assert engine_of(engine.run_dir) == "kserve"
    for argv in (["promote", "digits", "2.0"], ["scale", "digits", "1.0", "--min", "2", "--max", "2"]):
        assert models.main([*argv, *base]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "kserve engine" in err[0] and "scripts/serve" in err[0], err
    assert models.main(["status", "--json", *base]) == 0
    status = json.loads(capsys.readouterr().out)
    served = {(s["version"], s["default"], len(s["workers"])) for s in status["served"] if s["name"] == "digits"}
    assert served == {("1.0", True, 1), ("2.0", False, 2)}
    with pytest.raises(ServeError, match="restart"):
        engine.refresh_key("inference")


def test_cli_status_and_a_wrong_engine_name(engine, capsys):
    assert serve.main(["status", "--run-dir", str(engine.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "engine kserve" in out and "digits v1.0  (default)" in out and "digits v2.0" in out
    with pytest.raises(SystemExit) as e:
        serve.main(["start", "--engine", "triton", "--run-dir", str(engine.run_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine" in err[0] and "kserve" in err[0]


def test_a_restart_serves_the_record_again_and_checks_each_archive(engine, digit_files):
    """Runs last: stops the module's server and starts it again from its run folder alone."""
    assert engine.stop()
    assert not engine.is_running() and engine_of(engine.run_dir) == "torchserve"
    again = ModelServerEngine(run_dir=engine.run_dir, model_store=engine.model_store)
    assert again.start(timeout=240) == []  # no models named: what serving.json recorded
    assert {v["modelVersion"] for v in again.versions("digits")} == {"1.0", "2.0"}
    assert len(post(again, "/predictions/digits/2.0", data=digit_files[0].read_bytes()).json()) == 3
    again.stop()
    # An archive changed after it was catalogued is refused at the next start; the rest is served.
    changed = engine.model_store / "digits-2.0.mar"
    original = changed.read_bytes()
    try:
        changed.write_bytes(original + b"\0")
        third = ModelServerEngine(run_dir=engine.run_dir, model_store=engine.model_store)
        refused = third.start(timeout=240)
        assert len(refused) == 1 and "digits 2.0" in refused[0] and "sha256" in refused[0]
        assert {v["modelVersion"] for v in third.versions("digits")} == {"1.0"}
        third.stop()
    finally:
        changed.write_bytes(original)
