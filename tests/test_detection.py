"""Detection preprocessing and answers: boxes go back to the original image's pixels for
images of several sizes and aspect ratios; thresholds, limits and labels; request options."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from handlers.object_detector import OPTIONS, checked_options, parse_option
from handlers.requests import RequestError, parse_request
from model_defs.detection import detect_answers
from model_defs.preprocessing import boxes_to_original, detection_input, detection_size

pytestmark = pytest.mark.unit

SIZES = [(640, 480), (300, 451), (1000, 250), (97, 203), (64, 64), (320, 320), (2000, 1500)]
MAX_SIZE = 320


def painted(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    return image


def extent(x: torch.Tensor) -> torch.Tensor:
    """[x1, y1, x2, y2] of the bright pixels of a resized image (the model's frame)."""
    ys, xs = torch.nonzero(x.mean(0) > 0.5, as_tuple=True)
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_box_found_in_the_model_frame_maps_back_to_the_original(size):
    w, h = size
    box = (round(w * 0.2), round(h * 0.55), round(w * 0.7), round(h * 0.9))
    x, scale = detection_input(painted(size, box), MAX_SIZE)
    assert max(x.shape[1:]) == MAX_SIZE and (x.shape[2], x.shape[1]) == detection_size(w, h, MAX_SIZE)
    assert abs(x.shape[2] / x.shape[1] - w / h) < 2 / min(x.shape[1:]) * (w / h) + 1e-6  # aspect kept
    back = boxes_to_original(extent(x), scale, size)[0]
    tolerance = 1.0 + 1.0 / min(scale)  # one pixel of the model frame, in original pixels
    assert torch.allclose(back, torch.tensor(box, dtype=torch.float32), atol=tolerance), (back, box)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_detect_answers_maps_clips_and_labels(size):
    w, h = size
    x, scale = detection_input(Image.new("RGB", size), MAX_SIZE)
    fw, fh = x.shape[2], x.shape[1]
    output = {  # boxes in the model's frame, as a torchvision detector returns them
        "boxes": torch.tensor([[0.0, 0.0, fw / 2, fh / 2], [fw / 4, fh / 4, fw + 5.0, fh + 5.0], [1.0, 1.0, 2.0, 2.0]]),
        "scores": torch.tensor([0.6, 0.9, 0.2]),
        "labels": torch.tensor([1, 3, 2]),
    }
    answers = detect_answers(output, scale, size, ["rectangle", "ellipse", "triangle"], 0.5, 10)
    assert [a["label"] for a in answers] == ["triangle", "rectangle"]  # best first, below 0.5 dropped
    assert answers[0]["score"] == pytest.approx(0.9)
    tol = 0.01 + 0.5 / min(scale)
    assert answers[0]["box"][2:] == [w, h]  # clipped to the original image
    assert answers[0]["box"][0] == pytest.approx(w / 4, abs=tol) and answers[0]["box"][1] == pytest.approx(
        h / 4, abs=tol
    )
    assert answers[1]["box"] == pytest.approx([0, 0, w / 2, h / 2], abs=tol)
    assert len(detect_answers(output, scale, size, ["a", "b", "c"], 0.0, 1)) == 1
    assert detect_answers(output, scale, size, ["a", "b", "c"], 0.95, 10) == []


def test_request_options_from_json_and_multipart_fields():
    body = json.dumps({"data": "aGVsbG8=", "score_threshold": 0.3, "max_detections": 5}).encode()
    request = parse_request({"body": body}, OPTIONS)
    assert checked_options(request) == {"score_threshold": 0.3, "max_detections": 5}
    assert request.image_bytes() == b"hello"
    request = parse_request({"file": b"\x89PNG...", "score_threshold": b"0.25", "max_detections": "7"}, OPTIONS)
    assert checked_options(request) == {"score_threshold": 0.25, "max_detections": 7}
    assert (request.field, request.image_bytes()) == ("file", b"\x89PNG...")
    request = parse_request({"body": b"\xff\xd8jpeg"}, OPTIONS)
    assert checked_options(request) == {} and request.image_bytes() == b"\xff\xd8jpeg"


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("score_threshold", b"high", "score_threshold must be a number, got 'high'"),
        ("score_threshold", 1.5, "score_threshold must be between 0 and 1, got 1.5"),
        ("max_detections", "2.5", "max_detections must be a whole number"),
        ("max_detections", -1, "max_detections must be a whole number"),
        ("max_detections", True, "max_detections must be a number"),
    ],
)
def test_bad_request_options_are_a_400(name, value, message):
    with pytest.raises(RequestError) as excinfo:
        parse_option(name, value)
    assert excinfo.value.code == 400 and message in excinfo.value.message
