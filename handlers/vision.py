"""The shared vision base under every handler this bundle ships.

What the stock TorchServe handlers do not do, and this base does:
- rebuild the model through the registry from the archive's `model.json` and load a
  plain state_dict with `weights_only=True` (no pickled code runs in a worker);
- read every request, whatever the task, with one parser (`parse_request`, handlers/requests.py):
  the body (raw bytes, a multipart file, JSON) and the task's options, as multipart or JSON fields;
- preprocess with the very functions training validated with (`model_defs.preprocessing`);
- answer each request of a batch on its own: a bad item gets a 4xx JSON body that names
  the problem, while the other items of the same batch are predicted as usual;
- size torch's thread pool so that workers x threads fit the machine's cores.

Task handlers subclass this and override `postprocess` (and `prepare`, `collate` and
`inference` where their input or model differ).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from handlers import kserve_protocol
from handlers.explain import explain_requests, explain_rows
from handlers.metrics import HandlerMetrics
from handlers.options import refuse_bad_config
from handlers.requests import Request, RequestError, form_encoded_error, image_error, parse_request
from handlers.runtimes import Runner, load_runtime
from model_defs.checkpoint import data_config_from_meta, load_trained
from model_defs.preprocessing import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    eval_transform,
    load_image_tensor,
    load_image_tensors,
)

logger = logging.getLogger(__name__)

# TorchServe's own default max_request_size; config.properties lets the frontend take more,
# so a body between the two gets this handler's JSON 413 instead of the frontend's bare one.
DEFAULT_MAX_BYTES = 6_553_500


def worker_device(gpu_id) -> torch.device:
    """The worker's device: the GPU TorchServe assigned it (`gpu_id`), else the CPU.

    TorchServe gives a GPU worker its gpu_id round-robin over the GPUs it found; a GPU archive
    served where torch sees none runs on the CPU, and says so once in the model log."""
    if gpu_id is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        logger.warning(
            "TorchServe assigned GPU %s but torch %s sees no CUDA device: running on the CPU", gpu_id, torch.__version__
        )
        return torch.device("cpu")
    return torch.device("cuda", int(gpu_id))


# TorchServe's worker logs "Backend received inference at: <time>" to stdout for every batch,
# and its frontend reads each such line back only for the bundle's log config to drop it.
# Dropped in the worker, before it is formatted (docs/performance.md: the fixed cost).
PER_BATCH_LINE = "Backend received inference at: %d"


def drop_per_batch_line(record: logging.LogRecord) -> bool:
    return record.msg != PER_BATCH_LINE


class VisionHandler(BaseHandler):
    """Loads a bundle checkpoint and answers image requests one item at a time on errors."""

    batched_images = True  # inference takes one (N, C, H, W) batch
    decode_device: torch.device | str = "cpu"  # the GPU with the handler option gpu_decode
    batch_decode = False  # a batch's images decoded and resized together (gpu_decode)
    max_pixels = DEFAULT_MAX_PIXELS  # the archive's handler options max_pixels and max_bytes override these
    max_bytes = DEFAULT_MAX_BYTES
    request_options: tuple[str, ...] = ()  # the per-request options a task reads (parse_request)
    request_json: str | None = None  # for a task whose request is a JSON object, not an image: what it holds
    metrics: HandlerMetrics | None = None  # set by initialize

    def initialize(self, context):
        self.context = context
        self.manifest = context.manifest
        root = logging.getLogger()
        if drop_per_batch_line not in root.filters:
            root.addFilter(drop_per_batch_line)
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.config = dict(context.model_yaml_config or {})
        refuse_bad_config(self.config, logger)
        self.handler_config = dict(self.config.get("handler") or {})
        self.max_pixels = int(self.handler_config.get("max_pixels") or DEFAULT_MAX_PIXELS)
        self.max_bytes = int(self.handler_config.get("max_bytes") or DEFAULT_MAX_BYTES)
        # PIL imports its rarer format plugins on the first bytes its common ones cannot
        # identify (about 0.1 s): import them here, not in a client's first unusual image.
        Image.init()

        self.device = worker_device(props.get("gpu_id"))
        self.map_location = str(self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads_per_worker())

        self.model, self.meta = load_trained(model_dir, map_location=self.device)
        # Serving never needs the parameters' gradients (explanations take the input's), and
        # freezing them before the runtime is built keeps torch.compile's guards unchanged.
        self.model.to(self.device).requires_grad_(False)
        # handler option gpu_decode: JPEGs decoded by nvJPEG on the worker's GPU.
        self.decode_device = (
            self.device if self.handler_config.get("gpu_decode") and self.device.type == "cuda" else "cpu"
        )
        # Tasks that read plain images (not the segmenter, detector or generator) batch their decode.
        self.batch_decode = self.decode_device != "cpu" and type(self).prepare is VisionHandler.prepare
        if self.handler_config.get("gpu_decode") and self.device.type != "cuda":
            logger.warning("handler option gpu_decode is set but this worker runs on the CPU: decoding on the CPU")
        # Tasks whose model takes a plain image batch run it through the archive's runtime;
        # the detector (a list of images) and the generator (latent vectors) call the model.
        self.runner: Runner | None = (
            load_runtime(self.handler_config, model_dir, self.model, self.device) if self.batched_images else None
        )
        self.classes = list(self.meta["classes"])
        self.data_config = data_config_from_meta(self.meta)
        self.transform = eval_transform(self.data_config)
        self.metrics = HandlerMetrics(context, self.handler_config)
        self.initialized = True
        logger.info(
            "loaded %s (%s) on %s with %d torch thread(s)",
            self.meta["arch"],
            self.meta["task"],
            self.device,
            torch.get_num_threads(),
        )

    def threads_per_worker(self) -> int:
        """Torch threads for this worker: the configured number, else cores / workers."""
        if self.handler_config.get("torch_threads"):
            return max(1, int(self.handler_config["torch_threads"]))
        workers = max(1, int(self.config.get("minWorkers") or 1))
        return max(1, (os.cpu_count() or 1) // workers)

    # -- the three steps -------------------------------------------------------------

    def read_image(self, data: bytes, channels: int) -> torch.Tensor:
        """Decode one request's image to uint8 (C, H, W) within the archive's pixel limit."""
        try:
            return load_image_tensor(
                data,
                channels,
                max_pixels=self.max_pixels,
                device=self.decode_device,
                on_fallback=self.metrics.decode_fallback if self.metrics else None,
            )
        except ImageDecodeError as e:
            raise image_error(e) from None

    def parse(self, row: object, options: tuple[str, ...] | None = None) -> Request:
        """The request read by the one parser, with this task's options (or the `options` given)."""
        return parse_request(row, self.request_options if options is None else options, self.request_json)

    def preprocess_one(self, row: object) -> Any:
        return self.prepare(self.parse(row))

    def prepare(self, request: Request) -> Any:
        """One request's model input; each task's is its own (here: the image, transformed)."""
        return self.transform(self.read_image(request.image_bytes(self.max_bytes), self.data_config.channels))

    def preprocess(self, data: list) -> tuple[Any, dict[int, RequestError]]:
        """Read each item; returns the collated good items and the errors of the bad ones."""
        if self.batch_decode:
            try:
                return self.preprocess_batch(data)
            except Exception:  # noqa: BLE001 - e.g. out of GPU memory: each item on its own instead
                logger.exception("batched decode failed; preprocessing the batch's items one by one")
        items: list = []
        errors: dict[int, RequestError] = {}
        for idx, row in enumerate(data):
            try:
                items.append(self.preprocess_one(row))
            except RequestError as e:
                errors[idx] = e
            except Exception as e:  # noqa: BLE001 - one odd input must not fail its batch mates
                logger.exception("request %d of batch could not be preprocessed", idx)
                errors[idx] = RequestError(422, "Unprocessable", f"request could not be preprocessed: {e}")
        return (self.collate(items) if items else None), errors

    def preprocess_batch(self, data: list) -> tuple[torch.Tensor | None, dict[int, RequestError]]:
        """preprocess with gpu_decode: the batch's JPEGs decoded in one nvJPEG call, and images
        of one size resized and normalized together, where one at a time the per-image
        kernel launches would bound the worker (docs/performance-gpu.md)."""
        errors, payloads = {}, {}
        for idx, row in enumerate(data):
            try:
                payloads[idx] = self.parse(row).image_bytes(self.max_bytes)
            except RequestError as e:
                errors[idx] = e
        images = load_image_tensors(
            list(payloads.values()),
            self.data_config.channels,
            self.max_pixels,
            self.decode_device,
            on_fallback=self.metrics.decode_fallback if self.metrics else None,
        )
        by_size: dict[tuple, list[int]] = {}
        decoded = {}
        for idx, image in zip(payloads, images):
            if isinstance(image, ImageDecodeError):
                errors[idx] = image_error(image)
            else:
                decoded[idx] = image.to(self.device)  # an image only PIL could decode crosses here
                by_size.setdefault(tuple(image.shape), []).append(idx)
        ready: dict[int, torch.Tensor] = {}
        for idxs in by_size.values():
            ready.update(zip(idxs, self.transform(torch.stack([decoded[i] for i in idxs]))))
        return (torch.stack([ready[i] for i in sorted(ready)]) if ready else None), errors

    def collate(self, items: list) -> Any:
        """The good items as one model input; tasks whose items differ in shape override it.

        On a GPU the batch crosses to the device in one pinned, non-blocking copy, not one
        copy per image (items already decoded on the GPU stay there)."""
        if all(x.device == self.device for x in items):
            return torch.stack(items)
        batch = torch.stack([x.cpu() for x in items])
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def inference(self, batch: Any) -> Any:
        return self.run(batch)

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """The archive's runtime on a batch of images (the tasks whose batched_images is true)."""
        if self.runner is None:
            raise RuntimeError(f"{type(self).__name__} has no runtime: it does not batch images")
        return self.runner(batch)

    def postprocess(self, output: Any) -> list:
        raise NotImplementedError

    def explain_one(self, row) -> dict:
        """The answer to one /explanations request; tasks that explain override this."""
        raise RequestError(
            400,
            "ExplanationsUnsupported",
            f"this {self.meta['task']} model does not answer /explanations; use /predictions",
        )

    def recorder(self) -> HandlerMetrics:
        """The worker's metrics (set by initialize)."""
        if self.metrics is None:
            raise RuntimeError(f"{type(self).__name__} handles requests only after initialize()")
        return self.metrics

    def predict(self, data: list) -> list:
        """preprocess → inference → postprocess, each timed: one answer, or a RequestError, per item."""
        metrics = self.recorder()
        with metrics.step("preprocess"):
            batch, errors = self.preprocess(data)
        with metrics.step("inference"):
            output = self.inference(batch) if batch is not None else None
        with metrics.step("postprocess"):
            results = iter(self.postprocess(output) if batch is not None else [])
        return [errors[idx] if idx in errors else next(results) for idx in range(len(data))]

    def handle(self, data, context):
        """Predictions and explanations (handlers/explain.py), with a per-item answer for bad items."""
        if kserve_protocol.is_kserve(data):  # KServe v1/v2 bodies: each of their images is one item here
            return kserve_protocol.handle(self, data, context)
        self.context = context
        metrics = self.recorder()
        metrics.begin(context, len(data))
        try:
            explain = explain_requests(context, len(data))
            predict = [i for i in range(len(data)) if i not in explain]
            results = dict(zip(predict, self.predict([data[i] for i in predict]) if predict else []))
            results.update(zip(explain, explain_rows(self, [data[i] for i in explain])))
        except Exception as e:
            metrics.failed(e)  # TorchServe answers every item of the batch with a 5xx
            raise
        answers, errors = [], {}
        for idx in range(len(data)):
            result = form_encoded_error(context, idx, results[idx])
            if isinstance(result, RequestError):
                logger.info("request %d of batch refused: %s", idx, result.message)
                context.set_response_status(result.code, result.message, idx)
                errors[idx] = result
                result = result.body()
            answers.append(result)
        metrics.end(errors)
        return answers
