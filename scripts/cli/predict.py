"""Send images to a served model over REST; with a labelled folder, report the accuracy.

    scripts/predict --model digits data/digits/test        # a dataset in any layout
    scripts/predict --model digits photo.jpg other.png     # single files

Reads the inference token from the server's run folder. Requests go out from several
client threads at once so TorchServe can batch them.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import requests

from scripts.ops.serve import ROOT, ServeError, TorchServe
from training.datasets import DatasetError, read_dataset


class Answer(NamedTuple):
    status: int
    body: dict
    seconds: float

    @property
    def top1(self) -> str | None:
        return next(iter(self.body), None) if self.status == 200 else None


def predict_files(
    ts: TorchServe, model: str, paths: list[Path], clients: int = 4, version: str | None = None
) -> list[Answer]:
    """One answer per file, in order; `version` targets /predictions/{model}/{version}."""
    url = f"{ts.url('inference')}/predictions/{model}" + (f"/{version}" if version else "")
    headers = ts.headers("inference")

    def one(path: Path) -> Answer:
        data = path.read_bytes()
        start = time.perf_counter()
        r = requests.post(url, data=data, headers=headers, timeout=60)
        seconds = time.perf_counter() - start
        try:
            return Answer(r.status_code, r.json(), seconds)
        except ValueError:
            return Answer(r.status_code, {"message": r.text}, seconds)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, paths))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="a dataset folder (class folders, labels.txt or labels/) or image files")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument(
        "--run-dir",
        default=str(ROOT / ".serve"),
        help="the server's run folder, for its address and token (default: .serve/)",
    )
    p.add_argument("--clients", type=int, default=4, help="concurrent requests (default: 4)")
    p.add_argument("--show", type=int, default=8, help="predictions to print (default: 8)")
    args = p.parse_args(argv)

    ts = TorchServe(run_dir=Path(args.run_dir))
    first = Path(args.inputs[0])
    try:
        if len(args.inputs) == 1 and first.is_dir():
            spec = read_dataset(first)
            paths = [s.path for s in spec.samples]
            truth = [",".join(spec.classes[i] for i in s.labels) for s in spec.samples]
        else:
            paths, truth = [Path(x) for x in args.inputs], None
        answers = predict_files(ts, args.model, paths, args.clients)
    except (DatasetError, ServeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except requests.RequestException as e:
        print(f"error: request to TorchServe failed: {e}", file=sys.stderr)
        return 2

    top1 = [a.top1 for a in answers]
    step = max(1, len(paths) // max(1, args.show))
    print(f"{'image':<40} {'true':>6}  prediction (probability)")
    for i in range(0, len(paths), step)[: args.show]:
        a = answers[i]
        shown = (
            f"{a.top1} ({a.body[a.top1]:.3f})" if a.top1 is not None else f"HTTP {a.status}: {a.body.get('message')}"
        )
        print(f"{str(paths[i].relative_to(first) if truth else paths[i]):<40} {truth[i] if truth else '':>6}  {shown}")
    failed = sum(a.status != 200 for a in answers)
    if failed:
        print(f"{failed} request(s) failed", file=sys.stderr)
    if truth:
        correct = sum(t == y for t, y in zip(top1, truth))
        print(f"served accuracy: {correct / len(paths):.3f} on {len(paths)} held-out images")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
