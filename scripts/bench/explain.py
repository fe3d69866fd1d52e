"""What an explanation costs: Integrated Gradients time per image against a prediction.

    scripts/bench_explain                                  # small_cnn and resnet18, about 3 minutes
    scripts/bench_explain --models resnet18 --steps 16 32 64

IG runs `n_steps` forward and backward passes of the model, so an explanation costs about
that many predictions, or more. This measures it: for each model (random weights: speed
does not depend on them), the archive's own handler in-process, on the same 451x300 JPEG,
answers a prediction and explanations at each `--steps`, in interleaved rounds (medians);
the figures are ms per image and the ratio to the prediction. The internal batch size
the handler chose (steps per forward pass, sized to `explain_memory_mb`) is reported too.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
from pathlib import Path

from scripts.bench.harness import cat_jpeg, random_weights_run, request_context, unpack_handler
from scripts.bench.steps import interleaved
from scripts.ops.packaging import build_archive

ROOT = Path(__file__).resolve().parents[2]


def explain_context():
    """A one-request TorchServe context as /explanations gives the worker (header explain: True)."""
    from ts.context import RequestProcessor

    ctx = request_context(1)
    ctx.request_processor = [RequestProcessor({"explain": "True"})]
    return ctx


def measure(arch: str, image: bytes, steps: list[int], work: Path, rounds: int, seconds: float) -> list[dict]:
    run = random_weights_run(arch, work / arch)
    build_archive(run, arch, work / "store", {"batch_size": 1}, force=True)
    handler, _ = unpack_handler(work / "store" / f"{arch}.mar", work / f"{arch}_unpacked", torch_threads=os.cpu_count())
    b64 = base64.b64encode(image).decode()
    calls = {"prediction": lambda: handler.handle([{"body": image}], request_context(1))}
    for n in steps:
        calls[f"IG {n} steps"] = lambda n=n: handler.handle([{"body": {"data": b64, "n_steps": n}}], explain_context())
    answer = calls[f"IG {steps[-1]} steps"]()[0]
    if "convergence_delta" not in answer:
        raise RuntimeError(f"{arch}: the explanation failed: {answer}")
    ms = interleaved(calls, rounds, seconds)
    base = ms["prediction"]
    batches = {
        n: handler.explainer.internal_batch_size(handler.transform(handler.read_image(image, 3)), n) for n in steps
    }
    return [
        {
            "model": arch,
            "call": name,
            "n_steps": None if name == "prediction" else steps[i - 1],
            "internal_batch": None if name == "prediction" else batches[steps[i - 1]],
            "ms_per_image": round(v, 1),
            "x_prediction": round(v / base, 1),
        }
        for i, (name, v) in enumerate(ms.items())
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/bench_explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["small_cnn", "resnet18"],
        help="registered classifiers to measure, random weights (default: small_cnn resnet18)",
    )
    p.add_argument("--steps", nargs="+", type=int, default=[8, 32], help="n_steps values to time (default: 8 32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (default: 3)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per call kind per round (default: 2.0)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="where explain.json goes (default: runs/bench)")
    args = p.parse_args(argv)
    from model_defs import list_models

    unknown = [m for m in args.models if m not in list_models(task="classification")]
    if unknown:
        print(
            f"error: --models: {unknown[0]!r} is not a registered classifier; see python -m model_defs", file=sys.stderr
        )
        return 2
    if min(args.steps) < 1 or max(args.steps) > 128:
        print(
            f"error: --steps must be from 1 to 128 (the handler's default explain_max_steps), got {args.steps}",
            file=sys.stderr,
        )
        return 2
    image, rows = cat_jpeg(), []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            print(f"measuring {arch} ({os.cpu_count()} torch threads)", flush=True)
            rows += measure(arch, image, sorted(set(args.steps)), Path(tmp), args.rounds, args.seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(
        json.dumps({"image": "451x300 JPEG", "threads": os.cpu_count(), "rows": rows}, indent=2) + "\n"
    )
    print(f"\n{'model':12} {'call':14} {'internal batch':>14} {'ms/image':>9} {'x prediction':>13}")
    for r in rows:
        print(
            f"{r['model']:12} {r['call']:14} {r['internal_batch'] or '-':>14} {r['ms_per_image']:9.1f} "
            f"{r['x_prediction']:12.1f}x"
        )
    print(f"wrote {out / 'explain.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
