"""How a worker runs the model: eager PyTorch, or an optimized form chosen at archive time.

The archive's model-config.yaml names the runtime in its handler section
(`runtime: eager`, the default). Every runtime is a callable taking the float batch
(N, C, H, W) the handler preprocessed and returning the model's output tensor on the
handler's device, so preprocessing and postprocessing never depend on the runtime:

- eager:       the PyTorch module (`autocast: bf16|fp16` and `channels_last` apply here
               and to compile);
- torchscript: `model.ts`, traced and frozen at archive time;
- onnx:        `model.onnx`, run by ONNX Runtime (imported only by this runtime);
- int8:        `model_int8.ts`, post-training static quantization (x86), CPU only;
- compile:     the eager module through torch.compile, compiled when the worker starts.

Classifiers, segmenters and embedders take all five (`TASK_RUNTIMES`). A detector takes a
list of images of their own sizes and answers boxes, so its runtimes are its own
(`load_detection_runtime`): eager, torchscript (`torch.jit.script`, which torchvision's
R-CNN detectors support) and onnx (exported with dynamic height and width, one image a
run). torchvision ships no quantized detectors and FX quantization cannot trace their
data-dependent control flow, and torch.compile would recompile for every image size a
client sends, so a detector has neither int8 nor compile.

OpenVINO (fp32, and int8 through NNCF) was tried beside int8 and measured slower than it on
the 2-core host, so it is not a runtime here (docs/performance.md).

This module is only what a worker needs to load and run them; it ships inside every
archive. Building the files and checking them against eager is scripts/ops/optimize.py, at
archive time. Every runtime but eager is warmed up when it loads, at the batch sizes the
handler section lists (`warmup_batch_sizes`, the archiver writes 1 and batchSize), so
the first requests do not pay for compilation or first-call profiling.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from model_defs.checkpoint import data_config_from_meta, read_meta

logger = logging.getLogger(__name__)

RUNTIMES = ("eager", "torchscript", "onnx", "int8", "compile")
CPU_ONLY = ("int8",)
ARTIFACTS = {  # in the archive root
    "torchscript": "model.ts",
    "onnx": "model.onnx",
    "int8": "model_int8.ts",
}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPP_COMPILERS = ("cc", "gcc", "g++", "clang")  # torch.compile's inductor builds C++ kernels on the CPU

TASK_RUNTIMES = {  # the runtimes each task can be archived with
    "classification": RUNTIMES,
    "segmentation": RUNTIMES,
    "embedding": RUNTIMES,
    "detection": ("eager", "torchscript", "onnx"),
    "generation": ("eager",),
}

Runner = Callable[[torch.Tensor], torch.Tensor]  # what every runtime is: the float batch in, the output out
DetectionRunner = Callable[[list[torch.Tensor]], list[dict]]  # images of their own sizes in, boxes out


class RuntimeConfigError(ValueError):
    """The handler section names a runtime or option this bundle does not have."""


def check_task_runtime(kind: str, task: str) -> None:
    """Refuse, in one line, a runtime this task cannot be served with."""
    allowed = TASK_RUNTIMES.get(task, ("eager",))
    if kind not in allowed:
        raise RuntimeConfigError(
            f"runtime {kind} cannot hold a {task} model; a {task} model can have: {', '.join(allowed)}"
        )


def cpp_compiler() -> str | None:
    """The C/C++ compiler torch.compile can use on this machine, or None."""
    return next((path for name in CPP_COMPILERS if (path := shutil.which(name))), None)


def require_cpp_compiler() -> None:
    """Refuse runtime compile, in one line, on a machine with no C++ compiler."""
    if cpp_compiler() is None:
        raise RuntimeConfigError(
            f"runtime compile needs a C++ compiler for torch.compile on the CPU, "
            f"and none of {', '.join(CPP_COMPILERS)} is installed"
        )


class EagerRunner:
    """The PyTorch module itself, under inference_mode (and autocast / channels_last if set)."""

    def __init__(
        self, model: nn.Module, device: torch.device, *, channels_last: bool = True, autocast: str | None = None
    ):
        if autocast and autocast not in AUTOCAST_DTYPES:
            raise RuntimeConfigError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {autocast!r}")
        self.device = device
        self.channels_last = channels_last
        self.autocast = AUTOCAST_DTYPES.get(autocast) if autocast else None
        model = model.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: Runner = model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None),
        ):
            return self.model(batch)


class CompiledRunner(EagerRunner):
    """The eager runner with its module through torch.compile (inductor: C++ kernels on the CPU)."""

    def __init__(self, model: nn.Module, device: torch.device, **options):
        if device.type == "cpu":
            require_cpp_compiler()
        super().__init__(model, device, **options)
        self.model = torch.compile(self.model)


class TorchScriptRunner:
    """A traced, frozen TorchScript file: model.ts, or the quantized model_int8.ts (CPU only).

    The file is device-neutral; on the CPU the float model is rewritten here for oneDNN
    (torch.jit.optimize_for_inference: MKLDNN convolutions, ~10-15% faster on ResNet-18),
    which takes any input layout. The int8 model gains nothing from it and keeps its graph.
    """

    def __init__(self, path: Path, device: torch.device, *, int8: bool = False):
        self.device = device
        self.run_device = torch.device("cpu") if int8 else device
        if int8:  # quantized for the x86 backend's kernels (FBGEMM/oneDNN)
            if "x86" not in torch.backends.quantized.supported_engines:
                raise RuntimeConfigError("runtime int8 needs torch's x86 quantized engine, which this machine lacks")
            torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():  # torch 2.14 marks torch.jit deprecated; it still works
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            self.module = torch.jit.load(str(path), map_location=self.run_device).eval()
            if self.run_device.type == "cpu" and not int8:
                self.module = torch.jit.optimize_for_inference(self.module)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(batch.to(self.run_device)).to(self.device)


class OnnxRunner:
    """model.onnx in an ONNX Runtime session: CUDA when the handler's device is a GPU ORT can use."""

    def __init__(self, path: Path, device: torch.device):
        import onnxruntime as ort  # only ONNX archives need it installed

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the handler sized it: cores / workers
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads would otherwise spin, taking the cores torch needs to decode the next batch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[str | tuple[str, dict]] = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.device = device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0]).to(self.device)


def warm_up(runner, model_dir: Path, batch_sizes: list[int], device: torch.device) -> None:
    """Run each batch size once, so compilation and first-call profiling happen before any request."""
    cfg = data_config_from_meta(read_meta(model_dir))
    for n in batch_sizes:
        runner(torch.zeros(int(n), cfg.channels, cfg.input_size, cfg.input_size, device=device))


def load_runtime(handler_config: dict, model_dir: Path, model: nn.Module, device: torch.device) -> Runner:
    """The runner the archive's handler section asks for (`runtime`, default eager)."""
    kind = str(handler_config.get("runtime") or "eager")
    if kind not in RUNTIMES:
        raise RuntimeConfigError(f"unknown runtime {kind!r}; this bundle has: {', '.join(RUNTIMES)}")
    check_task_runtime(kind, read_meta(model_dir)["task"])
    channels_last = bool(handler_config.get("channels_last", device.type == "cpu"))
    autocast = handler_config.get("autocast")
    if kind == "eager":
        return EagerRunner(model, device, channels_last=channels_last, autocast=autocast)
    if kind == "compile":
        runner: Runner = CompiledRunner(model, device, channels_last=channels_last, autocast=autocast)
    else:
        if autocast:
            raise RuntimeConfigError(f"autocast applies to the eager and compile runtimes, not {kind}")
        path = Path(model_dir) / ARTIFACTS[kind]
        if not path.is_file():
            raise RuntimeConfigError(f"runtime {kind} needs {path.name} in the archive, and it is missing")
        runner = OnnxRunner(path, device) if kind == "onnx" else TorchScriptRunner(path, device, int8=kind == "int8")
    start = time.time()
    batch_sizes = handler_config.get("warmup_batch_sizes") or [1]
    warm_up(runner, model_dir, batch_sizes, device)
    logger.info(
        "runtime %s ready on %s, warmed up at batch sizes %s in %.1fs", kind, device, batch_sizes, time.time() - start
    )
    return runner


# -- detectors --------------------------------------------------------------------------------


class EagerDetector:
    """The torchvision detector itself: a list of (3, H, W) float images in, one dict each out."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model.to(device).eval()

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        with torch.inference_mode():
            return self.model(images)


class ScriptedDetector:
    """model.ts made by torch.jit.script; scripted torchvision detectors answer (losses, detections)."""

    def __init__(self, path: Path, device: torch.device):
        import torchvision  # noqa: F401 - registers the nms and roi_align ops the file calls

        self.device = device
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            self.module = torch.jit.load(str(path), map_location=device).eval()

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*RCNN always returns a \(Losses, Detections\) tuple")
            _, detections = self.module([x.to(self.device) for x in images])
        return detections


class OnnxDetector(OnnxRunner):
    """model.onnx exported from one image with dynamic height and width: one run per image."""

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:  # type: ignore[override]
        names = [output.name for output in self.session.get_outputs()]  # boxes, labels, scores
        answers = []
        for x in images:
            arrays = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})
            answers.append({name: torch.from_numpy(a).to(self.device) for name, a in zip(names, arrays)})
        return answers


def load_detection_runtime(
    handler_config: dict, model_dir: Path, model: nn.Module, device: torch.device
) -> DetectionRunner:
    """The detector runner the archive's handler section asks for (`runtime`, default eager)."""
    kind = str(handler_config.get("runtime") or "eager")
    check_task_runtime(kind, "detection")
    if kind == "eager":
        return EagerDetector(model, device)
    if handler_config.get("autocast"):
        raise RuntimeConfigError(f"autocast applies to the eager and compile runtimes, not {kind}")
    path = Path(model_dir) / ARTIFACTS[kind]
    if not path.is_file():
        raise RuntimeConfigError(f"runtime {kind} needs {path.name} in the archive, and it is missing")
    runner: DetectionRunner = OnnxDetector(path, device) if kind == "onnx" else ScriptedDetector(path, device)
    start = time.time()
    size = data_config_from_meta(read_meta(model_dir)).input_size
    runner([torch.zeros(3, size, size, device=device)])  # first-call profiling before any request
    logger.info("runtime %s ready on %s for detection, warmed up in %.1fs", kind, device, time.time() - start)
    return runner
