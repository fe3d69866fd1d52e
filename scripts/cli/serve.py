"""Start, stop and query TorchServe with the bundle's config.properties.

    scripts/serve start [--models digits,other | all]    # waits until every model is ready; adds to
                                                         # what this run folder served before
    scripts/serve --run-dir .serve-b start --port-offset 100   # a second server: 8180, 8181, ...
    scripts/serve start --engine kserve                  # the same archives on KServe's ModelServer
    scripts/serve start --engine kserve --foreground     # as a container's main process (SIGTERM stops it)
    scripts/serve status
    scripts/serve key [inference|management|API] [--header] [--refresh]
    scripts/serve stop

Each server keeps its state in a run folder (default `.serve/`, created 0700): the
effective config.properties, TorchServe's logs, the pid file, `key_file.json` (the token
keys TorchServe writes at each start; token authorization stays on), the serving record
(`serving.json`: versions, defaults, workers) and what the last start refused
(`refused.json`). Giving each server its own run folder and ports lets several run side
by side: `--port-offset N` moves every port of the config by N, and `--inference-port`
and the others set one each. Every command that takes --run-dir (scripts/serve, models,
predict, top, archive) reads it from $BUNDLE_RUN_DIR when it is not given. `key` and
`status` import no torch: they answer at once.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from model_defs.usage import OneLineParser, UsageError
from scripts.cli.errors import one_line_errors
from scripts.ops.catalog import CatalogError
from scripts.ops.modelserver import ENGINE, ModelServerEngine, engine_of
from scripts.ops.serve import (
    ADDRESS_KEYS,
    GRPC_PORT_KEYS,
    ROOT,
    RUN_DIR_ENV,
    ServeError,
    TorchServe,
    default_run_dir,
    read_properties,
)

PORT_FLAGS = {api: f"--{api.replace('_', '-')}-port" for api in (*ADDRESS_KEYS, *GRPC_PORT_KEYS)}

ENGINES = ("torchserve", ENGINE)


def global_options(defaults: bool) -> argparse.ArgumentParser:
    """--run-dir, --config and --model-store, accepted before or after the subcommand: the
    copy on each subcommand has no defaults, so it only overrides what was given."""
    p = argparse.ArgumentParser(add_help=False)
    d = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    p.add_argument(
        "--run-dir",
        default=d(str(default_run_dir())),
        help=f"folder for the server's config, logs, keys and serving record (default: ${RUN_DIR_ENV} if set, "
        "else .serve/)",
    )
    p.add_argument(
        "--config",
        default=d(str(ROOT / "config.properties")),
        help="TorchServe config to start from (default: config.properties)",
    )
    p.add_argument("--model-store", default=d(None), help="folder of .mar files (default: model_store from the config)")
    return p


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="scripts/serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options(True)],
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = [global_options(False)]
    s = sub.add_parser("start", parents=common, help="start TorchServe and wait until its models are ready")
    s.add_argument(
        "--models",
        default=None,
        help="comma-separated model names to add, each served from <name>.mar; 'all' for every catalogued "
        "version; what this run folder served before is always restored (default: that, else all)",
    )
    s.add_argument(
        "--timeout", type=float, default=180, help="seconds to wait for the models to be ready (default: 180)"
    )
    s.add_argument(
        "--port-offset",
        type=int,
        default=0,
        metavar="N",
        help="add N to every port of --config, to run beside a server on the usual ports (default: 0)",
    )
    for api, flag in PORT_FLAGS.items():
        s.add_argument(
            flag,
            type=int,
            default=None,
            metavar="PORT",
            help=f"the {api.replace('_', ' ')} port (default: the config's, plus --port-offset)",
        )
    s.add_argument(
        "--engine",
        default="torchserve",
        choices=ENGINES,
        help="what serves the archives: TorchServe, or KServe's ModelServer in one Python process with no Java "
        "(docs/engines.md); stop, status and key find the engine of the run folder (default: torchserve)",
    )
    s.add_argument(
        "--foreground",
        action="store_true",
        help="with --engine kserve: become the server (a container's main process), logging to stdout, until "
        "SIGTERM or Ctrl-C (default: off, the server runs in the background and start returns)",
    )
    sub.add_parser("stop", parents=common, help="stop the TorchServe of this run folder")
    sub.add_parser(
        "status", parents=common, help="say whether it runs, where, which models it serves and what it refused"
    )
    k = sub.add_parser(
        "key", parents=common, help="print the current token key, for curl -H 'Authorization: Bearer KEY'"
    )
    k.add_argument(
        "kind",
        nargs="?",
        default="inference",
        choices=("inference", "management", "API"),
        help="which key (default: inference)",
    )
    k.add_argument(
        "--header",
        action="store_true",
        help="print 'Authorization: Bearer KEY', for curl -H @<(scripts/serve key --header) (default: off)",
    )
    k.add_argument(
        "--refresh",
        action="store_true",
        help="get a new key from the running server (TorchServe's token API) first (default: off)",
    )
    return p


def chosen_ports(args, server: TorchServe) -> dict[str, int] | None:
    """The ports `start` was asked for ({api: port}, the APIs `server` listens on), or None to
    use the config's."""
    given = {api: getattr(args, api + "_port") for api in PORT_FLAGS}
    if args.port_offset == 0 and all(port is None for port in given.values()):
        return None
    # The ports of --config itself (not of an earlier start from the run folder), for the APIs
    # this engine listens on.
    as_configured = copy.copy(server)
    as_configured.props = read_properties(server.config_path)
    ports = {}
    for api, (_, port) in as_configured.listen_ports().items():
        ports[api] = given[api] if given[api] is not None else port + args.port_offset
        if not 1 <= ports[api] <= 65535:
            source = PORT_FLAGS[api] if given[api] is not None else f"--port-offset {args.port_offset}"
            raise UsageError(f"{source} gives the {api} API port {ports[api]}; a port is 1 to 65535")
    taken = [p for p in ports.values() if list(ports.values()).count(p) > 1]
    if taken:
        raise UsageError(f"port {taken[0]} is given to two APIs; each needs its own")
    return ports


def command(args) -> int:
    kserve = args.engine == ENGINE if args.command == "start" else engine_of(Path(args.run_dir)) == ENGINE
    ts = (ModelServerEngine if kserve else TorchServe)(
        run_dir=Path(args.run_dir),
        model_store=args.model_store and Path(args.model_store),
        config=Path(args.config),
    )
    if args.command == "start":
        ports = chosen_ports(args, ts)
        if ports is not None:
            ts.set_ports(ports)
        everything = args.models == "all"
        models = None if args.models is None or everything else [m for m in args.models.split(",") if m]
        if models is not None and not models:
            raise UsageError(f"--models {args.models!r} names no model; give names separated by commas, or 'all'")
        if models == ["none"]:  # the old spelling of "restore only"
            models = []
        if args.foreground and not kserve:
            raise UsageError(
                "--foreground runs the kserve engine only (--engine kserve); TorchServe's own is "
                "torchserve --start --foreground"
            )
        if args.foreground:
            ts.start(models, everything=everything, foreground=True)  # returns only if it cannot run
        refused = ts.start(models, timeout=args.timeout, everything=everything)
        for line in refused:
            print(f"refused: {line}", file=sys.stderr)
        where = (
            f"gRPC port {ts.listen_ports()['grpc_inference'][1]}" if kserve else f"management {ts.url('management')}"
        )
        print(
            f"{server_name(kserve)} is serving {', '.join(ts.models()) or 'no models'} at {ts.url('inference')} "
            f"({where}, metrics {ts.url('metrics')})\n"
            f"  its token: {ts.hint('key')}\n  stop it:   {ts.hint('stop')}"
        )
        return 1 if refused else 0
    if args.command == "stop":
        if not ts.stop():
            raise ServeError(f"no {server_name(kserve)} running from {ts.run_dir}{ts.stale_pid_note()}")
        print(f"{server_name(kserve)} stopped")
    elif args.command == "status":
        if not ts.is_running():
            raise ServeError(
                f"{server_name(kserve)} is not running from {ts.run_dir}{ts.stale_pid_note()}; "
                f"start it with {ts.hint('start')}"
            )
        if kserve:
            print(f"running, engine {ENGINE} (ModelServer), pid {ts.pid()}, inference {ts.url('inference')}")
            for name in ts.models():
                for d in ts.versions(name):
                    print(f"  {name} v{d['modelVersion']}{'  (default)' if d['default'] else ''}")
            for line in ts.refused():
                print(f"  refused at start: {line}")
            return 0
        print(f"running, pid {ts.pid()}, inference {ts.url('inference')}, management {ts.url('management')}")
        for name in ts.models():
            for d in ts.versions(name):
                workers = ", ".join(f"{w['id']}:{w['status']}" for w in d.get("workers", []))
                print(f"  {name} v{d.get('modelVersion')}  batch {d.get('batchSize')}  workers [{workers}]")
        for line in ts.refused():
            print(f"  refused at start: {line}")
    elif args.command == "key":
        key = ts.refresh_key(args.kind) if args.refresh else ts.key(args.kind)
        print(f"Authorization: Bearer {key}" if args.header else key)
    return 0


def server_name(kserve: bool) -> str:
    return "ModelServer" if kserve else "TorchServe"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when done, 2 for a usage mistake, 1 when the server or the store refuses;
    each refusal is one line on stderr."""
    args = get_args_parser().parse_args(argv)
    return one_line_errors(lambda: command(args), (ServeError, CatalogError))


if __name__ == "__main__":
    sys.exit(main())
