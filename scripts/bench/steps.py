"""What each in-process step gives, measured in one run: preprocessing and runtimes.

    scripts/bench_steps --run runs/digits_resnet18          # about 3 minutes

Where scripts/bench_serving measures the whole served path, this isolates the two steps that
happen inside a worker, on the same 451x300 JPEG:
- preprocessing: the stock handler's (PIL decode, PIL resize, float tensor), ours with
  PIL decode, and ours as served (torchvision.io decode, resize on uint8);
- runtimes: our handler's whole handle() at batch 1 and 2 with each runtime built by the
  archiver (eager without and with channels_last, torchscript, onnx, int8, and compile
  where a C++ compiler exists), with the archiver's accuracy check against eager;
- stages: where one request's time goes at one client behind TorchServe, from its own
  metrics and the handler's (scripts/bench/stages.py).
Each in-process measurement is repeated in interleaved rounds and the median kept, so a
noisy neighbour slows all of them alike; figures are ratios to the first row of each table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from handlers.runtimes import cpp_compiler
from scripts.bench.harness import cat_jpeg, request_context, unpack_handler
from scripts.ops.packaging import ArchiveError, build_archive
from scripts.ops.serve import ServeError

ROOT = Path(__file__).resolve().parents[2]


def per_call_ms(fn, seconds: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1000


def interleaved(candidates: dict, rounds: int, seconds: float) -> dict[str, float]:
    """Median ms per call of each candidate, measured round-robin."""
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name].append(per_call_ms(fn, seconds))
    return {name: statistics.median(t) for name, t in times.items()}


def preprocessing_steps(image: bytes, cfg, rounds: int) -> list[dict]:
    import torchvision.transforms as v1
    from PIL import Image

    from model_defs.preprocessing import eval_transform, load_image, load_image_tensor

    stock = v1.Compose(
        [v1.Resize(cfg.resize_size), v1.CenterCrop(cfg.input_size), v1.ToTensor(), v1.Normalize(cfg.mean, cfg.std)]
    )  # what TorchServe's image_classifier does
    ours = eval_transform(cfg)
    ms = interleaved(
        {
            "stock: PIL decode + PIL resize on float (torchvision v1)": lambda: stock(
                Image.open(io.BytesIO(image)).convert("RGB")
            ),
            "PIL decode + resize on uint8 (torchvision v2)": lambda: ours(load_image(image, cfg.channels)),
            "torchvision.io decode + resize on uint8 (served)": lambda: ours(load_image_tensor(image, cfg.channels)),
        },
        rounds,
        0.5,
    )
    base = next(iter(ms.values()))
    return [{"step": k, "ms": round(v, 3), "speedup": round(base / v, 2)} for k, v in ms.items()]


def runtime_steps(run: Path, image: bytes, work: Path, rounds: int, seconds: float) -> list[dict]:
    variants = {
        "eager, NCHW": ("eager", {"channels_last": False}),
        "eager, channels_last": ("eager", {}),
        "torchscript": ("torchscript", {}),
        "onnx": ("onnx", {}),
        "int8": ("int8", {}),
    }
    if cpp_compiler():
        variants["compile"] = ("compile", {})
    handlers, checks = {}, {}
    for i, (name, (runtime, handler_options)) in enumerate(variants.items()):
        print(f"  building {name}", flush=True)
        store = work / f"store{i}"
        entry = build_archive(
            run, "m", store, {"runtime": runtime, "batch_size": 2, "handler": handler_options}, force=True
        )
        checks[name] = entry.get("runtime")
        handlers[name], _ = unpack_handler(store / "m.mar", work / f"unpacked{i}", torch_threads=os.cpu_count())

    def call(handler, batch):
        rows, ctx = [{"body": image}] * batch, request_context(batch)
        return lambda: handler.handle(rows, ctx)

    out = []
    for batch in (1, 2):
        ms = interleaved({name: call(h, batch) for name, h in handlers.items()}, rounds, seconds)
        base = next(iter(ms.values()))
        for name, v in ms.items():
            check = checks[name] or {}
            out.append(
                {
                    "step": name,
                    "batch": batch,
                    "img_per_s": round(batch * 1000 / v, 1),
                    "speedup": round(base / v, 2),
                    "top1": check.get("top1"),
                    "eager_top1": check.get("eager_top1"),
                    "agreement": check.get("agreement"),
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/bench_steps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--run",
        default=str(ROOT / "runs" / "digits_resnet18"),
        help="trained classifier whose validation split checks each runtime (default: runs/digits_resnet18)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement (default: 5)")
    p.add_argument("--seconds", type=float, default=1.5, help="seconds per runtime per round (default: 1.5)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="where steps.json goes (default: runs/bench)")
    p.add_argument(
        "--stages-preset",
        default="latency",
        help="the preset of the archive whose request stages are measured behind TorchServe; none skips "
        "them (default: latency)",
    )
    p.add_argument(
        "--requests", type=int, default=200, help="requests, one after another, for the stages (default: 200)"
    )
    args = p.parse_args(argv)
    from scripts.ops.presets import PRESETS

    if args.stages_preset not in (*PRESETS, "none") or args.requests < 1:
        print(
            f"error: --stages-preset must be one of {', '.join(PRESETS)} or none, and --requests at least 1 "
            f"(got {args.stages_preset!r}, {args.requests})",
            file=sys.stderr,
        )
        return 2
    run = Path(args.run)
    if not (run / "model.json").is_file():
        print(f"error: {run} holds no trained model (model.json); train one or give --run", file=sys.stderr)
        return 2
    from model_defs.checkpoint import data_config_from_meta, read_meta

    image = cat_jpeg()
    print("preprocessing a 451x300 JPEG", flush=True)
    pre = preprocessing_steps(image, data_config_from_meta(read_meta(run)), args.rounds)
    print("runtimes (archives built and checked against eager first)", flush=True)
    stages = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runtimes = runtime_steps(run, image, Path(tmp), args.rounds, args.seconds)
            if args.stages_preset != "none":
                from scripts.bench.stages import stages as request_stages

                print(f"stages of one request behind TorchServe (preset {args.stages_preset})", flush=True)
                stages = request_stages(run, Path(tmp), args.stages_preset, args.requests)
    except ArchiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ServeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.json").write_text(
        json.dumps({"run": str(run), "preprocessing": pre, "runtimes": runtimes, "stages": stages}, indent=2) + "\n"
    )
    print(f"\n{'preprocessing':58} {'ms':>7} {'speedup':>8}")
    for r in pre:
        print(f"{r['step']:58} {r['ms']:7.2f} {r['speedup']:7.2f}x")
    print(
        f"\n{'runtime (handler, ' + str(os.cpu_count()) + ' threads)':24} {'batch':>5} {'img/s':>7} "
        f"{'speedup':>8} {'top-1':>7} {'eager':>7} {'agree':>7}"
    )
    for r in runtimes:
        acc = [f"{r[k]:7.2f}" if r[k] is not None else f"{'-':>7}" for k in ("top1", "eager_top1", "agreement")]
        print(f"{r['step']:24} {r['batch']:5} {r['img_per_s']:7.1f} {r['speedup']:7.2f}x {' '.join(acc)}")
    if stages:
        from scripts.bench.stages import print_stages

        print_stages(stages)
    print(f"wrote {out / 'steps.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
