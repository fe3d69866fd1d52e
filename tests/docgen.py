"""The parts of the documentation that are read from the code, the tests and the benchmark records.

A generated part is written between `<!-- gen:NAME -->` and `<!-- /gen -->` in README.md or a
page of docs/: a count inline, or a table on lines of its own. `python -m tests.docgen` rewrites
every such part from its source; tests/test_docs.py fails when one differs from what this module
generates, so a count, an option table or a benchmark figure in the docs cannot drift from the
code, the test table or the record it comes from.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"<!-- gen:([a-z0-9-]+) -->(.*?)<!-- /gen -->", re.S)

TRAINERS = {
    "classification": "training.train",
    "detection": "training.train_detection",
    "segmentation": "training.train_segmentation",
    "generation": "training.train_gan",
    "embedding": "training.train_simclr",
}
ANSWERS = {
    "classification": "`{label: probability}`, top k",
    "detection": "boxes with label and score",
    "segmentation": "class mask (PNG) and each class's share",
    "generation": "`n` images (PNG) for a seed",
    "embedding": "an L2-normalized vector",
}
HANDLER_OPTION_USE = {
    "topk": "classes answered per image (set with `--topk`)",
    "runtime": "set with `--runtime`, never as a handler option",
    "torch_threads": "torch threads per worker (set with `--torch-threads`)",
    "max_pixels": "largest image accepted, checked from the header before decoding (413 beyond; default 40,000,000)",
    "max_bytes": "largest image data accepted (413 beyond; default 6,553,500)",
    "gpu_decode": "decode a batch's JPEGs with nvJPEG and resize them on the GPU",
    "channels_last": "channels_last memory format (default: on for the CPU)",
    "autocast": "run eager and compile under autocast on a GPU",
    "warmup_batch_sizes": "batch sizes a worker runs once before it reports ready",
    "threshold": "multi-label: the probability a label needs to be answered",
    "score_threshold": "detection: the score a box needs (default 0.5; a request may set it)",
    "max_detections": "detection: most boxes per image (default 100; a request may set it)",
    "max_n": "generation: most images per request (default 64)",
    "explain_steps": "Integrated Gradients steps when a request names none (default 32)",
    "explain_method": "how `/explanations` explains when a request names no `method`: integrated_gradients "
    "(default) or attention_rollout (the ViT classifiers only)",
    "explain_max_steps": "most steps a request may ask for (default 128)",
    "explain_baseline": "what Integrated Gradients starts from (default mean)",
    "explain_memory_mb": "memory for one internal batch of steps (default 512 on the CPU, half the free GPU memory)",
    "metrics": "the handler's metrics on /metrics (default on)",
    "json_logs": "one JSON line per batch and per refused item in the model log (default off)",
}


def table(head: tuple, rows: list) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


@cache
def record(name: str) -> dict:
    return json.loads((RECORDS / f"{name}.json").read_text())["figures"]


def num(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


# -- counts --------------------------------------------------------------------------------


def registered_models() -> str:
    from model_defs import list_models

    return str(len(list_models()))


def mistake_cases() -> str:
    from tests.test_mistakes import CASES

    return str(len(CASES))


def trainer_mistakes() -> str:
    from tests.test_engine import MISTAKES

    return str(len(MISTAKES))


def trainer_mistakes_each() -> str:
    from tests.test_engine import EVERY_TRAINER

    return str(len(EVERY_TRAINER))


# -- tables from the code ------------------------------------------------------------------


def task_table() -> str:
    from model_defs import get_entry, list_models

    by_task: dict[str, list[str]] = {}
    for name in list_models():
        by_task.setdefault(get_entry(name).task, []).append(f"`{name}`")
    unknown = set(by_task) - set(TRAINERS)
    if unknown:
        raise KeyError(f"tests/docgen.py: no trainer and answer written for task(s) {sorted(unknown)}")
    rows = [(task, f"`{TRAINERS[task]}`", ", ".join(by_task[task]), ANSWERS[task]) for task in TRAINERS]
    return table(("task", "trainer", "registered models", "served answer"), rows)


def archive_options() -> str:
    from handlers.options import MODEL_OPTIONS
    from scripts.cli.archive import get_args_parser

    actions = {a.dest: a for a in get_args_parser()._actions}
    rows = []
    for key, option in MODEL_OPTIONS.items():
        if key == "handler":
            continue
        action = actions[key]
        rows.append((f"`{action.option_strings[0]}`<br>`{key}`", option.allowed(), action.help))
    return table(("flag, manifest key", "allowed", "what it sets"), rows)


def handler_options() -> str:
    from handlers.options import HANDLER_OPTIONS

    missing = set(HANDLER_OPTIONS) - set(HANDLER_OPTION_USE)
    if missing:
        raise KeyError(f"tests/docgen.py: HANDLER_OPTION_USE has no text for {sorted(missing)}")
    rows = [(f"`{key}`", option.allowed(), HANDLER_OPTION_USE[key]) for key, option in HANDLER_OPTIONS.items()]
    return table(("key", "allowed", "what it does"), rows)


# -- tables from benchmark records ---------------------------------------------------------


def serving_cpu() -> str:
    r = record("serving-presets-cpu2")

    def row(what, load, s):
        return (what, load, num(s["throughput"]), num(s["p50"]), num(s["p90"]), num(s["p99"]), s["errors"])

    rows = [row("bare", f"batch {b['batch']}", b) for b in r["bare"]]
    for what in ("served", "stock"):
        rows += [row(what, f"{c['clients']} client{'s' * (c['clients'] > 1)}", c) for c in r[what]["closed"]]
        rows.append(row(what, f"open loop, {r[what]['open']['rate']:g}/s", r[what]["open"]))
    return table(("", "load", "img/s", "p50 ms", "p90 ms", "p99 ms", "errors"), rows)


def serving_cpu_ratios() -> str:
    r = record("serving-presets-cpu2")["ratios"]
    return (
        f"served/bare {r['served_over_bare']:.2f} and served/stock {r['served_over_stock']:.2f} in throughput, "
        f"served/stock {r['p99_served_over_stock']:.2f} in p99 latency"
    )


def presets_repeat_throughput() -> str:
    p = record("serving-presets-cpu2-repeat")["presets"]
    int8, fcos = (p[k]["targets"]["throughput"]["served_over_bare"] for k in ("classifier int8", "detector eager"))
    return f"{int8:.2f} (ResNet-18 int8) and {fcos:.2f} (FCOS)"


PRESET_MODELS = {
    "classifier int8": "ResNet-18 int8",
    "classifier eager": "ResNet-18 eager",
    "detector eager": "FCOS eager",
}


def presets_cpu() -> str:
    r = record("serving-presets-cpu2")
    rows = []
    for key, label in PRESET_MODELS.items():
        p = r["presets"][key]
        rows.append((f"{label}, bare", "–", "1", num(p["bare"]["p50_batch1"]), num(p["bare"]["throughput"])))
        for preset, s in p["served"].items():
            cfg = p["settings"][preset]
            rows.append(
                (
                    f"{label}, {preset}",
                    f"{cfg['workers']} × {cfg['torch_threads']}",
                    f"{cfg['batch_size']} / {cfg['max_batch_delay']} ms",
                    num(s["1"]["p50"]),
                    num(s["4"]["throughput"]),
                )
            )
    return table(("model, preset", "workers × threads", "batch / delay", "1-client p50 ms", "4-client img/s"), rows)


def presets_targets() -> str:
    r = record("serving-presets-cpu2")

    def verdict(met: bool) -> str:
        return "met" if met else "**not met**"

    rows = []
    for key, label in PRESET_MODELS.items():
        t = r["presets"][key]["targets"]
        rows.append(
            (
                label,
                f"{t['latency']['p50_over_bare']:.2f}, {verdict(t['latency']['met'])}",
                f"{t['throughput']['served_over_bare']:.2f}, {verdict(t['throughput']['met'])}",
                f"{t['balanced']['p50_over_best']:.2f} and {t['balanced']['throughput_over_best']:.2f}, "
                + verdict(t["balanced"]["met"]),
            )
        )
    return table(("", "latency: p50 / bare", "throughput: img/s / bare", "balanced: p50 / best, img/s / best"), rows)


def openvino() -> str:
    r = record("presets-cpu2-single-window")["presets"]
    rows = []
    for key, label in (
        ("classifier int8", "int8 (torch, x86)"),
        ("classifier openvino_int8", "openvino_int8 (NNCF)"),
        ("classifier openvino", "openvino fp32"),
        ("classifier eager", "eager fp32"),
    ):
        p = r[key]
        top1 = (p.get("accuracy_check") or {}).get("top1")
        rows.append(
            (
                label,
                "–" if top1 is None else f"{top1:.2f}%",
                num(p["bare"]["p50_batch1"]),
                num(p["bare"]["throughput"]),
                num(p["served"]["throughput"]["4"]["throughput"]),
            )
        )
    return table(
        ("ResNet-18", "top-1", "bare batch-1 p50 ms", "bare img/s", "served, throughput preset, 4-client img/s"), rows
    )


def gpu_bare() -> str:
    rows = []
    for arch in record("gpu-serving-h200-batched-decode")["results"]:
        name = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}[arch["arch"]]
        for config, label in (("eager fp16", "fp16, CPU decode"), ("eager fp16 nvjpeg", "fp16, nvJPEG batched decode")):
            c = arch["configs"][config]
            rows.append(
                (f"{name} {label}", *(num(b["throughput"], 0) for b in c["bare"]), num(c["model"][-1]["throughput"], 0))
            )
    return table(("model, path", "batch 1", "batch 8", "batch 32", "batch 64", "model alone at 64"), rows)


def gpu_served() -> str:
    rows = []
    for arch in record("gpu-serving-h200-per-image-decode")["results"]:
        name = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}[arch["arch"]]
        served, stock, ratios = arch["served"], arch["stock"]["load"], arch["ratios"]
        o, load = served["options"], served["load"]
        rows.append(
            (
                f"{name} served, per-image nvJPEG, {o['workers']} workers, batch {o['batch_size']}",
                num(load["throughput"], 0),
                num(load["p50"], 0),
                num(load["p99"], 0),
                f"{load['errors']:,}",
                ratios["served_over_bare"],
            )
        )
        rows.append(
            (
                f"{name} stock `image_classifier`, TorchServe defaults",
                num(stock["throughput"], 0),
                num(stock["p50"], 0),
                num(stock["p99"], 0),
                f"{stock['errors']:,}",
                "",
            )
        )
    return table(("", "img/s", "p50 ms", "p99 ms", "errors", "served/bare"), rows)


def gpu_training() -> str:
    cells: dict[str, dict[str, str]] = {}
    for run in record("gpu-training-h200-epoch-times")["runs"]:
        s = run["epoch_seconds"]
        cells.setdefault(run["task"], {})[run["amp"]] = " / ".join(f"{x:.1f}" for x in s)
    rows = [(task, c.get("bf16", "-"), c.get("fp16", "-")) for task, c in cells.items()]
    return table(("task", "bf16", "fp16"), rows)


def cache_table() -> str:
    r = record("train-cache-detection-segmentation-cpu2")
    labels = {"detection": "detection (Faster R-CNN MobileNet, 128 px)", "segmentation": "segmentation (U-Net, 64 px)"}
    rows = []
    for task, label in labels.items():
        t = r[task]
        rows.append(
            (
                label,
                f"{t['none']['later_epoch_s']:.1f} s",
                f"{t['memory']['later_epoch_s']:.1f} s ({t['memory']['speed_up']:.2f}x)",
                f"{t['disk']['later_epoch_s']:.1f} s ({t['disk']['speed_up']:.2f}x)",
            )
        )
    return table(("task", "no cache, later epochs", "`--cache memory`", "`--cache disk`"), rows)


def peers(name: str) -> str:
    """One model's bare handler and its four servers (ours on TorchServe, the ModelServer engine,
    LitServe) at each client count, from a serving record with its peers."""
    r = record(name)
    rows = [
        (f"bare, batch {b['batch']}", "–", num(b["throughput"]), num(b["p50"], 2), num(b["p99"], 2), "–")
        for b in r["bare"]
    ]
    sides = {"served": "ours, TorchServe", "modelserver": "ours, ModelServer", "litserve": "LitServe"}
    for key, label in sides.items():
        for c in r.get(key, {}).get("closed", []):
            cpu = c.get("server_cpu_ms_per_request")
            rows.append(
                (
                    label,
                    c["clients"],
                    num(c["throughput"]),
                    num(c["p50"], 2),
                    num(c["p99"], 2),
                    "–" if cpu is None else num(cpu, 2),
                )
            )
    head = ("", "clients", "img/s", "p50 ms", "p99 ms", "server CPU ms/req")
    return table(head, rows)


def peers_ratios(name: str) -> str:
    r = record(name)["ratios"]
    return (
        f"served/bare {r['best_served_over_bare']:.2f} at {r['best_clients']} clients (its best); "
        f"against LitServe, {r['served_over_litserve_16']:.2f}× its throughput at 16 clients and "
        f"{r['p99_served_over_litserve_4']:.2f}× its p99 at 4"
    )


def bodies(name: str) -> str:
    r = record(name)["bodies"]
    rows = [
        (
            "one image per request" if b["protocol"] == "plain" else f"KServe {b['protocol']}",
            b["images"],
            num(b["throughput"]),
            num(b["p50"], 2),
            num(b["p99"], 2),
            num(b["p50"] / b["images"], 2),
        )
        for b in r["rows"]
    ]
    return table(("body", "images per request", "img/s", "p50 ms", "p99 ms", "p50 ms per image"), rows)


def bodies_gain(name: str) -> str:
    """Images per second one per request against KServe v1 bodies of 8, at the same clients."""
    rows = {(b["protocol"], b["images"]): b for b in record(name)["bodies"]["rows"]}
    return (
        f"{num(rows[('plain', 1)]['throughput'])} one per request, {num(rows[('v1', 8)]['throughput'])} in bodies of 8"
    )


def generator_cost(name: str, clients: int = 16) -> str:
    c = next(c for c in record(name)["served"]["closed"] if c["clients"] == clients)
    return (
        f"wrk spent {c['generator_cpu_ms_per_request']:.3f} ms of CPU per request against the server's "
        f"{c['server_cpu_ms_per_request']:.2f} ms"
    )


def fixed_cost() -> str:
    r = record("fixed_cost")
    s = r["stages"]
    rows = [(k, num(v, 3), f"{v / s['client_mean_ms']:.0%}") for k, v in s["stages_ms"].items()]
    rows += [("sum of the stages", num(s["sum_ms"], 3), ""), ("client's mean", num(s["client_mean_ms"], 3), "")]
    return table(("stage, mean at 1 client", "ms", "share"), rows)


def fixed_cost_summary() -> str:
    r = record("fixed_cost")
    sat = r["saturated"]
    return (
        f"served p50 {r['one_client']['p50']:.3f} ms at one client, the null handler {r['bare']['p50_ms']:.3f} ms "
        f"in-process: a fixed cost of {r['fixed_cost_p50_ms']:.2f} ms; at {sat['clients']} clients "
        f"{num(sat['throughput'], 0)} requests/s with {sat['server_cpu_ms_per_request']:.2f} ms of server CPU per "
        f"request (the load generator {sat['generator_cpu_ms_per_request']:.3f} ms)"
    )


def fixed_cost_levers() -> str:
    r = record("fixed-cost-levers-cpu2")
    rows = []
    for lever, trial in r["levers"].items():
        variants = {k: v for k, v in trial.items() if isinstance(v, list)}
        for variant, runs in variants.items():
            rows.append(
                (
                    lever,
                    variant,
                    " / ".join(num(x["fixed_cost_p50_ms"], 3) for x in runs),
                    " / ".join(num(x["saturated_req_s"], 0) for x in runs),
                    " / ".join(num(x["server_cpu_ms_per_request"], 3) for x in runs),
                )
            )
        rows.append((lever, f"*{trial['verdict']}*", "", "", ""))
    head = ("lever", "variant", "fixed cost p50 ms", "req/s at 16 clients", "server CPU ms/req")
    return table(head, rows)


def batching_cost() -> str:
    b = record("fixed-cost-levers-cpu2")["batching"]
    rows = [
        (k, num(v["p50_ms"], 2), num(v["p99_ms"], 2), num(v["server_cpu_ms_per_request"], 2))
        for k, v in b.items()
        if isinstance(v, dict)
    ]
    return table(("null handler archived with", "p50 ms", "p99 ms", "server CPU ms/req"), rows)


LATENCY_RUNS = ("presets-int8-cpu2-run-1", "presets-int8-cpu2-run-2", "presets-int8-cpu2-run-3")


def latency_runs() -> str:
    """The int8 latency preset's target in three separate runs of the presets bench."""
    rows = []
    for name in LATENCY_RUNS:
        p = record(name)["presets"]["classifier int8"]
        t = p["targets"]["latency"]
        rows.append(
            (
                f"`{name}`",
                num(p["bare"]["p50_batch1"], 2),
                num(p["served"]["latency"]["1"]["p50"], 2),
                f"{t['p50_over_bare']:.2f}",
                "met" if t["met"] else "missed",
            )
        )
    return table(
        ("record", "bare batch-1 p50 ms", "served 1-client p50 ms", "median of the rounds' ratios (≤ 1.5)", "target"),
        rows,
    )


GENERATORS: dict[str, Callable[[], str]] = {
    "registered-models": registered_models,
    "mistake-cases": mistake_cases,
    "trainer-mistakes": trainer_mistakes,
    "trainer-mistakes-each": trainer_mistakes_each,
    "task-table": task_table,
    "archive-options": archive_options,
    "handler-options": handler_options,
    "serving-cpu": serving_cpu,
    "serving-cpu-ratios": serving_cpu_ratios,
    "presets-repeat-throughput": presets_repeat_throughput,
    "presets-cpu": presets_cpu,
    "presets-targets": presets_targets,
    "openvino": openvino,
    "gpu-bare": gpu_bare,
    "gpu-served": gpu_served,
    "gpu-training": gpu_training,
    "cache-table": cache_table,
    "peers-small-cnn": lambda: peers("peers-small_cnn-cpu2"),
    "peers-small-cnn-ratios": lambda: peers_ratios("peers-small_cnn-cpu2"),
    "bodies-small-cnn": lambda: bodies("peers-small_cnn-cpu2"),
    "peers-resnet18": lambda: peers("peers-resnet18-cpu2"),
    "bodies-resnet18-gain": lambda: bodies_gain("peers-resnet18-cpu2"),
    "peers-generator-cost": lambda: generator_cost("peers-small_cnn-cpu2"),
    "peers-resnet18-ratios": lambda: peers_ratios("peers-resnet18-cpu2"),
    "fixed-cost": fixed_cost,
    "fixed-cost-summary": fixed_cost_summary,
    "fixed-cost-levers": fixed_cost_levers,
    "batching-cost": batching_cost,
    "latency-runs": latency_runs,
}


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render(text: str, where: str = "") -> str:
    """The text with every generated part written afresh."""

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"{where}: unknown generated part {name!r}; known: {', '.join(GENERATORS)}")
        value = GENERATORS[name]()
        body = f"\n{value}\n" if "\n" in value or value.startswith("|") else value
        return f"<!-- gen:{name} -->{body}<!-- /gen -->"

    return BLOCK.sub(fill, text)


def stale() -> list[str]:
    """The documents whose generated parts differ from their sources."""
    return [str(p.relative_to(ROOT)) for p in documents() if render(p.read_text(), str(p)) != p.read_text()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.docgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only list the documents that are out of date (default: off)")
    args = p.parse_args(argv)
    changed = stale()
    if args.check:
        for path in changed:
            print(f"out of date: {path} (python -m tests.docgen rewrites it)", file=sys.stderr)
        return 1 if changed else 0
    for path in documents():
        if str(path.relative_to(ROOT)) in changed:
            path.write_text(render(path.read_text(), str(path)))
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
