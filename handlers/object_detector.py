"""Detection handler: per image a list of {"label", "score", "box": [x1, y1, x2, y2]}, best
first, boxes in the pixels of the image as sent (EXIF rotation applied).

model-config.yaml (`handler:` section) sets `score_threshold` (default 0.5) and
`max_detections` (default 100). A request may override both:
- JSON body: {"data": "<base64 image>", "score_threshold": 0.3, "max_detections": 5}
- multipart form fields of the same names: curl ... -F data=@img.jpg -F score_threshold=0.3
(URL query parameters are not read.)
An invalid value is a 400 for that request only, like an undecodable image.
"""

from __future__ import annotations

from pathlib import Path

from handlers.requests import Request, RequestError
from handlers.runtimes import DetectionRunner, load_detection_runtime
from handlers.vision import VisionHandler
from model_defs.detection import detect_answers
from model_defs.preprocessing import detection_input

OPTIONS = ("score_threshold", "max_detections")
MAX_DETECTIONS_LIMIT = 1000


def parse_option(name: str, value) -> float | int:
    """A request's option value (a JSON number, or text from a form field) checked for range."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode(errors="replace")
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(400, "InvalidOption", f"{name} must be a number, got {value!r}") from None
    if name == "score_threshold":
        if not 0.0 <= number <= 1.0:
            raise RequestError(400, "InvalidOption", f"score_threshold must be between 0 and 1, got {number:g}")
        return number
    if number != int(number) or not 0 <= number <= MAX_DETECTIONS_LIMIT:
        raise RequestError(
            400,
            "InvalidOption",
            f"max_detections must be a whole number from 0 to {MAX_DETECTIONS_LIMIT}, got {value!r}",
        )
    return int(number)


def checked_options(request: Request) -> dict:
    """The per-request options the request carries (as multipart fields or JSON fields), checked."""
    return {k: parse_option(k, v) for k, v in request.options.items()}


class ObjectDetector(VisionHandler):
    batched_images = False  # a list of images of their own sizes
    request_options = OPTIONS

    detect: DetectionRunner | None = None  # the archive's runtime (eager, torchscript or onnx)

    def initialize(self, context):
        super().initialize(context)
        model_dir = Path(context.system_properties["model_dir"])
        self.detect = load_detection_runtime(self.handler_config, model_dir, self.model, self.device)
        self.input_size = self.data_config.input_size
        self.defaults = {
            "score_threshold": parse_option("score_threshold", self.handler_config.get("score_threshold", 0.5)),
            "max_detections": parse_option("max_detections", self.handler_config.get("max_detections", 100)),
        }

    def prepare(self, request: Request) -> tuple:
        options = checked_options(request)
        image = self.read_image(request.image_bytes(self.max_bytes), 3)
        x, scale = detection_input(image, self.input_size)
        return x, scale, (image.shape[-1], image.shape[-2]), {**self.defaults, **options}

    def collate(self, items: list) -> list:
        """Images of different sizes stay a list: torchvision detectors batch them by padding."""
        return items

    def inference(self, items: list) -> list:
        """One forward pass per image size: torchvision pads a mixed batch to its largest
        image, which changes the features near the padding, so an image's answer would
        depend on its batch mates. Same-size images still share a pass."""
        if self.detect is None:
            raise RuntimeError(f"{type(self).__name__} detects only after initialize()")
        outputs: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (x, *_) in enumerate(items):
            groups.setdefault(tuple(x.shape), []).append(i)
        for indices in groups.values():
            for i, out in zip(indices, self.detect([items[i][0].to(self.device) for i in indices])):
                outputs[i] = out
        return list(zip(outputs, items))

    def postprocess(self, results: list) -> list[list[dict]]:
        return [
            detect_answers(out, scale, size, self.classes, opts["score_threshold"], opts["max_detections"])
            for out, (_, scale, size, opts) in results
        ]
