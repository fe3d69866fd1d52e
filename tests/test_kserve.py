"""KServe's v1 and v2 protocols: the handler's envelope in-process (behind each of TorchServe's
envelopes, `kserve` and `kservev2`, which the bundle turns into pass-throughs), then one real
TorchServe started from the layout scripts/kserve writes, asked through plain JSON (v1) and the
real v2 client, `tritonclient.http` (JSON and binary data)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException
from ts.torch_handler.request_envelope import kserve as ts_kserve
from ts.torch_handler.request_envelope import kservev2 as ts_kservev2

from handlers import kserve_protocol as kserve
from scripts.cli import archive
from scripts.cli import kserve as kserve_layout
from scripts.ops.serve import TorchServe
from tests.conftest import classify_in_process
from tests.test_handler import load_handler, make_context

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

NOT_AN_IMAGE = b"this is not an image"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def digit_files(digits_dir):
    return sorted((digits_dir / "test").rglob("*.png"))[::40][:6]


def expected(run_dir, data: bytes, k: int):
    probs = classify_in_process(run_dir, data)
    top = probs.topk(k)
    return [str(i) for i in top.indices.tolist()], top.values.tolist()


# -- in-process: the envelope around the real handler --------------------------------------


@pytest.fixture(scope="module")
def handler(trained_digits):
    return load_handler(trained_digits, {"handler": {"topk": 3}})


def run(handler, model_dir, rows):
    ctx = make_context(model_dir, len(rows))
    answers = handler.handle(rows, ctx)
    return answers, [ctx.get_response_status(i)[0] for i in range(len(rows))]


def v2_body(images: list[str], id_=None) -> dict:
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)], "data": images}]}
    return {**body, "id": id_} if id_ else body


def test_batch_of_v1_v2_and_plain_requests_each_answered(handler, trained_digits, digit_files):
    data = [f.read_bytes() for f in digit_files]
    rows = [
        {"body": {"instances": [{"data": b64(data[0])}, b64(data[1])]}},  # v1, two images
        {"body": json.dumps(v2_body([b64(data[2]), b64(NOT_AN_IMAGE), b64(data[3])], "r1")).encode()},  # v2 as bytes
        {"body": data[4]},  # a plain request in the same batch
        {"body": {"instances": [b64(NOT_AN_IMAGE)]}},  # v1, its only image bad
        {"body": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}},  # no images
    ]
    answers, codes = run(handler, trained_digits, rows)
    assert codes == [200, 200, 200, 400, 400]
    v1 = answers[0]["predictions"]
    for answer, image in zip(v1, data[:2]):
        labels, probs = expected(trained_digits, image, 3)
        assert list(answer) == labels and np.allclose(list(answer.values()), probs, atol=1e-5)
    v2 = answers[1]
    assert v2["id"] == "r1" and v2["model_name"] == "test"
    out = {o["name"]: o for o in v2["outputs"]}
    assert out["labels"]["shape"] == [3, 3] and out["probabilities"]["datatype"] == "FP32"
    labels = np.array(out["labels"]["data"]).reshape(3, 3)
    probs = np.array(out["probabilities"]["data"]).reshape(3, 3)
    for row, image in ((0, data[2]), (2, data[3])):
        want_labels, want_probs = expected(trained_digits, image, 3)
        assert list(labels[row]) == want_labels and np.allclose(probs[row], want_probs, atol=1e-5)
    assert out["error"]["data"][0] == out["error"]["data"][2] == ""
    assert out["error"]["data"][1]  # the bad image's own message; its neighbours were predicted
    assert list(answers[2]) == expected(trained_digits, data[4], 3)[0]
    assert "error" in answers[3] and answers[3]["code"] == 400
    assert "no BYTES input" in answers[4]["error"]


def triton_result(ctx, answer) -> triton.InferResult:
    """The answer as tritonclient reads an HTTP response: JSON, or a JSON header + binary data."""
    if isinstance(answer, dict):
        return triton.InferResult.from_response_body(json.dumps(answer).encode())
    header = ctx.get_response_headers(0)
    assert header["content-type"] == "application/octet-stream"
    return triton.InferResult.from_response_body(answer, header_length=int(header["Inference-Header-Content-Length"]))


@pytest.mark.parametrize(
    "outputs, binary",
    [
        (None, {"labels", "probabilities", "error"}),  # tritonclient's default: every output binary
        ([("labels", False), ("probabilities", True)], {"probabilities"}),
        ([("labels", False), ("error", False)], set()),
    ],
    ids=["default", "mixed", "json"],
)
def test_triton_binary_body_is_read_and_answered_as_asked(handler, trained_digits, digit_files, outputs, binary):
    """The body tritonclient sends by default (JSON header, then length-prefixed bytes), and the
    outputs it asks for, each in JSON or binary data, read back by tritonclient itself."""
    data = [f.read_bytes() for f in digit_files[:2]] + [NOT_AN_IMAGE]
    inp = triton.InferInput("images", [3], "BYTES")
    inp.set_data_from_numpy(np.array(data, dtype=object), binary_data=True)
    asked = outputs and [triton.InferRequestedOutput(name, binary_data=b) for name, b in outputs]
    body, json_size = triton.InferenceServerClient.generate_request_body([inp], outputs=asked)
    assert json_size is not None and json_size < len(body)
    ctx = make_context(trained_digits, 1)
    (answer,) = handler.handle([{"body": body}], ctx)
    assert ctx.get_response_status(0)[0] == 200
    result = triton_result(ctx, answer)
    names = [name for name, _ in outputs] if outputs else ["labels", "probabilities", "error"]
    assert [o["name"] for o in result.get_response()["outputs"]] == names
    for o in result.get_response()["outputs"]:
        assert ("binary_data_size" in o.get("parameters", {})) == (o["name"] in binary)
    labels = result.as_numpy("labels")
    as_str = [x.decode() if isinstance(x, bytes) else x for x in labels[1]]  # binary: bytes, JSON: str
    assert labels.shape == (3, 3) and as_str == expected(trained_digits, data[1], 3)[0]
    if "probabilities" in names:
        probs = result.as_numpy("probabilities")
        assert probs.dtype == np.float32 and np.allclose(probs[0], expected(trained_digits, data[0], 3)[1], atol=1e-5)
    if "error" in names:
        assert [bool(e) for e in result.as_numpy("error")] == [False, False, True]


def test_v2_unknown_output_is_a_400(handler, trained_digits, digit_files):
    body = {**v2_body([b64(digit_files[0].read_bytes())]), "outputs": [{"name": "logits"}]}
    answers, codes = run(handler, trained_digits, [{"body": body}])
    assert codes == [400] and "no output named 'logits'" in answers[0]["error"]


@pytest.mark.parametrize("envelope", [ts_kserve.KServeEnvelope, ts_kservev2.KServev2Envelope], ids=["v1", "v2"])
def test_torchserve_envelopes_pass_every_request_through(handler, trained_digits, digit_files, envelope):
    """A worker started with `service_envelope=kserve|kservev2` wraps the handler in that
    envelope (ts.model_loader); importing handlers.kserve_protocol makes both hand the whole batch to
    the handler unchanged, so v1, v2 and plain requests are answered the same either way."""
    data = [f.read_bytes() for f in digit_files[:3]]
    rows = [
        {"body": {"instances": [b64(data[0]), b64(NOT_AN_IMAGE)]}},
        {"body": v2_body([b64(data[1])], "r2")},
        {"body": data[2]},
    ]
    wrapped, wrapped_codes = run(envelope(handler.handle), trained_digits, rows)
    direct, direct_codes = run(handler, trained_digits, rows)
    assert wrapped == direct and wrapped_codes == direct_codes == [200, 200, 200]
    assert len(wrapped[0]["predictions"]) == 2 and wrapped[1]["id"] == "r2"  # each protocol's own answer


def test_plain_requests_do_not_go_through_the_envelope(digit_files):
    assert not kserve.is_kserve([{"body": digit_files[0].read_bytes()}, {"body": b'{"data": "AAAA"}'}])
    assert kserve.parse({"body": b'{"instances": []}'})[0] == "v1"


# -- a real TorchServe as KServe starts it ------------------------------------------------------


@pytest.fixture(scope="module")
def store(trained_digits, tmp_path_factory):
    store = tmp_path_factory.mktemp("kserve_store")
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
                "3",
            ]
        )
        == 0
    )
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """TorchServe as KServe starts it: from the layout scripts/kserve writes (model_snapshot,
    service_envelope=kservev2, token authorization off), on free loopback ports here. It
    answers v1 requests too: the envelope is a pass-through (handlers/kserve_protocol.py) and the
    frontend routes /v1/models/{name}:predict whatever the envelope; that TorchServe's `kserve`
    (v1) envelope passes requests through as well is checked in-process above."""
    layout = tmp_path_factory.mktemp("layout") / "kserve"
    assert kserve_layout.main(["digits:1.0", "--out", str(layout), "--model-store", str(store)]) == 0
    ts = TorchServe(
        run_dir=tmp_path_factory.mktemp("serve_kservev2"),
        model_store=layout / "model-store",
        config=layout / "config" / "config.properties",
        ports={},
    )
    assert ts.props["service_envelope"] == "kservev2" and ts.headers() == {}
    ts.start([], timeout=240)  # the snapshot registers the model, not scripts/serve
    try:
        ts.wait_ready(["digits"], timeout=240)
        yield ts
    finally:
        ts.stop()


def test_v1_served_concurrently_equals_in_process(server, trained_digits, digit_files):
    url = f"{server.url('inference')}/v1/models/digits:predict"

    def ask(f):
        body = {"instances": [{"data": b64(f.read_bytes())}, {"data": b64(NOT_AN_IMAGE)}]}
        return requests.post(url, json=body, headers=server.headers(), timeout=60)

    with ThreadPoolExecutor(6) as pool:  # concurrent, so TorchServe puts them in one batch
        answers = list(pool.map(ask, digit_files))
    for f, r in zip(digit_files, answers):
        assert r.status_code == 200, r.text
        good, bad = r.json()["predictions"]
        labels, probs = expected(trained_digits, f.read_bytes(), 3)
        assert list(good) == labels and np.allclose(list(good.values()), probs, atol=1e-4)
        assert bad["code"] == 400 and bad["type"] == "InvalidImage"
    r = requests.post(url, json={"instances": [b64(NOT_AN_IMAGE)]}, headers=server.headers(), timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    # The bundle's plain endpoint still answers on the same server.
    r = requests.post(
        f"{server.url('inference')}/predictions/digits",
        data=digit_files[0].read_bytes(),
        headers=server.headers(),
        timeout=60,
    )
    assert r.status_code == 200 and list(r.json()) == expected(trained_digits, digit_files[0].read_bytes(), 3)[0]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary_data"])
def test_v2_through_tritonclient_equals_in_process(server, trained_digits, digit_files, binary):
    host = server.url("inference").removeprefix("http://")
    images = [f.read_bytes() for f in digit_files]

    def ask(pair):
        client = triton.InferenceServerClient(host, network_timeout=60)
        batch = [pair[0], NOT_AN_IMAGE, pair[1]]
        inp = triton.InferInput("images", [len(batch)], "BYTES")
        payload = batch if binary else [b64(x) for x in batch]
        inp.set_data_from_numpy(np.array(payload, dtype=object), binary_data=binary)
        try:
            return client.infer("digits", [inp], headers=server.headers())
        finally:
            client.close()

    pairs = list(zip(images[::2], images[1::2]))
    with ThreadPoolExecutor(len(pairs)) as pool:
        results = list(pool.map(ask, pairs))
    for (a, b), result in zip(pairs, results):
        labels, probs, errors = result.as_numpy("labels"), result.as_numpy("probabilities"), result.as_numpy("error")
        assert labels.shape == probs.shape == (3, 3) and probs.dtype == np.float32 and errors.shape == (3,)
        for row, image in ((0, a), (2, b)):
            want_labels, want_probs = expected(trained_digits, image, 3)
            assert [x.decode() if isinstance(x, bytes) else x for x in labels[row]] == want_labels
            assert np.allclose(probs[row], want_probs, atol=1e-4)
        assert errors[1] and not errors[0] and not errors[2]
        # No outputs named: tritonclient asked for all of them in binary data, and got them so.
        assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_v2_request_without_good_image_is_a_4xx(server):
    client = triton.InferenceServerClient(server.url("inference").removeprefix("http://"))
    inp = triton.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([NOT_AN_IMAGE], dtype=object))
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [inp], headers=server.headers())
    assert e.value.status() == "400" or "400" in str(e.value)
