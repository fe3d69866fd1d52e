"""Model-version operations over TorchServe's management API, for the people who run it.

    scripts/models status                               # what is served, and what is catalogued but not
    scripts/models register digits 2.0                  # from the catalog, sha256-checked; waits for workers
    scripts/models compare digits 1.0 2.0 --data data/digits/test
    scripts/models promote digits 2.0 [--if-better --data DIR]
    scripts/models rollback digits                      # back to the previous default
    scripts/models scale digits [2.0] --min 1 --max 2
    scripts/models unregister digits 1.0

Reads the management and inference tokens from the server's run folder. Every change is
recorded there (serving.json), so `scripts/serve start` after a stop restores the same
versions, defaults and workers. Tables for people, `--json` for machines; every failure
is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from model_defs.usage import OneLineParser, UsageError
from scripts.cli.errors import one_line_errors
from scripts.ops.catalog import Catalog, CatalogError
from scripts.ops.modelserver import ENGINE, ModelServerEngine, engine_of
from scripts.ops.names import check_name, check_version
from scripts.ops.serve import ROOT, RUN_DIR_HELP, ServeError, TorchServe, archive_manifest, default_run_dir


class OpsError(RuntimeError):
    """An operation refused by our own rules (not by TorchServe)."""


def default_version(ts: TorchServe, name: str) -> str:
    return ts.describe(name)[0]["modelVersion"]


def registered_versions(ts: TorchServe, name: str) -> list[str]:
    return [v["modelVersion"] for v in ts.versions(name)]


def status(ts: TorchServe, catalog: Catalog) -> dict:
    served, entries = [], catalog.load()
    for name in ts.models():
        default = default_version(ts, name)
        for v in ts.versions(name):
            served.append(
                {
                    "name": name,
                    "version": v["modelVersion"],
                    "default": v["modelVersion"] == default,
                    "workers": [
                        {"id": w["id"], "status": w["status"], "pid": w.get("pid")} for w in v.get("workers", [])
                    ],
                    "min_workers": v["minWorkers"],
                    "max_workers": v["maxWorkers"],
                    "batch_size": v["batchSize"],
                    "max_batch_delay": v["maxBatchDelay"],
                    "device": v.get("deviceType", "cpu"),
                    "preset": (entries.get(f"{name}/{v['modelVersion']}") or {}).get("preset", {}).get("name"),
                    "file": v["modelUrl"],
                }
            )
    keys = {(s["name"], s["version"]) for s in served}
    not_served = [
        {"name": e["name"], "version": e["version"], "file": e["file"], "sha256": e["sha256"]}
        for e in entries.values()
        if (e["name"], e["version"]) not in keys
    ]
    return {"served": served, "not_served": not_served, "refused_at_start": ts.refused()}


def print_status(report: dict) -> None:
    rows = [("model", "version", "default", "workers", "min-max", "batch", "delay", "device", "preset")]
    for s in report["served"]:
        ready = sum(w["status"] == "READY" for w in s["workers"])
        rows.append(
            (
                s["name"],
                s["version"],
                "*" if s["default"] else "",
                f"{ready}/{len(s['workers'])} ready",
                f"{s['min_workers']}-{s['max_workers']}",
                str(s["batch_size"]),
                f"{s['max_batch_delay']} ms",
                s["device"],
                s.get("preset") or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if report["not_served"]:
        print("\ncatalogued, not served:")
        for e in report["not_served"]:
            print(f"  {e['name']} {e['version']}  {e['file']}  sha256 {e['sha256'][:12]}")
    if report["refused_at_start"]:
        print("\nrefused at the last start:")
        for line in report["refused_at_start"]:
            print(f"  {line}")


def compare(
    ts: TorchServe, name: str, versions: list[str], data: Path, clients: int = 4, need_labels: bool = False
) -> dict:
    """Send the same images to each version: the task's metric (where labelled), agreement,
    latency and errors (scripts/ops/task_metrics.py scores them)."""
    from scripts.cli.predict import ask
    from scripts.ops import task_metrics as tm

    known = registered_versions(ts, name)
    for v in versions:
        if v not in known:
            raise OpsError(f"{name} {v} is not registered (registered: {', '.join(known)})")
    try:
        metas = {v: tm.served_meta(ts, name, v) for v in versions}
        a, b = versions
        if (metas[a]["task"], metas[a].get("classes")) != (metas[b]["task"], metas[b].get("classes")):
            raise OpsError(f"{name} {a} and {b} are not the same task with the same classes; nothing to compare")
        try:
            evalset = tm.load(data, metas[a], name)
        except tm.MetricsError as e:
            raise UsageError(str(e)) from None
        if need_labels and not evalset.labelled:
            raise UsageError(f"--if-better needs labelled data; {data} holds no labels")
        results, answers, references = {}, {}, {}
        for v in versions:
            answers[v], references[v] = ask(ts, name, metas[v], evalset, clients, v)
            ms = sorted(x.seconds * 1000 for x in answers[v])
            metrics = tm.score(metas[v], answers[v], evalset, references[v]) if evalset.labelled else {}
            results[v] = {
                **metrics,
                "errors": sum(x.status != 200 for x in answers[v]),
                "p50_ms": round(statistics.median(ms), 1),
                "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
            }
        agreement = tm.agreement(metas[a], answers[a], answers[b], evalset, references[a], references[b])
    except tm.MetricsError as e:
        raise OpsError(str(e)) from None
    return {
        "model": name,
        "task": tm.kind_of(metas[a]),
        "images": len(evalset.paths),
        "labelled": evalset.labelled,
        "metric": tm.primary_metric(metas[a]),
        "versions": results,
        "agreement": agreement,
    }


def print_compare(report: dict) -> None:
    from scripts.ops.task_metrics import KIND_NAMES

    labelled = "labelled" if report["labelled"] else "unlabelled"
    print(f"{report['model']} ({KIND_NAMES[report['task']]}) on {report['images']} {labelled} images")
    figures = [k for k in next(iter(report["versions"].values())) if k not in ("errors", "p50_ms", "p99_ms")]
    print(f"{'version':<10} " + " ".join(f"{k:>12}" for k in figures) + f" {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for v, r in report["versions"].items():
        cells = " ".join(f"{r[k]:>12.4f}" for k in figures)
        print(f"{v:<10} {cells} {r['errors']:>6} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")
    print(f"agreement: {report['agreement']:.4f}")


def global_options(defaults: bool) -> argparse.ArgumentParser:
    """--run-dir, --model-store and --json, accepted before or after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    d = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    p.add_argument("--run-dir", default=d(str(default_run_dir())), help=RUN_DIR_HELP)
    p.add_argument(
        "--model-store", default=d(str(ROOT / "model_store")), help="archives and their catalog (default: model_store/)"
    )
    p.add_argument("--json", action="store_true", default=d(False), help="print JSON instead of tables (default: off)")
    return p


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="scripts/models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options(True)],
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = [global_options(False)]

    def command(name: str, help: str, *positionals: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, parents=common, help=help)
        for positional in positionals:
            c.add_argument(positional)
        return c

    command("status", "served models and versions, default, workers, batching, device; catalogued but not served")
    s = command(
        "register", "register a catalogued version (sha256-checked) and wait for its workers", "name", "version"
    )
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="initial workers, 1 to the machine's cores (default: the archive's minWorkers)",
    )
    s = command("promote", "make a version the default", "name", "version")
    s.add_argument(
        "--if-better",
        action="store_true",
        help="refuse if the version scores lower than the default on --data, by the task's metric (default: off)",
    )
    s.add_argument("--data", default=None, help="labelled dataset folder for --if-better (default: none)")
    command("rollback", "make the previous default the default again", "name")
    s = command("scale", "set a version's minimum and maximum workers", "name")
    s.add_argument("version", nargs="?", default=None, help="(default: the default version)")
    s.add_argument("--min", type=int, required=True, help="minimum workers, 0 or more")
    s.add_argument(
        "--max",
        type=int,
        required=True,
        help="maximum workers, 1 to what the machine's cores fit (cores / the model's torch threads)",
    )
    command("unregister", "remove a version (not the default while others exist)", "name", "version")
    s = command(
        "compare",
        "metric, agreement, latency and errors of two versions on the same images",
        "name",
        "version_a",
        "version_b",
    )
    s.add_argument("--data", required=True, help="dataset folder (any layout training reads) or unlabelled images")
    s.add_argument("--clients", type=int, default=4, help="concurrent requests (default: 4)")
    return p


def check_arguments(args) -> None:
    """Every name and version on the command line follows the one rule, before any request."""
    if getattr(args, "if_better", False) and not args.data:
        raise UsageError("--if-better needs --data DIR, a labelled dataset folder")
    if getattr(args, "data", None) and getattr(args, "if_better", True) is False:
        raise UsageError("--data is only read by --if-better; add --if-better or drop --data")
    if getattr(args, "name", None) is not None:
        check_name(args.name)
    for attr in ("version", "version_a", "version_b"):
        if getattr(args, attr, None) is not None:
            check_version(getattr(args, attr))


def check_workers(ts: TorchServe, name: str, version: str, low: int, high: int) -> None:
    """Refuse worker counts the machine cannot run: at most cores / the model's torch threads."""
    if low < 0 or high < max(1, low):
        raise UsageError(f"need 0 <= --min <= --max and --max >= 1, got --min {low} --max {high}")
    threads = 1
    for v in ts.versions(name):
        if v["modelVersion"] == version:
            path = ts.model_store / Path(v["modelUrl"]).name
            threads = max(1, archive_manifest(path)["torch_threads"]) if path.is_file() else 1
    cores = os.cpu_count() or 1
    most = max(1, cores // threads)
    if high > most:
        raise UsageError(
            f"--max {high} is more workers than this machine runs for {name} {version}: at most {most} "
            f"({cores} cores / {threads} torch thread(s) per worker)"
        )


def run(args, ts: TorchServe, catalog: Catalog) -> tuple[dict, str]:
    """Do the command; returns (JSON result, line for people)."""
    if args.command == "register":
        if args.workers is not None and not 1 <= args.workers <= (os.cpu_count() or 1):
            raise UsageError(
                f"--workers must be from 1 to {os.cpu_count() or 1} (this machine's cores), got {args.workers}"
            )
        mar = catalog.checked_archive(args.name, args.version)
        version = ts.register(args.name, mar.name, workers=args.workers, version=args.version)
        return (
            {"registered": args.name, "version": version, "file": mar.name, "default": default_version(ts, args.name)},
            f"registered {args.name} {version} from {mar.name}; default is {default_version(ts, args.name)}",
        )
    if args.command == "promote":
        if args.version not in registered_versions(ts, args.name):
            raise OpsError(f"{args.name} {args.version} is not registered; register it first")
        current = default_version(ts, args.name)
        report, figures = None, ""
        if args.if_better:
            report = compare(ts, args.name, [current, args.version], Path(args.data), need_labels=True)
            metric = report["metric"]
            old, new = (report["versions"][v][metric] for v in (current, args.version))
            figures = (
                f"{metric} {new:.4f} vs {old:.4f} of the default {current} on {report['images']} images, "
                f"agreement {report['agreement']:.4f}"
            )
            if new < old:
                raise OpsError(f"not promoting {args.name} {args.version}: {figures}")
        ts.set_default(args.name, args.version)
        return (
            {"model": args.name, "default": args.version, "previous": current, "compare": report},
            f"{args.name}: default is now {args.version} (was {current})" + (f"; {figures}" if figures else ""),
        )
    if args.command == "rollback":
        current, previous = ts.rollback(args.name)
        return {
            "model": args.name,
            "default": previous,
            "previous": current,
        }, f"{args.name}: default is back to {previous} (was {current})"
    if args.command == "scale":
        version = args.version or default_version(ts, args.name)
        if version not in registered_versions(ts, args.name):
            raise OpsError(
                f"{args.name} {version} is not registered (registered: {', '.join(registered_versions(ts, args.name))})"
            )
        check_workers(ts, args.name, version, args.min, args.max)
        ts.scale(args.name, version, args.min, args.max)
        return (
            {"model": args.name, "version": version, "min_workers": args.min, "max_workers": args.max},
            f"{args.name} {version}: workers {args.min}-{args.max}",
        )
    if args.command == "unregister":
        versions = registered_versions(ts, args.name)
        if args.version not in versions:
            raise OpsError(f"{args.name} {args.version} is not registered (registered: {', '.join(versions)})")
        default = default_version(ts, args.name)
        others = [v for v in versions if v != args.version]
        if args.version == default and others:
            raise OpsError(
                f"{args.name} {args.version} is the default version; promote another version first "
                f"(e.g. scripts/models promote {args.name} {others[-1]})"
            )
        ts.unregister(args.name, args.version)
        return {"model": args.name, "unregistered": args.version}, f"unregistered {args.name} {args.version}"
    if args.command == "compare":
        report = compare(ts, args.name, [args.version_a, args.version_b], Path(args.data), args.clients)
        return report, ""
    report = status(ts, catalog)
    return report, ""


def command(args) -> int:
    check_arguments(args)
    # The kserve engine answers status and compare; its other commands refuse with one line.
    engine = ModelServerEngine if engine_of(Path(args.run_dir)) == ENGINE else TorchServe
    ts = engine(run_dir=Path(args.run_dir), model_store=Path(args.model_store))
    catalog = Catalog(Path(args.model_store))
    if not ts.is_running():
        raise ServeError(f"TorchServe is not running from {ts.run_dir}; start it with {ts.hint('start')}")
    result, line = run(args, ts, catalog)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "status":
        print_status(result)
    elif args.command == "compare":
        print_compare(result)
    else:
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when done, 2 for a usage mistake (a name, version or number that breaks a rule),
    1 when the server, the catalog or our own rules refuse; each refusal is one line on stderr."""
    args = get_args_parser().parse_args(argv)
    return one_line_errors(lambda: command(args), (ServeError, CatalogError, OpsError))


if __name__ == "__main__":
    sys.exit(main())
