"""Why the model said so: Integrated Gradients, or attention rollout for Vision Transformers,
for TorchServe's `/explanations` API.

TorchServe sends a request made to `/explanations/{model}[/{version}]` to the same worker
as a prediction, with the request header `explain: True`; the base handler
(handlers/vision.py) reads that header per request, so explanations and predictions that
share a batch each get their own kind of answer. Each image is explained on its own,
with Captum's IntegratedGradients (imported here only when a request asks, so workers that
never explain do not load it), on the very tensor the prediction is made from: the same
decode and `eval_transform` the handler and training's validation use.

Attention rollout (Abnar & Zuidema, 2020) is the second method, for classifiers built of
attention layers (vit_small, vit_b_16): each layer's attention, averaged over its heads,
with the identity added for the residual path and rows renormalized, is multiplied through
the layers; the class token's row is then the share of the image each patch passes to the
prediction. It needs one forward pass, no gradients and no captum, and it does not depend
on the class: `target` only names the class the answer reports.

Settings, from the archive's model-config handler section (`--handler-option`):

    explain_method      integrated_gradients (default) or attention_rollout (a Vision
                        Transformer classifier only: refused at archive time otherwise)
    explain_steps       n_steps when the request names none (default 32)
    explain_max_steps   the most a request may ask for (default 128): a request over it is a 400
    explain_baseline    the image IG starts from: mean (default; the normalization mean,
                        all zeros after normalizing), black, white, or blur (the image
                        blurred, sigma = a tenth of its side)
    explain_memory_mb   memory for one internal batch of IG steps (default: 512 on the CPU,
                        half the free memory on a GPU)

A request may name `target` (a class name), `method` (either method, overriding the
archive's) and `n_steps` (Integrated Gradients only), as fields of a JSON body next to
"data" or as multipart form fields. (TorchServe 0.12 does not pass URL query parameters of
/predictions and /explanations on to the handler: its frontend parses those routes without
the query string.) An unknown class name is a 400 naming it.

Explanations always run the eager PyTorch model (model.pt, which every archive carries):
gradients need it, and an archive served with an optimized runtime (torchscript, onnx,
int8, compile) explains with those weights in float32.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2.functional import gaussian_blur

from handlers.options import EXPLAIN_MAX_STEPS, EXPLAIN_METHODS, EXPLAIN_STEPS, REFUSAL, OptionError
from handlers.requests import Request, RequestError
from model_defs.registry import DataConfig

logger = logging.getLogger(__name__)

OPTIONS = ("target", "n_steps", "method")
IG, ROLLOUT = EXPLAIN_METHODS
GRID = 8  # the answer's grid of floats is at most GRID x GRID cells


def explain_requests(context, n: int) -> list[int]:
    """Indices of the batch's requests that came to /explanations (header explain: True)."""
    return [i for i in range(n) if context.get_request_header(i, "explain") == "True"]


@dataclass(frozen=True)
class ExplainConfig:
    steps: int = EXPLAIN_STEPS
    max_steps: int = EXPLAIN_MAX_STEPS
    baseline: str = "mean"
    memory_mb: float | None = None  # None: sized from the device
    method: str = IG

    @classmethod
    def from_handler_config(cls, cfg: dict) -> ExplainConfig:
        """The archive's settings (checked by handlers/options.py when the worker loads)."""
        memory = cfg.get("explain_memory_mb")
        return cls(
            int(cfg.get("explain_steps", cls.steps)),
            int(cfg.get("explain_max_steps", cls.max_steps)),
            str(cfg.get("explain_baseline", cls.baseline)),
            None if memory is None else float(memory),
            str(cfg.get("explain_method", cls.method)),
        )


@dataclass(frozen=True)
class ExplainRequest:
    """What one /explanations request asks for (OPTIONS, checked)."""

    target: int | None  # the named class's index, or None: the top class
    steps: int
    method: str


def parse_options(request: Request, classes: list[str], cfg: ExplainConfig) -> ExplainRequest:
    """The target, n_steps and method of a request read with OPTIONS."""
    options = {
        k: v.decode(errors="replace") if isinstance(v, (bytes, bytearray)) else v for k, v in request.options.items()
    }
    target = None
    if options.get("target") is not None:
        name = str(options["target"])
        if name not in classes:
            shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
            raise RequestError(
                400, "UnknownClass", f"target class {name!r} is not one of the model's {len(classes)} classes: {shown}"
            )
        target = classes.index(name)
    steps = cfg.steps
    if options.get("n_steps") is not None:
        value = options["n_steps"]
        try:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            steps = int(float(value))
        except (TypeError, ValueError):
            raise RequestError(400, "InvalidOption", f"n_steps must be a whole number, got {value!r}") from None
        if not 1 <= steps <= cfg.max_steps:
            raise RequestError(
                400,
                "InvalidOption",
                f"n_steps must be from 1 to {cfg.max_steps} (explain_max_steps of this archive), got {steps}",
            )
    method = str(options.get("method") or cfg.method)
    if method not in EXPLAIN_METHODS:
        raise RequestError(
            400, "InvalidOption", f"method must be one of {', '.join(EXPLAIN_METHODS)}, got {options['method']!r}"
        )
    if method == ROLLOUT and options.get("n_steps") is not None:
        raise RequestError(400, "InvalidOption", f"n_steps applies to {IG} only, not to {ROLLOUT}")
    return ExplainRequest(target, steps, method)


def baseline_like(x: torch.Tensor, kind: str, data_config: DataConfig) -> torch.Tensor:
    """The starting image of the path, in the model's normalized space."""
    if kind == "mean":
        return torch.zeros_like(x)
    if kind == "blur":  # sigma of a tenth of the side: shapes and edges gone, colours kept
        sigma = max(x.shape[-2:]) / 10
        return gaussian_blur(x, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)
    pixel = 0.0 if kind == "black" else 1.0
    mean = torch.tensor(data_config.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(data_config.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return ((pixel - mean) / std).expand_as(x).contiguous()


def bytes_per_step(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Memory one IG step (one forward + backward of one image) takes, estimated as the
    activations every module outputs, kept for the backward pass, plus their gradients."""
    total = [x.numel() * x.element_size()]

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x[None])
    finally:
        for h in hooks:
            h.remove()
    return 2 * total[0]


def memory_budget(cfg: ExplainConfig, device: torch.device) -> float:
    if cfg.memory_mb is not None:
        return cfg.memory_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2
    return 512 * 2**20


class Explainer:
    """Integrated Gradients over the handler's eager model, for one image at a time."""

    def __init__(self, model: torch.nn.Module, data_config: DataConfig, handler_config: dict, device: torch.device):
        self.model = model
        self.data_config = data_config
        self.device = device
        self.cfg = ExplainConfig.from_handler_config(handler_config)
        for p in self.model.parameters():  # gradients are taken for the input only
            p.requires_grad_(False)
        self._step_bytes: dict[tuple, int] = {}

    def internal_batch_size(self, x: torch.Tensor, steps: int) -> int:
        key = tuple(x.shape)
        if key not in self._step_bytes:
            self._step_bytes[key] = bytes_per_step(self.model, x)
        return int(max(1, min(steps, memory_budget(self.cfg, self.device) // self._step_bytes[key])))

    def attribute(self, forward, x: torch.Tensor, target: int | None, steps: int) -> dict:
        """IG of `forward`'s output (at `target`, if it has classes) for one image `x` (C, H, W).

        Returns the attributions summed over channels (H, W) in the model's input space, the
        convergence delta, f(x) and f(baseline)."""
        from captum.attr import IntegratedGradients  # only explaining workers load captum

        x = x.to(self.device, torch.float32)
        baseline = baseline_like(x, self.cfg.baseline, self.data_config)
        batch = self.internal_batch_size(x, steps)
        start = time.perf_counter()
        with torch.enable_grad():
            attributions, delta = IntegratedGradients(forward).attribute(
                x[None],
                baselines=baseline[None],
                target=target,
                n_steps=steps,
                internal_batch_size=batch,
                return_convergence_delta=True,
            )
        with torch.no_grad():
            ends = forward(torch.stack([x, baseline]))
            ends = ends[:, target] if target is not None else ends
        logger.info(
            "integrated gradients: %d steps in internal batches of %d, %.2fs", steps, batch, time.perf_counter() - start
        )
        return {
            "map": attributions[0].sum(0).detach().double().cpu(),
            "delta": float(delta[0]),
            "output": float(ends[0]),
            "baseline_output": float(ends[1]),
        }


# -- attention rollout ---------------------------------------------------------------------


def attention_layers(model: torch.nn.Module) -> list[torch.nn.MultiheadAttention]:
    """The model's attention layers, in the order they run (empty for a convolutional model)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]


def rollout_refusal(model: torch.nn.Module, task: str, arch: str) -> str | None:
    """Why this model cannot be explained by attention rollout, or None when it can."""
    if task != "classification" or not attention_layers(model):
        return f"{ROLLOUT} explains Vision Transformer classifiers; this {arch} {task} model explains with {IG}"
    return None


def refuse_bad_method(model: torch.nn.Module, meta: dict, cfg: ExplainConfig, log) -> None:
    """In a worker: an archive whose explain_method its model cannot have refuses to load, with
    one log line (as handlers/options.py refuses a bad option)."""
    if cfg.method == ROLLOUT and (why := rollout_refusal(model, meta["task"], meta["arch"])):
        log.error("%s handler option explain_method: %s", REFUSAL, why)
        raise OptionError(f"handler option explain_method: {why}")


def attention_rollout(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(each patch's share of the class token's rolled-out attention as a (g, g) grid summing
    to 1, the logits, the number of layers) for one image `x` (C, H, W).

    The attention layers are asked for their per-head weights through hooks, so the model's
    own forward runs unchanged (its layers call attention with need_weights=False)."""
    layers, weights = attention_layers(model), []

    def ask_weights(_module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep_weights(_module, _args, output):
        weights.append(output[1])

    hooks = [m.register_forward_pre_hook(ask_weights, with_kwargs=True) for m in layers]
    hooks += [m.register_forward_hook(keep_weights) for m in layers]
    try:
        with torch.no_grad():
            logits = model(x[None])[0].float()
    finally:
        for h in hooks:
            h.remove()
    tokens = weights[0].shape[-1]
    rollout = torch.eye(tokens, dtype=torch.float64, device=weights[0].device)
    for w in weights:
        a = w[0].double().mean(0) + torch.eye(tokens, dtype=torch.float64, device=w.device)  # + the residual
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    shares = rollout[0, 1:]  # from the class token (first) to each patch
    side = int(round((tokens - 1) ** 0.5))
    if side * side != tokens - 1:
        raise RequestError(
            422, "Unprocessable", f"{ROLLOUT} needs a square grid of patches plus a class token, got {tokens} tokens"
        )
    return (shares / shares.sum()).reshape(side, side).cpu(), logits, len(weights)


def rollout_map(shares: torch.Tensor, input_size: int) -> torch.Tensor:
    """The (g, g) patch shares spread over the model's input pixels (input_size square), each
    pixel holding its patch's share per pixel, so the map still sums to 1."""
    per_pixel = shares / (input_size / shares.shape[0]) ** 2
    size = (input_size, input_size)
    return F.interpolate(per_pixel[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].double()


# -- the answer ---------------------------------------------------------------------------


def crop_box(size: tuple[int, int], cfg: DataConfig) -> tuple[float, float, float, float]:
    """The part of an image of `size` (height, width) that eval_transform keeps (resize the
    short side to resize_size, center-crop input_size), as x1, y1, x2, y2 in its pixels."""
    h, w = size
    short, long = min(h, w), max(h, w)
    new_long = int(cfg.resize_size * long / short)  # torchvision's rounding in Resize(int)
    rh, rw = (cfg.resize_size, new_long) if h <= w else (new_long, cfg.resize_size)
    top, left = int(round((rh - cfg.input_size) / 2.0)), int(round((rw - cfg.input_size) / 2.0))
    sy, sx = h / rh, w / rw
    return left * sx, top * sy, (left + cfg.input_size) * sx, (top + cfg.input_size) * sy


def to_image_size(attr: torch.Tensor, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """The model-space map (h, w) drawn over the image's own pixels: resized into `box`, zero
    outside it (pixels the model never saw)."""
    h, w = size
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, max(x2, x1 + 1)), min(h, max(y2, y1 + 1))
    full = np.zeros((h, w), dtype=np.float32)
    inside = F.interpolate(attr[None, None].float(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
    full[y1:y2, x1:x2] = inside[0, 0].numpy()
    return full


def grid_sums(attr: torch.Tensor, cells: int = GRID) -> list[list[float]]:
    """The map summed over a grid of at most cells x cells: each cell is the total attribution
    of its pixels, so the grid adds up to the attribution sum."""
    a = attr.numpy()
    rows = np.linspace(0, a.shape[0], min(cells, a.shape[0]) + 1).astype(int)[:-1]
    cols = np.linspace(0, a.shape[1], min(cells, a.shape[1]) + 1).astype(int)[:-1]
    sums = np.add.reduceat(np.add.reduceat(a, rows, axis=0), cols, axis=1)
    return [[round(float(v), 6) for v in row] for row in sums]


def heatmap_png(attr: np.ndarray) -> bytes:
    """A signed map as a palette PNG: red where attribution is positive, blue where negative,
    opacity growing with |attribution| (scaled to the map's largest), so it lays over the
    image. 255 levels, one byte a pixel: a few kB where RGBA floats would be megabytes."""
    from matplotlib import colormaps

    levels = np.linspace(-1, 1, 255)
    colours = (colormaps["bwr"]((levels + 1) / 2)[:, :3] * 255).round().astype(np.uint8)
    alpha = (np.abs(levels) ** 0.5 * 255).round().astype(np.uint8)  # square root: faint parts stay visible
    scale = float(np.abs(attr).max()) or 1.0
    index = np.round((np.clip(attr / scale, -1, 1) + 1) / 2 * 254).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(colours.flatten().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True, transparency=alpha.tobytes())
    return buf.getvalue()


def answer(
    result: dict,
    *,
    target: str,
    probability: float,
    steps: int,
    baseline: str,
    size: tuple[int, int],
    box: tuple[float, float, float, float],
) -> dict:
    attr = result["map"]
    return {
        "method": "integrated_gradients",
        "target": target,
        "probability": round(probability, 6),
        "n_steps": steps,
        "baseline": baseline,
        "convergence_delta": result["delta"],
        "attribution_sum": float(attr.sum()),
        "output": result["output"],  # f(input) and f(baseline): sum = output - baseline_output + delta
        "baseline_output": result["baseline_output"],
        "width": size[1],
        "height": size[0],
        "heatmap": base64.b64encode(heatmap_png(to_image_size(attr, size, box))).decode(),
        "grid": {"box": [round(v, 2) for v in box], "values": grid_sums(attr)},
    }


# -- per task ---------------------------------------------------------------------------


def explain_classification(handler, row) -> dict:
    """Top-1 (or the named class) of a classifier, on the tensor its prediction uses."""
    explainer = handler.explainer
    request = handler.parse(row, OPTIONS)
    asked = parse_options(request, handler.classes, explainer.cfg)
    if asked.method == ROLLOUT and (why := rollout_refusal(explainer.model, "classification", handler.meta["arch"])):
        raise RequestError(400, "MethodUnsupported", why)
    image = handler.read_image(request.image_bytes(handler.max_bytes), handler.data_config.channels)
    x = handler.transform(image)
    size = (image.shape[-2], image.shape[-1])
    box = crop_box(size, handler.data_config)
    if asked.method == ROLLOUT:
        shares, logits, layers = attention_rollout(explainer.model, x.to(handler.device).float())
    else:
        with torch.no_grad():
            logits = explainer.model(x[None].to(handler.device).float())[0].float()
    probs = torch.sigmoid(logits) if handler.multi_label else torch.softmax(logits, 0)
    target = int(logits.argmax()) if asked.target is None else asked.target
    if asked.method == ROLLOUT:
        attr = rollout_map(shares, handler.data_config.input_size)
        return {
            "method": ROLLOUT,
            "target": handler.classes[target],
            "probability": round(float(probs[target]), 6),
            "layers": layers,
            "patches": shares.shape[0],
            "width": size[1],
            "height": size[0],
            "heatmap": base64.b64encode(heatmap_png(to_image_size(attr, size, box))).decode(),
            "grid": {"box": [round(v, 2) for v in box], "values": grid_sums(attr)},
        }
    result = explainer.attribute(explainer.model, x, target, asked.steps)
    return answer(
        result,
        target=handler.classes[target],
        probability=float(probs[target]),
        steps=asked.steps,
        baseline=explainer.cfg.baseline,
        size=size,
        box=box,
    )


def explain_segmentation(handler, row) -> dict:
    """A class's mean logit over the pixels predicted as that class; the class is the one
    named in the request, or else the non-background class with the largest predicted area."""
    explainer = handler.explainer
    request = handler.parse(row, OPTIONS)
    asked = parse_options(request, handler.classes, explainer.cfg)
    if asked.method == ROLLOUT:
        why = f"{ROLLOUT} explains Vision Transformer classifiers; this segmentation model explains with {IG}"
        raise RequestError(400, "MethodUnsupported", why)
    target, steps = asked.target, asked.steps
    x, size = handler.prepare(request)
    with torch.no_grad():
        logits = explainer.model(x[None].to(handler.device).float())[0].float()
    predicted = logits.argmax(0)
    areas = torch.bincount(predicted.flatten(), minlength=len(handler.classes))
    if target is None:
        target = int(areas[1:].argmax()) + 1 if len(areas) > 1 and areas[1:].max() > 0 else 0
    if areas[target] == 0:
        present = ", ".join(handler.classes[i] for i in range(len(areas)) if areas[i] > 0)
        raise RequestError(
            422,
            "ClassNotPredicted",
            f"class {handler.classes[target]!r} is predicted nowhere in "
            f"this image, so it has no region to explain; predicted: {present}",
        )
    region = (predicted == target).float()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return (explainer.model(batch)[:, target] * region).sum((1, 2)) / region.sum()

    probability = float((torch.softmax(logits, 0)[target] * region).sum() / region.sum())
    result = explainer.attribute(forward, x, None, steps)
    h, w = size
    return answer(
        result,
        target=handler.classes[target],
        probability=probability,
        steps=steps,
        baseline=explainer.cfg.baseline,
        size=size,
        box=(0.0, 0.0, float(w), float(h)),
    )


def explain_rows(handler, rows: list) -> list:
    """One answer per /explanations request: its explanation, or the RequestError saying why not."""
    answers = []
    for row in rows:
        try:
            answers.append(handler.explain_one(row))
        except RequestError as e:
            answers.append(e)
        except Exception as e:  # noqa: BLE001 - one odd input must not fail its batch mates
            logger.exception("explanation failed")
            answers.append(RequestError(422, "Unprocessable", f"the image could not be explained: {e}"))
    return answers
