"""One prepared check of a lent GPU machine, in under 8 minutes, every figure in a record.

    scripts/gpu_check                 # every part
    scripts/gpu_check --parts tests,detector

Parts, each under its own time limit, each a record under benchmarks/results/:
- tests:    tests/test_gpu.py (GPU answers against the CPU's) → gpu_check_tests;
- serving:  scripts/bench_gpu for ResNet-18 and ResNet-50: bare rows at each batch, then our
            archive at the best one, served, and the stock handler, loaded by `hey` where it
            is installed → gpu_serving (the ONNX Runtime rows are in it where its CUDA
            provider is);
- detector: the detector (training.train_detection's default model) trained for one epoch
            on generated shapes under --amp bf16 and under --amp fp16 → gpu_check_detector
            (seconds, the epoch's loss, or the error's last line);
- onnx:     whether ONNX Runtime offers its CUDA provider here → gpu_check_onnx.
On a machine where torch sees no CUDA device each part says so in one line and the command
exits 0 having run nothing. It exits 1 when a part failed on a GPU, after running the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.record import write_record

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("tests", "serving", "detector", "onnx")
# Seconds per part, 7 minutes and a half in all: tests 120, serving 200, the detector's data 30
# and 45 per precision; the ONNX check is a lookup.
LIMITS_S = {"tests": 120, "serving": 200, "shapes": 30, "detector": 45}
SERVING_CONFIGS = "eager fp32,eager bf16,eager fp16 nvjpeg,onnx"


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run(cmd: list[str], limit: float, log: Path) -> tuple[int, float, str]:
    """(exit code, seconds, the output's last lines) of one command under `limit` seconds;
    124 when it ran out of time."""
    start = time.perf_counter()
    with open(log, "wb") as f:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = 124
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    return code, round(time.perf_counter() - start, 1), tail


def part_tests(work: Path) -> bool:
    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:randomly", "-n", "0", "-q", "tests/test_gpu.py"]
    code, seconds, tail = run([*cmd, f"--junitxml={junit}"], LIMITS_S["tests"], work / "tests.log")
    counts = {}
    if junit.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        if suite is not None:
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    print(f"gpu_check: tests/test_gpu.py exit {code} in {seconds} s: {counts}", flush=True)
    write_record("gpu_check_tests", {"exit": code, "seconds": seconds, **counts, "tail": tail})
    return code == 0


def part_serving(work: Path) -> bool:
    cmd = [sys.executable, "-m", "scripts.bench.gpu", "--models", "resnet18,resnet50", "--batches", "1,8,32,64"]
    cmd += ["--configs", SERVING_CONFIGS, "--duration", "1", "--served-workers", "1"]
    cmd += ["--out", str(work / "bench_gpu"), "--record", "gpu_serving"]
    code, seconds, tail = run(cmd, LIMITS_S["serving"], work / "serving.log")
    print(f"gpu_check: serving bench exit {code} in {seconds} s: {tail.splitlines()[-1] if tail else ''}", flush=True)
    if code != 0:
        write_record("gpu_serving_failed", {"exit": code, "seconds": seconds, "tail": tail})
    return code == 0


def part_detector(work: Path) -> bool:
    data = work / "shapes"
    code, _, tail = run(
        [sys.executable, "-m", "training.shapes", "--out", str(data), "--n", "160", "--size", "320", "--seed", "0"],
        LIMITS_S["shapes"],
        work / "shapes.log",
    )
    if code != 0:
        print(f"gpu_check: detector: the shapes data could not be written: {tail}", flush=True)
        return False
    results, ok = {}, True
    for amp in ("bf16", "fp16"):
        out = work / f"det_{amp}"
        cmd = [sys.executable, "-m", "training.train_detection", "--data", str(data), "--out", str(out)]
        cmd += ["--epochs", "1", "--amp", amp, "--device", "cuda", "--pictures", "0", "--no-progress", "--force"]
        code, seconds, tail = run(cmd, LIMITS_S["detector"], work / f"det_{amp}.log")
        meta = out / "model.json"
        metrics = json.loads(meta.read_text()).get("metrics", {}) if meta.is_file() else {}
        log = (work / f"det_{amp}.log").read_text(errors="replace").splitlines()
        epoch = next((ln.strip() for ln in reversed(log) if ln.startswith("epoch ")), None)
        results[amp] = {"exit": code, "seconds": seconds, "epoch": epoch, "metrics": metrics, "tail": tail}
        last = tail.splitlines()[-1] if tail else "no output"
        line = f"trained in {seconds} s: {epoch}" if code == 0 else f"FAILED (exit {code}): {last}"
        print(f"gpu_check: detector one epoch under {amp}: {line}", flush=True)
        ok = ok and code == 0
    write_record("gpu_check_detector", results)
    return ok


def part_onnx(work: Path) -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        print("gpu_check: onnx: skipped, onnxruntime is not installed", flush=True)
        return True
    providers = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in providers
    found = "CUDAExecutionProvider available (its rows are in gpu_serving)"
    print(f"gpu_check: onnx: {found if cuda else f'no CUDA provider: {providers}'}", flush=True)
    write_record("gpu_check_onnx", {"onnxruntime": ort.__version__, "providers": providers, "cuda": cuda})
    return True


RUNS = {"tests": part_tests, "serving": part_serving, "detector": part_detector, "onnx": part_onnx}
WHAT = {
    "tests": "tests/test_gpu.py",
    "serving": "serving bench (ResNet-18, ResNet-50: bare, served, stock)",
    "detector": "detector one epoch under bf16 and fp16",
    "onnx": "ONNX Runtime's CUDA provider",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated (default: {','.join(PARTS)})")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        print(f"error: --parts {','.join(unknown)!r}: choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    gpu = gpu_name()
    if gpu is None:
        import torch

        why = f"torch {torch.__version__} sees no CUDA device"
        for part in parts:
            print(f"gpu_check: {WHAT[part]}: skipped, {why}")
        return 0
    print(f"gpu_check: {gpu}", flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        for part in parts:
            if not RUNS[part](work):
                failed.append(part)
    print(f"gpu_check: {'failed: ' + ', '.join(failed) if failed else 'every part ran'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
