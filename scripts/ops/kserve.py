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
import json
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.ops.catalog import Catalog, CatalogError  # noqa: E402

# The envelope KServe asks TorchServe for (the bundle's handlers read the bodies themselves:
# handlers/kserve.py); KServe also sets it through TS_SERVICE_ENVELOPE from the protocol.
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}
PROPERTIES = """\
# Written by scripts/kserve for KServe's TorchServe runtime (storage mounted at /mnt/models).
inference_address=http://0.0.0.0:8085
management_address=http://0.0.0.0:8085
metrics_address=http://0.0.0.0:8082
grpc_inference_port=7070
grpc_management_port=7071
enable_metrics_api=true
metrics_mode=prometheus
enable_envvars_config=true
install_py_dep_per_model=false
model_store=/mnt/models/model-store
service_envelope={envelope}
# Inside the cluster TorchServe's rotating keys cannot be handed to clients: authorization is
# KServe's (ingress, network policy), not TorchServe's.
disable_token_authorization=true
# TorchServe 0.12 turns the management API off by default; KServe's tooling and scale-outs use it.
enable_model_api=true
max_request_size=33554432
"""


class UsageError(ValueError):
    """A wrong argument: one line, exit 2."""


def parse_spec(spec: str) -> tuple[str, str]:
    name, sep, version = spec.partition(":")
    if not sep or not name or not version:
        raise UsageError(f"model version {spec!r} must be NAME:VERSION, e.g. digits:1.0")
    return name, version


def archive_config(mar: Path) -> dict:
    """Workers and batching an archive declares in its model-config.yaml."""
    with zipfile.ZipFile(mar) as z:
        config = yaml.safe_load(z.read("model-config.yaml")) if "model-config.yaml" in z.namelist() else {}
    workers = int(config.get("minWorkers", 1))
    return {
        "minWorkers": workers,
        "maxWorkers": int(config.get("maxWorkers", workers)),
        "batchSize": int(config.get("batchSize", 1)),
        "maxBatchDelay": int(config.get("maxBatchDelay", 100)),
        "responseTimeout": int(config.get("responseTimeout", 120)),
    }


def model_snapshot(catalog: Catalog, versions: list[tuple[str, str]], defaults: dict[str, str]) -> dict:
    models: dict[str, dict] = {}
    for name, version in versions:
        entry = catalog.get(name, version)
        mar = catalog.store / entry["file"]
        models.setdefault(name, {})[version] = {
            "defaultVersion": defaults[name] == version,
            "marName": entry["file"],
            **archive_config(mar),
        }
    return {"name": "startup.cfg", "modelCount": sum(len(v) for v in models.values()), "models": models}


def inference_service(
    name: str,
    protocol: str,
    storage_uri: str,
    *,
    gpus: int,
    cpu: str,
    memory: str,
    canary: int | None,
    min_replicas: int,
    max_replicas: int,
) -> dict:
    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus
        resources["requests"]["nvidia.com/gpu"] = gpus
    predictor = {"minReplicas": min_replicas, "maxReplicas": max_replicas}
    if canary is not None:
        predictor["canaryTrafficPercent"] = canary
    predictor["model"] = {
        "modelFormat": {"name": "pytorch"},
        "protocolVersion": protocol,
        "storageUri": storage_uri,
        "resources": resources,
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"predictor": predictor},
    }


def write_layout(
    out: Path,
    catalog: Catalog,
    versions: list[tuple[str, str]],
    protocol: str,
    defaults: dict[str, str],
    isvc: dict,
    force: bool = False,
) -> None:
    """Check every archive, then write the layout in a staging folder and move it into place."""
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty; choose another --out or pass --force")
    snapshot = model_snapshot(catalog, versions, defaults)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        stage = Path(tmp)
        (stage / "config").mkdir()
        (stage / "model-store").mkdir()
        for name, version in versions:
            mar = catalog.checked_archive(name, version)  # CatalogError: changed since catalogued
            shutil.copy2(mar, stage / "model-store" / mar.name)
        text = PROPERTIES.format(envelope=ENVELOPES[protocol])
        text += "model_snapshot=" + json.dumps(snapshot, separators=(",", ":")) + "\n"
        (stage / "config" / "config.properties").write_text(text)
        (stage / "inferenceservice.yaml").write_text(yaml.safe_dump(isvc, sort_keys=False))
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
        stage.mkdir()  # for TemporaryDirectory's clean-up


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/kserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
