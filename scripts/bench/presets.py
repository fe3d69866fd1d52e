"""The serving presets side by side, in scripts/bench_serving's run: are their targets met here?

For each runtime (ResNet-18 int8 and eager fp32) and for the FCOS
detector, it archives the model with each preset for this host (scripts/ops/presets.py), serves
the archives of one model together on one server and loads them one after the other, by the
native load generator (wrk, as every served figure; scripts/bench/loadgen.py): one
client, then four. Its baseline, in the same run, is the bare handler of the same archive
in-process with torch on every core: batch 1 for latency, the better of batch 1 and 2 for
throughput. The targets are ratios to that baseline (never timed assertions). The host's
speed drifts from minute to minute (bare read 5.5 and then 6.6 img/s in one run), so bare
and the served loads take turns in ROUNDS rounds of --duration / ROUNDS seconds each; each
target is judged on the median over the rounds of its ratio within a round, and the table
shows each figure's median.

- latency:    1-client p50 <= 1.5 x bare batch-1 p50;
- throughput: 4-client img/s >= 0.95 x bare img/s;
- balanced:   within 25% of the better of the two on both figures.
"""

from __future__ import annotations

import json
import os
import statistics
from contextlib import ExitStack
from pathlib import Path

from scripts.bench.harness import bare, unpack_handler
from scripts.bench.loadgen import Load
from scripts.ops.packaging import build_archive
from scripts.ops.presets import PRESETS
from scripts.ops.serve import TorchServe

LATENCY_TARGET, THROUGHPUT_TARGET, BALANCED_MARGIN = 1.5, 0.95, 0.25
WARM_SECONDS = 10.0  # per archive, before any timed load (half of --duration when that is shorter)
ROUNDS = 3


def median_of(rounds: list[dict]) -> dict:
    """One load's summary with each figure the median over its rounds (None if a round had none);
    what is not a number (the generator's name, errors by kind) is left out."""
    return {
        k: None if any(r.get(k) is None for r in rounds) else statistics.median(r[k] for r in rounds)
        for k, v in rounds[0].items()
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    }


def ratios(rows: dict, bare: dict) -> dict | None:
    """One round's ratios ({preset: {1: summary, 4: summary}} against that round's bare), None
    if a load got no answer."""
    if any(s["p50"] is None or not s["throughput"] for r in rows.values() for s in r.values()):
        return None
    out = {}
    if "latency" in rows:
        out["latency"] = rows["latency"][1]["p50"] / bare["p50_batch1"]
    if "throughput" in rows:
        out["throughput"] = rows["throughput"][4]["throughput"] / bare["throughput"]
    if {"balanced", "latency", "throughput"} <= set(rows):
        out["balanced_p50"] = rows["balanced"][1]["p50"] / min(rows[p][1]["p50"] for p in ("latency", "throughput"))
        best_rate = max(rows[p][4]["throughput"] for p in ("latency", "throughput"))
        out["balanced_rate"] = rows["balanced"][4]["throughput"] / best_rate
    return out


def targets(rounds: list[dict | None]) -> dict:
    """The verdicts on each ratio's median over the rounds."""
    answered = [r for r in rounds if r is not None]
    if not rounds or len(answered) < len(rounds):
        return {"error": "a load got no answer in its time: no ratio"}
    m = {k: statistics.median(r[k] for r in answered) for k in answered[0]}
    out: dict = {}
    if "latency" in m:
        out["latency"] = {"p50_over_bare": round(m["latency"], 2), "met": m["latency"] <= LATENCY_TARGET}
    if "throughput" in m:
        out["throughput"] = {"served_over_bare": round(m["throughput"], 2), "met": m["throughput"] >= THROUGHPUT_TARGET}
    if "balanced_p50" in m:
        p50, rate = m["balanced_p50"], m["balanced_rate"]
        out["balanced"] = {
            "p50_over_best": round(p50, 2),
            "throughput_over_best": round(rate, 2),
            "met": p50 <= 1 + BALANCED_MARGIN and rate >= 1 - BALANCED_MARGIN,
        }
    return out


def bench_model(label: str, run: Path, runtime: str, presets: list[str], image: bytes, work: Path, args) -> dict:
    """One model under each preset: archives built, one server, then ROUNDS rounds of bare and
    of each preset at 1 and 4 clients."""
    store = work / f"store_{label}"
    store.mkdir(parents=True, exist_ok=True)
    names, configs, checks = [], {}, None
    for preset in presets:
        options = {"preset": preset, "runtime": runtime} if runtime else {"preset": preset}
        print(f"  {label}: archiving with preset {preset}", flush=True)
        entry = build_archive(run, preset, store, options, force=True)
        checks = checks or entry.get("runtime")
        configs[preset] = entry["preset"]["settings"] | {"overridden": entry["preset"]["overridden"]}
        names.append(preset)
    # Bare: the archive's own handler in-process with every core, no server.
    handler, _ = unpack_handler(store / f"{names[0]}.mar", work / f"bare_{label}", torch_threads=os.cpu_count())
    ts = TorchServe(run_dir=work / f"serve_{label}", model_store=store, config=args.properties, ports={})
    ts.start(names, timeout=600)
    window = args.duration / ROUNDS
    bares: dict[int, list] = {1: [], 2: []}
    loads: dict[str, dict[int, list]] = {p: {1: [], 4: []} for p in names}
    try:
        with ExitStack() as stack:
            headers = ts.headers("inference")
            generators = {
                p: stack.enter_context(
                    Load(f"{ts.url('inference')}/predictions/{p}", headers, image, generator=args.load_generator)
                )
                for p in names
            }
            # Warm the frontend (the JVM compiles its request path as it runs) and every worker
            # first: without it the first timed load, latency's lone client, read up to 1.5x slower
            # than balanced's on the same worker setting measured a minute later.
            for preset in names:
                generators[preset].closed(4, min(WARM_SECONDS, args.duration / 2), warm=False)
            for r in range(ROUNDS):
                print(
                    f"  {label} round {r + 1}/{ROUNDS}: bare, then each preset at 1 and 4 clients, "
                    f"{window:.1f} s each ({generators[names[0]].generator})",
                    flush=True,
                )
                for batch in bares:
                    bares[batch].append(bare(handler, image, batch, window))
                for preset in names:
                    for clients in (1, 4):
                        loads[preset][clients].append(generators[preset].closed(clients, window, warm=False))
    finally:
        ts.stop()
    del handler

    def baseline(b1: dict, b2: dict) -> dict:
        return {"p50_batch1": b1["p50"], "throughput": max(b1["throughput"], b2["throughput"])}

    paired = [
        ratios({p: {c: r[i] for c, r in by.items()} for p, by in loads.items()}, baseline(bares[1][i], bares[2][i]))
        for i in range(ROUNDS)
    ]
    b1, b2 = median_of(bares[1]), median_of(bares[2])
    base = baseline(b1, b2) | {"batch1": b1, "batch2": b2}
    rows = {p: {c: median_of(r) for c, r in by_clients.items()} for p, by_clients in loads.items()}
    return {
        "run": str(run),
        "runtime": runtime or "eager",
        "accuracy_check": checks,
        "settings": configs,
        "bare": base,
        "served": {p: {str(c): s for c, s in r.items()} for p, r in rows.items()},
        "rounds": {"bare": bares, "served": {p: {str(c): r for c, r in by.items()} for p, by in loads.items()}},
        "ratios_by_round": paired,
        "targets": targets(paired),
    }


def run_presets(args, run: Path, detector_run: Path | None, image: bytes, work: Path) -> dict:
    """Every --preset-runtimes runtime of the classifier, and the detector (eager), under --presets."""
    presets = [p for p in PRESETS if p in args.presets.split(",")]  # checked by scripts/bench/serving.py's main
    out = {}
    for runtime in [r for r in args.preset_runtimes.split(",") if r]:
        print(f"presets: classifier, runtime {runtime}", flush=True)
        out[f"classifier {runtime}"] = bench_model(f"cls_{runtime}", run, runtime, presets, image, work, args)
    if detector_run is not None:
        print("presets: detector (eager)", flush=True)
        out["detector eager"] = bench_model("detector", detector_run, None, presets, image, work, args)
    return out


def report(result: dict) -> str:
    """The presets' rows and their targets, as printed at the end of scripts/bench_serving."""
    head = ("workers x threads", "batch/delay", "1-client p50", "4-client img/s")
    lines = [f"{'model, preset':34} {head[0]:>17} {head[1]:>11} {head[2]:>12} {head[3]:>14}"]
    for model, r in result.items():
        b = r["bare"]
        lines.append(f"{model + ', bare':34} {'-':>17} {'1 / -':>11} {b['p50_batch1']:12.1f} {b['throughput']:14.1f}")
        for preset, loads in r["served"].items():
            s = r["settings"][preset]
            lines.append(
                f"{model + ', ' + preset:34} {str(s['workers']) + ' x ' + str(s['torch_threads']):>17} "
                f"{str(s['batch_size']) + ' / ' + str(s['max_batch_delay']) + ' ms':>11} "
                f"{loads['1']['p50']:12.1f} {loads['4']['throughput']:14.1f}"
            )
        lines.append("  targets: " + json.dumps(r["targets"]))
    return "\n".join(lines)
