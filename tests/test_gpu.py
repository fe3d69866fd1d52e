"""GPU workers: the handler's answers on a GPU equal its CPU answers, within stated tolerances.

Where torch sees a CUDA device, the handler paths the CPU tests cover run again on `cuda:0`
(fp32, bf16/fp16 autocast, nvJPEG decode, ONNX Runtime's CUDA provider, a GPU archive behind
a real TorchServe) and are compared with the same handler on the CPU. Where none is visible
they are skipped with that reason, and the tests named `faked_cuda` check, on the CPU, that
the GPU paths are chosen and configured: there `torch.cuda.is_available` (and ONNX Runtime's
provider list) is faked, and nothing else.

Tolerances, on class probabilities against the CPU in fp32:
- fp32 on the GPU: 2e-3 (cuDNN's own convolution algorithms, with TF32 as torch allows by default);
- bf16 / fp16 autocast: 3e-2, and the same top-1 on at least 95% of the images;
- nvJPEG decode vs libjpeg on the CPU: pixels within 2 levels on average (their IDCT and chroma
  upsampling differ), probabilities within 3e-2.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import requests
import torch
import yaml

from handlers import runtimes, vision
from model_defs import get_model
from model_defs.checkpoint import save_model_files
from model_defs.registry import IMAGENET
from scripts.cli import archive
from scripts.ops.serve import TorchServe
from tests.conftest import encode
from tests.test_handler import make_context, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch on this machine")
FP32_ATOL, HALF_ATOL, DECODE_ATOL = 2e-3, 3e-2, 3e-2


def handler_on(model_dir, gpu: int | None, handler_options: dict | None = None):
    from handlers.image_classifier import ImageClassifier

    config = {"handler": {"topk": 10, **(handler_options or {})}}
    handler = ImageClassifier()
    ctx = make_context(model_dir, 1, config)
    ctx.system_properties["gpu_id"] = gpu
    handler.initialize(ctx)
    return handler, config


def answers(handler, model_dir, rows, config) -> list[dict]:
    out, codes = run(handler, model_dir, rows, config)
    assert codes == [200] * len(rows), out
    return out


def assert_close(a: list[dict], b: list[dict], atol: float, top1_share: float = 1.0) -> None:
    same_top1 = sum(next(iter(x)) == next(iter(y)) for x, y in zip(a, b)) / len(a)
    assert same_top1 >= top1_share, (same_top1, a[:2], b[:2])
    worst = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x.keys() & y.keys())
    assert worst <= atol, f"largest probability difference {worst:.2e} over the tolerance {atol:.0e}"


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory):
    """ResNet-18 with random weights at 224 px (ImageNet preprocessing): real JPEGs reach nvJPEG."""
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("gpu_resnet")
    classes = ["cat", "astronaut", "coffee", "camera"]
    save_model_files(
        model_dir,
        get_model("resnet18", num_classes=4),
        {
            "arch": "resnet18",
            "arch_args": {"num_classes": 4},
            "task": "classification",
            "classes": classes,
            "preprocessing": IMAGENET.to_dict(),
            "multi_label": False,
        },
    )
    return model_dir


@pytest.fixture(scope="module")
def digit_rows(digits_dir):
    return [{"body": f.read_bytes()} for f in sorted((digits_dir / "test").rglob("*.png"))[::6]]


@pytest.fixture(scope="module")
def jpeg_rows(photos):
    return [{"body": encode(p.convert("RGB"), "JPEG", quality=q)} for p in photos.values() for q in (75, 95)]


# -- on a GPU ---------------------------------------------------------------------------------


@needs_cuda
def test_gpu_fp32_answers_equal_cpu_answers(digits_model_dir, digit_rows):
    cpu, config = handler_on(digits_model_dir, None)
    gpu, _ = handler_on(digits_model_dir, 0)
    assert gpu.device == torch.device("cuda", 0) and next(gpu.model.parameters()).is_cuda
    assert_close(
        answers(gpu, digits_model_dir, digit_rows, config),
        answers(cpu, digits_model_dir, digit_rows, config),
        FP32_ATOL,
    )


@needs_cuda
@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_gpu_autocast_answers_stay_close_to_cpu_fp32(autocast, photo_model, jpeg_rows, digits_model_dir, digit_rows):
    for model_dir, rows in ((digits_model_dir, digit_rows), (photo_model, jpeg_rows)):
        cpu, config = handler_on(model_dir, None)
        gpu, _ = handler_on(model_dir, 0, {"autocast": autocast})
        assert gpu.runner.autocast == runtimes.AUTOCAST_DTYPES[autocast]
        assert_close(
            answers(gpu, model_dir, rows, config), answers(cpu, model_dir, rows, config), HALF_ATOL, top1_share=0.95
        )


@needs_cuda
def test_nvjpeg_decode_matches_cpu_decode(photo_model, jpeg_rows):
    from model_defs.preprocessing import load_image_tensor

    for row in jpeg_rows:
        on_gpu = load_image_tensor(row["body"], 3, device="cuda")
        on_cpu = load_image_tensor(row["body"], 3)
        assert on_gpu.is_cuda and on_gpu.shape == on_cpu.shape and on_gpu.dtype == torch.uint8
        assert (on_gpu.cpu().float() - on_cpu.float()).abs().mean() <= 2.0
    cpu, config = handler_on(photo_model, None)
    gpu, _ = handler_on(photo_model, 0, {"gpu_decode": True})
    assert gpu.decode_device == torch.device("cuda", 0)
    assert_close(
        answers(gpu, photo_model, jpeg_rows, config), answers(cpu, photo_model, jpeg_rows, config), DECODE_ATOL
    )


@needs_cuda
def test_batch_crosses_to_the_gpu_in_one_pinned_copy(photo_model, jpeg_rows, monkeypatch):
    gpu, _ = handler_on(photo_model, 0)
    pinned = []
    original = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.shape) or original(self, *a))
    batch, errors = gpu.preprocess(jpeg_rows)
    assert not errors and batch.is_cuda and pinned == [batch.shape]


@needs_cuda
@pytest.mark.skipif(
    not HAS_CUDA or "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="this onnxruntime has no CUDAExecutionProvider (GPU hosts install onnxruntime-gpu)",
)
def test_onnx_runtime_cuda_provider_answers_like_eager(digits_run, digits_dir, tmp_path, digit_rows):
    store = tmp_path / "store"
    assert (
        archive.main(
            [
                str(digits_run),
                "--name",
                "digits",
                "--model-store",
                str(store),
                "--runtime",
                "onnx",
                "--device",
                "gpu",
                "--topk",
                "10",
            ]
        )
        == 0
    )
    model_dir = tmp_path / "unpacked"
    with zipfile.ZipFile(store / "digits.mar") as z:
        z.extractall(model_dir)
    onnx, config = handler_on(model_dir, 0, {"runtime": "onnx"})
    assert onnx.runner.session.get_providers()[0] == "CUDAExecutionProvider"
    eager, _ = handler_on(model_dir, None)
    assert_close(answers(onnx, model_dir, digit_rows, config), answers(eager, model_dir, digit_rows, config), FP32_ATOL)


@needs_cuda
def test_torchserve_gpu_worker_answers_like_the_cpu(digits_run, digits_model_dir, digit_rows, tmp_path):
    store = tmp_path / "store"
    assert (
        archive.main(
            [
                str(digits_run),
                "--name",
                "digits",
                "--model-store",
                str(store),
                "--device",
                "gpu",
                "--batch-size",
                "4",
                "--topk",
                "10",
            ]
        )
        == 0
    )
    config = yaml.safe_load(zipfile.ZipFile(store / "digits.mar").read("model-config.yaml"))
    assert config["deviceType"] == "gpu"
    cpu, handler_config = handler_on(digits_model_dir, None)
    expected = answers(cpu, digits_model_dir, digit_rows, handler_config)
    ts = TorchServe(run_dir=tmp_path / "serve", model_store=store, ports={})
    try:
        ts.start(["digits"], timeout=300)
        served = [
            requests.post(
                f"{ts.url('inference')}/predictions/digits",
                data=row["body"],
                headers=ts.headers("inference"),
                timeout=60,
            )
            for row in digit_rows
        ]
        log = ts.log_tail("model_log.log", 400)
    finally:
        ts.stop()
    assert all(r.status_code == 200 for r in served), [r.text for r in served if r.status_code != 200][:1]
    assert "on cuda:0" in log, log[-2000:]
    assert_close([r.json() for r in served], expected, FP32_ATOL)


# -- on a CPU machine: the GPU paths chosen and configured, with CUDA faked ---------------------


def test_batched_decode_answers_like_one_at_a_time_with_bad_items_in_place(photo_model, photos):
    """The gpu_decode path (one batched decode_jpeg call, images of one size resized together),
    run here with libjpeg on the CPU: the same tensors as the per-item path, and each bad
    item gets its own 4xx in its place. A PNG and an EXIF-rotated JPEG take the PIL path."""
    from PIL import Image

    rotated = photos["chelsea"].convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    rows = [
        {"body": encode(photos["chelsea"].convert("RGB"), "JPEG", quality=90)},
        {"body": b"\xff\xd8\xff\xe0 not really a jpeg"},
        {"body": encode(photos["astronaut"].convert("RGB"), "JPEG", quality=80)},
        {"body": encode(photos["coffee"], "PNG")},
        {"body": b""},
        {"body": encode(rotated, "JPEG", exif=exif.tobytes())},
        {"body": encode(photos["chelsea"].convert("RGB"), "JPEG", quality=70)},
    ]
    handler, config = handler_on(photo_model, None)
    one_by_one, errors_one = handler.preprocess(rows)
    handler.batch_decode = True  # what gpu_decode on a GPU turns on; decode_device stays the CPU here
    batched, errors_batched = handler.preprocess(rows)
    assert sorted(errors_batched) == sorted(errors_one) == [1, 4]
    assert [errors_batched[i].body() for i in (1, 4)] == [errors_one[i].body() for i in (1, 4)]
    assert batched.shape == one_by_one.shape == (5, 3, 224, 224)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    answers_batched, codes = run(handler, photo_model, rows, config)
    assert codes == [200, 400, 200, 200, 400, 200, 200]


def test_worker_device_follows_gpu_id_with_faked_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vision.worker_device(None) == torch.device("cpu")
    assert vision.worker_device(1) == torch.device("cuda", 1)
    assert vision.worker_device("0") == torch.device("cuda", 0)


def test_worker_device_without_cuda_falls_back_to_cpu_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vision.worker_device(0) == torch.device("cpu")
    assert "sees no CUDA device" in caplog.text


def test_onnx_runner_asks_for_the_cuda_provider_first_with_faked_cuda(digits_run, tmp_path, monkeypatch):
    """ONNX Runtime's CUDA provider is asked for, on the worker's GPU, when the installed
    onnxruntime has it; the session is recorded instead of created (no GPU here)."""
    import onnxruntime as ort

    store = tmp_path / "store"
    assert (
        archive.main(
            [
                str(digits_run),
                "--name",
                "digits",
                "--model-store",
                str(store),
                "--runtime",
                "onnx",
                "--device",
                "gpu",
            ]
        )
        == 0
    )
    with zipfile.ZipFile(store / "digits.mar") as z:
        z.extract("model.onnx", tmp_path)
    seen = {}

    class Session:
        def __init__(self, path, options, providers):
            seen["providers"] = providers

        def get_inputs(self):
            return [type("Input", (), {"name": "input"})()]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    runtimes.OnnxRunner(tmp_path / "model.onnx", torch.device("cuda", 1))
    assert seen["providers"] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    runtimes.OnnxRunner(tmp_path / "model.onnx", torch.device("cpu"))
    assert seen["providers"] == ["CPUExecutionProvider"]


def test_gpu_archive_config_and_refusals(digits_run, tmp_path, capsys):
    store = tmp_path / "store"
    assert (
        archive.main(
            [
                str(digits_run),
                "--name",
                "digits",
                "--model-store",
                str(store),
                "--device",
                "gpu",
                "--handler-option",
                "autocast=fp16",
                "--handler-option",
                "gpu_decode=true",
            ]
        )
        == 0
    )
    config = yaml.safe_load(zipfile.ZipFile(store / "digits.mar").read("model-config.yaml"))
    assert config["deviceType"] == "gpu"
    assert config["handler"]["autocast"] == "fp16" and config["handler"]["gpu_decode"] in (True, "true")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("module", ["scripts.bench.gpu", "scripts.bench.serving"])
def test_gpu_bench_without_a_gpu_is_one_line_naming_what_is_missing(module):
    args = ["--device", "gpu", "--no-stock", "--no-detector"] if module == "scripts.bench.serving" else []
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode in (1, 2), r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "sees no CUDA device" in lines[0] and "torch" in lines[0]
