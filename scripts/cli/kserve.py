"""Write KServe's storage layout and an InferenceService for catalogued model versions.

    scripts/kserve digits:1.0 [photos:2.0 ...] --out kserve-digits [--protocol v2]
        [--default digits:1.0] [--storage-uri pvc://models/kserve-digits] [--name NAME]
        [--gpus 1] [--cpu 2] [--memory 4Gi] [--canary 10] [--model-store model_store]

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
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from model_defs.usage import OneLineParser, UsageError
from scripts.ops.catalog import Catalog, CatalogError
from scripts.ops.kserve_layout import ROOT, inference_service, parse_spec, write_layout


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="scripts/kserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p


def main(argv: list[str] | None = None) -> int:
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
        catalog = Catalog(Path(args.model_store))
        for version in versions:
            catalog.get(*version)
    except (UsageError, CatalogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_layout(Path(args.out), catalog, versions, args.protocol, defaults, isvc, args.force)
    except (UsageError, CatalogError) as e:  # an archive that changed since it was catalogued
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    print(
        f"wrote {args.out}: config/config.properties, model-store/ ({len(versions)} archive(s)), inferenceservice.yaml"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
