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
import functools
import json
import statistics
import sys
from pathlib import Path

import requests

from scripts.catalog import Catalog, CatalogError
from scripts.predict import predict_files
from scripts.serve import ROOT, ServeError, TorchServe
from training.datasets import DatasetError, read_dataset


class OpsError(RuntimeError):
    """An operation refused by our own rules (not by TorchServe)."""


def default_version(ts: TorchServe, name: str) -> str:
    return ts.describe(name)[0]["modelVersion"]


def registered_versions(ts: TorchServe, name: str) -> list[str]:
    return [v["modelVersion"] for v in ts.versions(name)]


def status(ts: TorchServe, catalog: Catalog) -> dict:
    served = []
    for name in ts.models():
        default = default_version(ts, name)
        for v in ts.versions(name):
            served.append({
                "name": name, "version": v["modelVersion"], "default": v["modelVersion"] == default,
                "workers": [{"id": w["id"], "status": w["status"], "pid": w.get("pid")} for w in v.get("workers", [])],
                "min_workers": v["minWorkers"], "max_workers": v["maxWorkers"], "batch_size": v["batchSize"],
                "max_batch_delay": v["maxBatchDelay"], "device": v.get("deviceType", "cpu"), "file": v["modelUrl"],
            })
    keys = {(s["name"], s["version"]) for s in served}
    not_served = [{"name": e["name"], "version": e["version"], "file": e["file"], "sha256": e["sha256"]}
                  for e in catalog.load().values() if (e["name"], e["version"]) not in keys]
    return {"served": served, "not_served": not_served}


def print_status(report: dict) -> None:
    rows = [("model", "version", "default", "workers", "min-max", "batch", "delay", "device")]
    for s in report["served"]:
        ready = sum(w["status"] == "READY" for w in s["workers"])
        rows.append((s["name"], s["version"], "*" if s["default"] else "", f"{ready}/{len(s['workers'])} ready",
                     f"{s['min_workers']}-{s['max_workers']}", str(s["batch_size"]), f"{s['max_batch_delay']} ms", s["device"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if report["not_served"]:
        print("\ncatalogued, not served:")
        for e in report["not_served"]:
            print(f"  {e['name']} {e['version']}  {e['file']}  sha256 {e['sha256'][:12]}")


def compare(ts: TorchServe, name: str, versions: list[str], data: Path, clients: int = 4) -> dict:
    """Send a labelled image folder to each version: accuracy, agreement and latency."""
    known = registered_versions(ts, name)
    for v in versions:
        if v not in known:
            raise OpsError(f"{name} {v} is not registered (registered: {', '.join(known)})")
    spec = read_dataset(data)
    paths = [s.path for s in spec.samples]
    truth = [spec.classes[s.labels[0]] for s in spec.samples]
    results, top1 = {}, {}
    for v in versions:
        answers = predict_files(ts, name, paths, clients=clients, version=v)
        top1[v] = [a.top1 for a in answers]
        ms = sorted(a.seconds * 1000 for a in answers)
        results[v] = {
            "accuracy": sum(p == t for p, t in zip(top1[v], truth)) / len(truth),
            "errors": sum(a.status != 200 for a in answers),
            "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        }
    a, b = versions
    agreement = sum(x == y and x is not None for x, y in zip(top1[a], top1[b])) / len(paths)
    return {"model": name, "images": len(paths), "versions": results, "agreement": agreement}


def print_compare(report: dict) -> None:
    print(f"{report['model']} on {report['images']} labelled images")
    print(f"{'version':<10} {'accuracy':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for v, r in report["versions"].items():
        print(f"{v:<10} {r['accuracy']:>8.3f} {r['errors']:>6} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")
    print(f"agreement: {report['agreement']:.3f}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=str(ROOT / ".serve"), help="the server's run folder (default: .serve/)")
    p.add_argument("--model-store", default=str(ROOT / "model_store"), help="archives and their catalog (default: model_store/)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of tables (default: off)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])
    sub.add_parser("status", help="served models and versions, default, workers, batching, device; catalogued but not served")
    s = sub.add_parser("register", help="register a catalogued version (sha256-checked) and wait for its workers")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--workers", type=int, default=None, help="initial workers (default: the archive's minWorkers)")
    s = sub.add_parser("promote", help="make a version the default")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--if-better", action="store_true", help="refuse if the version is less accurate than the default on --data (default: off)")
    s.add_argument("--data", default=None, help="labelled image folder for --if-better (default: none)")
    s = sub.add_parser("rollback", help="make the previous default the default again")
    s.add_argument("name")
    s = sub.add_parser("scale", help="set a version's minimum and maximum workers")
    s.add_argument("name")
    s.add_argument("version", nargs="?", default=None, help="(default: the default version)")
    s.add_argument("--min", type=int, required=True, help="minimum workers")
    s.add_argument("--max", type=int, required=True, help="maximum workers")
    s = sub.add_parser("unregister", help="remove a version (not the default while others exist)")
    s.add_argument("name")
    s.add_argument("version")
    s = sub.add_parser("compare", help="accuracy, agreement and latency of two versions on a labelled folder")
    s.add_argument("name")
    s.add_argument("version_a")
    s.add_argument("version_b")
    s.add_argument("--data", required=True, help="labelled image folder (any dataset layout)")
    s.add_argument("--clients", type=int, default=4, help="concurrent requests (default: 4)")
    return p


def run(args, ts: TorchServe, catalog: Catalog) -> tuple[dict, str]:
    """Do the command; returns (JSON result, line for people)."""
    if args.command == "register":
        mar = catalog.checked_archive(args.name, args.version)
        version = ts.register(args.name, mar.name, workers=args.workers)
        if version != args.version:
            raise OpsError(f"{mar.name} declares version {version}, the catalog says {args.version}")
        return ({"registered": args.name, "version": version, "file": mar.name, "default": default_version(ts, args.name)},
                f"registered {args.name} {version} from {mar.name}; default is {default_version(ts, args.name)}")
    if args.command == "promote":
        if args.version not in registered_versions(ts, args.name):
            raise OpsError(f"{args.name} {args.version} is not registered; register it first")
        current = default_version(ts, args.name)
        report = None
        if args.if_better:
            if not args.data:
                raise OpsError("--if-better needs --data DIR, a labelled image folder")
            report = compare(ts, args.name, [current, args.version], Path(args.data))
            old, new = (report["versions"][v]["accuracy"] for v in (current, args.version))
            if new < old:
                raise OpsError(f"not promoting {args.name} {args.version}: accuracy {new:.3f} < {old:.3f} of the default {current}")
        ts.set_default(args.name, args.version)
        return ({"model": args.name, "default": args.version, "previous": current, "compare": report},
                f"{args.name}: default is now {args.version} (was {current})")
    if args.command == "rollback":
        current, previous = ts.rollback(args.name)
        return {"model": args.name, "default": previous, "previous": current}, f"{args.name}: default is back to {previous} (was {current})"
    if args.command == "scale":
        if args.min < 0 or args.max < max(1, args.min):
            raise OpsError(f"need 0 <= --min <= --max and --max >= 1, got --min {args.min} --max {args.max}")
        version = args.version or default_version(ts, args.name)
        ts.scale(args.name, version, args.min, args.max)
        return ({"model": args.name, "version": version, "min_workers": args.min, "max_workers": args.max},
                f"{args.name} {version}: workers {args.min}-{args.max}")
    if args.command == "unregister":
        versions = registered_versions(ts, args.name)
        if args.version not in versions:
            raise OpsError(f"{args.name} {args.version} is not registered (registered: {', '.join(versions)})")
        default = default_version(ts, args.name)
        others = [v for v in versions if v != args.version]
        if args.version == default and others:
            raise OpsError(f"{args.name} {args.version} is the default version; promote another version first "
                           f"(e.g. scripts/models promote {args.name} {others[-1]})")
        ts.unregister(args.name, args.version)
        return {"model": args.name, "unregistered": args.version}, f"unregistered {args.name} {args.version}"
    if args.command == "compare":
        report = compare(ts, args.name, [args.version_a, args.version_b], Path(args.data), args.clients)
        return report, ""
    report = status(ts, catalog)
    return report, ""


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    ts = TorchServe(run_dir=Path(args.run_dir), model_store=Path(args.model_store))
    catalog = Catalog(Path(args.model_store))
    try:
        if not ts.is_running():
            raise ServeError(f"TorchServe is not running from {ts.run_dir}; start it with scripts/serve start")
        result, line = run(args, ts, catalog)
    except (ServeError, CatalogError, OpsError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except requests.RequestException as e:
        print(f"error: TorchServe did not answer: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "status":
        print_status(result)
    elif args.command == "compare":
        print_compare(result)
    else:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
