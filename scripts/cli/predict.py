"""Send images to a served model over REST: a table of its answers, every answer to a file,
and, where the images are labelled, the task's standard metric.

    scripts/predict --model digits data/digits/test               # any dataset layout training reads
    scripts/predict --model digits --split val data/digits/train  # training's validation split
    scripts/predict --model shapes data/shapes/voc --out answers.csv
    scripts/predict --model embedder data/digits/test --reference data/digits/train  # k-NN accuracy
    scripts/predict --model digits photo.jpg other.png            # single files, or a plain image folder

Layouts: class folders, labels.txt, images/ + labels/ (classification, embeddings), VOC or
COCO (detection), images/ + masks/ (segmentation), or a folder of unlabelled images. A
layout or class names the model does not know are refused before any request is sent.
Metrics (scripts/ops/task_metrics.py): accuracy; micro/macro F1 and exact match (multi-label);
mAP@0.5 and mAP@[.5:.95] (detection); mIoU and pixel accuracy (segmentation); k-NN accuracy
against --reference (embeddings). `--split val` rebuilds the validation split model.json
records, so the figure is comparable to training's. A generator is refused (it takes seeds).

The metric is taken over the images the model answered: a file the server could not read
(a truncated JPEG, a text file named .jpg) is counted and listed, with the server's reason,
not scored as a wrong answer.

Reads the inference token from the server's run folder. Requests go out from several
client threads at once so TorchServe can batch them.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import requests

from model_defs.usage import OneLineParser
from scripts.ops import task_metrics as tm
from scripts.ops.serve import RUN_DIR_HELP, ServeError, TorchServe, default_run_dir


class Answer(NamedTuple):
    status: int
    body: Any  # a dict (classification, masks, embeddings) or a list (detections)
    seconds: float


def predict_files(
    ts: TorchServe,
    model: str,
    paths: list[Path],
    clients: int = 4,
    version: str | None = None,
    options: dict | None = None,
) -> list[Answer]:
    """One answer per file, in order; `version` targets /predictions/{model}/{version};
    `options` go with each image as a JSON body {"data": <base64>, **options}."""
    url = f"{ts.url('inference')}/predictions/{model}" + (f"/{version}" if version else "")
    headers = ts.headers("inference")

    def one(path: Path) -> Answer:
        data = path.read_bytes()
        body = {"json": {"data": base64.b64encode(data).decode(), **options}} if options else {"data": data}
        start = time.perf_counter()
        r = requests.post(url, headers=headers, timeout=60, **body)
        seconds = time.perf_counter() - start
        try:
            return Answer(r.status_code, r.json(), seconds)
        except ValueError:
            return Answer(r.status_code, {"message": r.text}, seconds)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, paths))


def ask(ts: TorchServe, model: str, meta: dict, evalset: tm.EvalSet, clients: int, version: str | None = None):
    """(answers for the images, answers for the k-NN reference images)."""
    options = tm.request_options(meta)
    answers = predict_files(ts, model, evalset.paths, clients, version, options)
    reference = predict_files(ts, model, evalset.reference, clients, version, options) if evalset.reference else None
    return answers, reference


def write_answers(out: Path, meta: dict, evalset: tm.EvalSet, answers: list[Answer], metrics: dict | None) -> None:
    """Every answer: JSON (the answers as served) or CSV (one readable line each)."""
    rows = [
        {
            "image": str(path),
            "truth": tm.truth_text(meta, evalset, i),
            "status": a.status,
            "ms": round(a.seconds * 1000, 1),
        }
        for i, (path, a) in enumerate(zip(evalset.paths, answers))
    ]
    if out.suffix == ".csv":
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0], "answer"])
            w.writeheader()
            w.writerows({**r, "answer": tm.answer_text(meta, a)} for r, a in zip(rows, answers))
    else:
        body = {"metrics": metrics, "answers": [{**r, "answer": a.body} for r, a in zip(rows, answers)]}
        out.write_text(json.dumps(body, indent=1) + "\n")


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="scripts/predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="one dataset folder (any layout above) or image files")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--version", default=None, help="model version (default: the default version)")
    p.add_argument(
        "--split",
        choices=("all", "val"),
        default="all",
        help="all images, or the validation split model.json records (default: all)",
    )
    p.add_argument("--reference", default=None, help="embeddings: labelled folder the k-NN votes from (default: none)")
    p.add_argument("--out", default=None, help="write every answer to this .json or .csv file (default: none)")
    p.add_argument(
        "--run-dir",
        default=str(default_run_dir()),
        help=f"{RUN_DIR_HELP}: its address and token",
    )
    p.add_argument("--clients", type=int, default=4, help="concurrent requests (default: 4)")
    p.add_argument("--show", type=int, default=8, help="predictions to print (default: 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every image got an answer or a 4xx naming why its file cannot be read
    (those are listed), 1 when some request failed otherwise (5xx, no answer) or the server
    refused, 2 for input that does not fit (arguments, files, layout, class names)."""
    args = get_args_parser().parse_args(argv)
    out = Path(args.out) if args.out else None
    first = Path(args.inputs[0])
    ts = TorchServe(run_dir=Path(args.run_dir))
    try:
        if out and out.suffix not in (".json", ".csv"):
            raise tm.MetricsError(f"--out {out} must end in .json or .csv")
        if args.clients < 1:
            raise tm.MetricsError(f"--clients must be 1 or more, got {args.clients}")
        meta = tm.served_meta(ts, args.model, args.version)
        if len(args.inputs) == 1 and first.is_dir():
            evalset = tm.load(first, meta, args.model, args.split, Path(args.reference) if args.reference else None)
        else:
            tm.check_images_task(meta, args.model)
            missing = [x for x in args.inputs if not Path(x).is_file()]
            if missing:
                raise tm.MetricsError(f"{missing[0]} is not a file (give one dataset folder or image files)")
            if args.split != "all":
                raise tm.MetricsError("--split val needs the dataset folder the model was trained on")
            evalset = tm.EvalSet(Path("."), [Path(x) for x in args.inputs])
        answers, reference = ask(ts, args.model, meta, evalset, args.clients, args.version)
        scored, scored_answers = tm.answered(evalset, answers)
        metrics = None
        if scored.paths and evalset.labelled and (tm.kind_of(meta) != "embedding" or reference):
            metrics = tm.score(meta, scored_answers, scored, reference)
    except tm.MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except requests.RequestException as e:
        print(f"error: request to TorchServe failed: {e}", file=sys.stderr)
        return 1

    paths = evalset.paths
    step = max(1, len(paths) // max(1, args.show))
    names = [str(p.relative_to(first)) if first.is_dir() and p.is_relative_to(first) else str(p) for p in paths]
    truths = [tm.truth_text(meta, evalset, i) for i in range(len(paths))]
    width, true_width = max(len(n) for n in names), max(4, *(len(t) for t in truths))
    print(f"{'image':<{width}}  {'true':<{true_width}}  prediction")
    for i in list(range(0, len(paths), step))[: args.show]:
        print(f"{names[i]:<{width}}  {truths[i]:<{true_width}}  {tm.answer_text(meta, answers[i])}")
    refused = [(name, a) for name, a in zip(names, answers) if 400 <= a.status < 500]
    failed = [(name, a) for name, a in zip(names, answers) if a.status != 200 and not 400 <= a.status < 500]
    for what, rows in (("could not be read", refused), ("failed (server error or no answer)", failed)):
        if rows:
            print(f"{len(rows)} of {len(answers)} image(s) {what}:", file=sys.stderr)
            for name, a in rows:
                print(f"  {name}  {tm.answer_text(meta, a)}", file=sys.stderr)
    if metrics:
        unanswered = len(paths) - len(scored.paths)
        print(
            f"{format_metrics(metrics)} on the {len(scored.paths)} answered of {len(paths)} labelled images"
            + (f" ({unanswered} unanswered, listed above, not scored)" if unanswered else "")
            + f"; {args.model} is {tm.KIND_NAMES[tm.kind_of(meta)]}"
        )
    elif evalset.labelled and tm.kind_of(meta) == "embedding":
        print("no k-NN accuracy: give --reference DIR, a labelled folder to vote from", file=sys.stderr)
    if out:
        write_answers(out, meta, evalset, answers, metrics)
        print(f"wrote {len(answers)} answers to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
