"""Write KServe's storage layout and an InferenceService for catalogued model versions.

    scripts/kserve digits:1.0 [photos:2.0 ...] --out kserve-digits [--protocol v2]
        [--default digits:1.0] [--storage-uri pvc://models/kserve-digits] [--name NAME]
        [--gpus 1] [--cpu 2] [--memory 4Gi] [--canary 10] [--model-store model_store]
        [--engine kserve --image IMAGE]

KServe's TorchServe runtime (ClusterServingRuntime kserve-torchserve) mounts the storage URI at
/mnt/models and runs `torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties`. This writes, under --out:
- config/config.properties: `model_snapshot` from the catalog and each archive's own
  model-config.yaml (workers, batching, which version is the default), the KServe ports, and
  `disable_token_authorization=true` (TorchServe writes new keys in the pod at each start where
  no client can read them; KServe's ingress and the cluster's network policy guard the service)
  with `enable_model_api=true` (TorchServe 0.12 turns the management API off by default);
- model-store/: the .mar files, each checked against the catalog's sha256 first;
- inferenceservice.yaml: modelFormat pytorch, the protocol, resources (nvidia.com/gpu with
  --gpus), canaryTrafficPercent with --canary (the new revision takes that share of traffic).
Copy --out to the storage URI (e.g. `gsutil cp -r`, `aws s3 cp --recursive`, a PVC), then
`kubectl apply -f OUT/inferenceservice.yaml`.

With --engine kserve the layout is for the bundle's serving image on its kserve engine (KServe's
ModelServer, docs/engines.md) instead of KServe's TorchServe runtime:
- config/config.properties: the engine's ports (8080 HTTP, 7070 gRPC) on every interface,
  /mnt/models/model-store as its store, `disable_token_authorization=true`;
- model-store/: the .mar files and a catalog.json with their entries (the engine serves what it
  lists, each archive checked against its sha256); one version per model;
- servingruntime.yaml: a ServingRuntime NAME-modelserver whose container is --image, started as
  `container_serve.sh --engine kserve` on /mnt/models, ports 8080 (http1) and 7070 (grpc);
- inferenceservice.yaml: as above, with predictor.model.runtime naming that ServingRuntime and
  the raw deployment mode (Knative's serverless mode takes one port per container).
`kubectl apply -f OUT/servingruntime.yaml -f OUT/inferenceservice.yaml` once --out is at the
storage URI.

To try a layout on this host first, as KServe's runtime would start it (its envelope, its
model_snapshot, no token) but on loopback ports that clash with no other server:

    scripts/kserve serve kserve-digits [--port 8085]
    scripts/kserve stop kserve-digits

The server's run folder (config, logs, pid) is `.kserve-digits.serve` beside the layout,
never inside it (the layout is what gets copied to the storage URI).

`serve` waits until every model of the snapshot is ready and prints the addresses; the
inference API listens on --port (default: a free port), every other API on a free port.
Client examples for both protocols: docs/clients.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from model_defs.usage import OneLineParser, UsageError
from scripts.ops.catalog import Catalog, CatalogError
from scripts.ops.kserve_layout import (
    ENVELOPES,
    ROOT,
    for_runtime,
    inference_service,
    layout_run_dir,
    parse_spec,
    serve_layout,
    serving_runtime,
    snapshot_versions,
    write_layout,
)
from scripts.ops.serve import ServeError, TorchServe, read_properties

IMAGE = "localhost/torchserve-bundle:latest"  # scripts/image build's default tag


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="scripts/kserve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scripts/kserve serve --help and scripts/kserve stop --help: a layout on this host",
    )
    p.add_argument("versions", nargs="+", metavar="NAME:VERSION", help="catalogued model versions to serve")
    p.add_argument("--out", required=True, help="folder to write the layout into (copied to the storage URI)")
    p.add_argument("--protocol", choices=("v1", "v2"), default="v2", help="KServe protocol (default: v2)")
    p.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="NAME:VERSION",
        help="a model's default version (default: the first listed for each model)",
    )
    p.add_argument("--name", help="InferenceService name (default: the first model's name)")
    p.add_argument("--storage-uri", help="where the layout is copied (default: pvc://kserve-models/<name>)")
    p.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu per replica (default: 0)")
    p.add_argument("--cpu", default="1", help="CPU request and limit per replica (default: 1)")
    p.add_argument("--memory", default="2Gi", help="memory request and limit per replica (default: 2Gi)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument(
        "--canary",
        type=int,
        metavar="PERCENT",
        help="roll this out as a canary: the new revision takes PERCENT of the traffic",
    )
    p.add_argument(
        "--model-store", default=str(ROOT / "model_store"), help="the catalogued store (default: model_store/)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--engine",
        choices=("torchserve", "kserve"),
        default="torchserve",
        help="what serves the layout in the cluster: KServe's TorchServe runtime, or the serving image on the "
        "bundle's kserve engine through a ServingRuntime written beside the InferenceService (default: torchserve)",
    )
    p.add_argument(
        "--image",
        default=IMAGE,
        help=f"with --engine kserve: the image (scripts/image build) its ServingRuntime runs (default: {IMAGE})",
    )
    return p


LOCAL = ("serve", "stop")


def get_local_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="scripts/kserve",
        description="Serve a layout scripts/kserve wrote on this host, as KServe would, or stop it.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start TorchServe from a layout and wait until its models are ready")
    s.add_argument("layout", help="the folder scripts/kserve ... --out wrote")
    s.add_argument("--port", type=int, default=None, help="the inference API's port (default: a free port)")
    s.add_argument("--timeout", type=float, default=240, help="seconds to wait for the models (default: 240)")
    t = sub.add_parser("stop", help="stop the TorchServe serving a layout")
    t.add_argument("layout", help="the layout's folder")
    for q in (s, t):
        q.add_argument(
            "--run-dir",
            default=None,
            help="the server's run folder: config, logs, pid (default: .LAYOUT.serve beside the layout)",
        )
    return p


def local(argv: list[str]) -> int:
    """scripts/kserve serve|stop: exit 0 when done, 2 for a usage mistake, 1 when TorchServe refuses."""
    args = get_local_parser().parse_args(argv)
    layout = Path(args.layout)
    run_dir = Path(args.run_dir) if args.run_dir else layout_run_dir(layout)
    stop = f"scripts/kserve stop {layout}" + (f" --run-dir {args.run_dir}" if args.run_dir else "")
    try:
        if args.command == "stop":
            if not TorchServe(run_dir=run_dir).stop():
                raise ServeError(f"{layout} is not being served (nothing runs from {run_dir.resolve()})")
            print("stopped")
            return 0
        ts = serve_layout(layout, run_dir, args.port, args.timeout)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServeError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    props = read_properties(layout / "config" / "config.properties")
    envelope = props.get("service_envelope", "none")
    protocol = next((v for v, e in ENVELOPES.items() if e == envelope), envelope)
    inference = ts.url("inference")
    print(
        f"serving {layout} ({', '.join(snapshot_versions(layout / 'config' / 'config.properties'))}) as KServe would:"
    )
    print(f"  envelope {envelope} (protocol {protocol}), the layout's model_snapshot, no token")
    print(f"  v1: {inference}/v1/models/NAME:predict   v2: {inference}/v2/models/NAME/infer")
    print(f"  tritonclient.http: InferenceServerClient({inference.removeprefix('http://')!r})")
    print(f"  management {ts.url('management')}, metrics {ts.url('metrics')}")
    print(f"  stop it: {stop}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LOCAL:
        return local(argv)
    args = get_args_parser().parse_args(argv)
    try:
        versions = [parse_spec(s) for s in args.versions]
        if len(set(versions)) != len(versions):
            raise UsageError("a model version is listed twice")
        defaults: dict[str, str] = {}
        for name, version in versions:
            defaults.setdefault(name, version)
        for name, version in map(parse_spec, args.default):
            if (name, version) not in versions:
                raise UsageError(f"--default {name}:{version} is not among the versions listed")
            defaults[name] = version
        if args.canary is not None and not 0 <= args.canary <= 100:
            raise UsageError(f"--canary must be a percentage from 0 to 100, got {args.canary}")
        if args.gpus < 0 or not 1 <= args.min_replicas <= args.max_replicas:
            raise UsageError("--gpus must be >= 0 and 1 <= --min-replicas <= --max-replicas")
        name = args.name or versions[0][0]
        isvc = inference_service(
            name,
            args.protocol,
            args.storage_uri or f"pvc://kserve-models/{name}",
            gpus=args.gpus,
            cpu=args.cpu,
            memory=args.memory,
            canary=args.canary,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
        )
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise UsageError(
                f"InferenceService name {name!r} must be lower-case letters, digits and '-' "
                "(a DNS-1035 label); give one with --name"
            )
        runtime = None
        if args.engine == "kserve":
            several = sorted({n for n, _ in versions if sum(m == n for m, _ in versions) > 1})
            if several:
                raise UsageError(
                    f"--engine kserve serves one version per model, and {several[0]} is listed twice; "
                    "list one version of it, or use --engine torchserve"
                )
            runtime = serving_runtime(f"{name}-modelserver", args.image)
            if len(runtime["metadata"]["name"]) > 63:
                raise UsageError(f"InferenceService name {name!r} is too long for {name}-modelserver; give --name")
            isvc = for_runtime(isvc, runtime["metadata"]["name"])
        elif args.image != IMAGE:
            raise UsageError("--image is the ServingRuntime's image: it goes with --engine kserve")
        catalog = Catalog(Path(args.model_store))
        for version in versions:
            catalog.get(*version)
    except (UsageError, CatalogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_layout(Path(args.out), catalog, versions, args.protocol, defaults, isvc, args.force, runtime)
    except (UsageError, CatalogError) as e:  # an archive that changed since it was catalogued
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    runtime_file = ", servingruntime.yaml" if runtime else ""
    print(
        f"wrote {args.out}: config/config.properties, model-store/ ({len(versions)} archive(s)), "
        f"inferenceservice.yaml{runtime_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
