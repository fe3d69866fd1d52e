"""The one request parser every handler reads its requests with (handlers/requests.py).

In-process: each body form a client can send gives the same image bytes, a task's options
come from multipart fields or JSON fields, and each kind of bad body is the 4xx the
handlers answer with. The serving tests (test_hardening, test_mistakes, test_task_serving)
send the same bodies through a real TorchServe.
"""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pytest

from handlers.generator import ImageGenerator
from handlers.requests import RequestError, parse_request

pytestmark = pytest.mark.unit

IMAGE = b"\x89PNG\r\n\x1a\n not decoded here"
B64 = base64.b64encode(IMAGE).decode()
OPTIONS = ("score_threshold", "target")


@pytest.mark.parametrize(
    "row",
    [
        {"body": IMAGE},
        {"data": bytearray(IMAGE)},
        {"file": IMAGE},  # a multipart file field of another name
        {"body": {"data": B64}},  # a JSON body TorchServe already parsed
        {"body": json.dumps({"data": B64}).encode()},
        {"body": B64},  # a text/* body holding base64
    ],
    ids=["raw", "data", "multipart", "json_parsed", "json_bytes", "text_base64"],
)
def test_every_body_form_gives_the_image_bytes(row):
    assert parse_request(row).image_bytes() == IMAGE


def test_options_come_from_multipart_fields_and_json_fields():
    # A multipart option field listed before the file is not taken for the image.
    request = parse_request({"score_threshold": b"0.3", "file": IMAGE}, OPTIONS)
    assert request.options == {"score_threshold": b"0.3"}
    assert (request.field, request.image_bytes()) == ("file", IMAGE)
    body = json.dumps({"data": B64, "target": "cat", "other": 1}).encode()
    request = parse_request({"body": body}, OPTIONS)
    assert request.options == {"target": "cat"} and request.image_bytes() == IMAGE
    assert parse_request({"body": body}).options == {}  # a task reads only the options it names


@pytest.mark.parametrize(
    "row,code,type_,words",
    [
        ({}, 400, "EmptyBody", "request has no body"),
        ({"body": b""}, 400, "EmptyBody", "request body has 0 bytes"),
        ({"file": bytearray()}, 400, "EmptyBody", 'multipart field "file" has 0 bytes'),
        ({"body": b"{not json"}, 400, "InvalidJSON", "not valid JSON"),
        ({"body": b'{"image": "x"}'}, 400, "InvalidJSON", 'no "data" field'),
        ({"body": b'{"data": 7}'}, 400, "InvalidJSON", "must be a base64 string"),
        ({"body": {"data": "not base64!"}}, 400, "InvalidBase64", "not valid base64"),
        ({"body": "hello, server"}, 400, "InvalidImage", "text, not an image"),
        ("not a row", 400, "InvalidRequest", "carries no fields"),
        ({"body": IMAGE * 10}, 413, "PayloadTooLarge", "max_bytes=100"),
    ],
)
def test_bad_bodies_are_a_4xx_naming_the_problem(row, code, type_, words):
    with pytest.raises(RequestError) as excinfo:
        parse_request(row).image_bytes(max_bytes=100)
    assert (excinfo.value.code, excinfo.value.type) == (code, type_)
    assert words in excinfo.value.message


def test_a_json_task_reads_any_body_as_a_json_object():
    expect = ImageGenerator.request_json
    assert parse_request({"body": b'{"seed": 7, "n": 2}'}, expect=expect).payload == {"seed": 7, "n": 2}
    assert parse_request({"body": {"seed": 7}}, expect=expect).payload == {"seed": 7}
    for row, type_, words in (
        ({"body": b"seed=7"}, "InvalidJSON", "body is not JSON; send " + expect),
        ({"body": b"[7]"}, "InvalidRequest", "expected a JSON object " + expect),
        ({}, "InvalidRequest", "expected a JSON object"),
    ):
        with pytest.raises(RequestError) as excinfo:
            parse_request(row, expect=expect)
        assert (excinfo.value.code, excinfo.value.type) == (400, type_) and words in excinfo.value.message


def test_the_parser_and_explanations_sit_below_the_vision_base():
    """handlers/vision.py imports explain.py and requests.py; neither imports it back, at the
    top or inside a function (a cycle hidden in a function still ties the modules together)."""
    root = Path(__file__).resolve().parents[1] / "handlers"
    for name in ("requests.py", "explain.py"):
        tree = ast.parse((root / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "handlers.vision" not in imported, f"handlers/{name} imports handlers.vision"
