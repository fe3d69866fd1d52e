"""What each served version is doing now, refreshing like top: read from /metrics and the
management API only, so it shows what a Prometheus scraping the server would see.

    scripts/top                    # refreshes every 2 s; Ctrl-C to leave
    scripts/top --interval 5
    scripts/top --json             # one snapshot (two scrapes --interval apart), for machines

Per served version, over the last interval:
- req/s and err%: items the handler answered and refused (handler_items_*_total), so
  requests the frontend turned away before any worker saw them are not in them;
- e2e ms: the mean time from the frontend receiving a request to sending its answer, as
  clients see it less the network (the frontend's ts_inference_latency_microseconds /
  ts_inference_requests_total; TorchServe keeps no percentiles of it);
- handler p50 / p99 ms: of the handler's time per batch (handler_batch_seconds), interpolated
  in the histogram's buckets the way Prometheus's histogram_quantile does; a batch's time
  is part of the latency of each of its requests, not a request's latency;
- queue ms: mean time requests waited for a worker (ts_queue_latency_microseconds);
- workers: READY / all, from the management API; restarts: workers that died and were
  started again since the server started (a worker slot started more than once); scaled
  down: workers stopped by a scale-down (slots that no longer have a worker).
TorchServe labels the requests that name no version model_version="default" in its own
counters: they are counted for the version that is the default when the scrape is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

from model_defs.usage import OneLineParser
from scripts.ops.serve import RUN_DIR_HELP, ServeError, TorchServe, default_run_dir
from scripts.ops.top import snapshot


def table(snap: dict) -> str:
    def show(x, fmt="{}"):
        return "-" if x is None else fmt.format(x)

    rows = [
        (
            "model",
            "version",
            "req/s",
            "err%",
            "e2e ms",
            "handler p50",
            "handler p99",
            "queue ms",
            "workers",
            "restarts",
            "scaled down",
        )
    ]
    for r in snap["versions"]:
        rows.append(
            (
                r["model"],
                r["version"] + ("*" if r["default"] else ""),
                f"{r['requests_per_s']:.1f}",
                show(None if r["error_ratio"] is None else r["error_ratio"] * 100, "{:.1f}"),
                show(r["e2e_ms"]),
                show(r["p50_ms"]),
                show(r["p99_ms"]),
                show(r["queue_ms"]),
                f"{r['workers_ready']}/{r['workers']}",
                str(r["restarts"]),
                str(r["scaled_down"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    legend = "e2e: mean per request, frontend in to answer out; handler: per batch, in ms"
    return f"scripts/top  {stamp}  over {snap['seconds']:.1f} s  (* default version; {legend})\n" + "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="scripts/top", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=str(default_run_dir()), help=RUN_DIR_HELP)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.interval <= 0:
        print(f"error: --interval must be a positive number of seconds, got {args.interval:g}", file=sys.stderr)
        return 2
    ts = TorchServe(run_dir=Path(args.run_dir))
    last = None
    try:
        if not ts.is_running():
            raise ServeError(f"TorchServe is not running from {ts.run_dir}; start it with {ts.hint('start')}")
        while True:
            snap, last = snapshot(ts, last, args.interval)
            if args.json:
                print(json.dumps(snap, indent=2))
                return 0
            print("\033[H\033[2J" + table(snap), flush=True)
            time.sleep(args.interval)
    except (ServeError, requests.RequestException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
