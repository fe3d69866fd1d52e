"""KServe's storage layout for catalogued model versions: a config.properties with the
`model_snapshot` KServe's TorchServe runtime starts from, the checked .mar files, and an
InferenceService; or, for the bundle's kserve engine, a config.properties for it, the .mar files
with their catalog entries, a ServingRuntime that runs the serving image on that engine and an
InferenceService that names it; and a TorchServe started from a TorchServe layout on this host,
to try it. scripts/kserve is its command line."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import yaml

from model_defs.usage import UsageError
from scripts.ops.catalog import CATALOG_FILE, Catalog
from scripts.ops.serve import ServeError, TorchServe, port_is_free, read_properties

ROOT = Path(__file__).resolve().parents[2]

# The envelope KServe asks TorchServe for (the bundle's handlers read the bodies themselves:
# handlers/kserve_protocol.py); KServe also sets it through TS_SERVICE_ENVELOPE from the protocol.
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


# The kserve engine's config inside the ServingRuntime's container (the image's start command
# reads it from the mounted storage): every interface, the image's metrics list.
ENGINE_PROPERTIES = """\
# Written by scripts/kserve --engine kserve for the bundle's ServingRuntime (storage at /mnt/models).
inference_address=http://0.0.0.0:{http_port}
grpc_inference_address=0.0.0.0
grpc_inference_port={grpc_port}
model_store=/mnt/models/model-store
# The handlers' metrics under TorchServe's names, at /metrics on the inference port.
metrics_config=/etc/torchserve/metrics.yaml
# Keys written in the pod at each start could not be handed to clients: authorization is
# KServe's (ingress, network policy), not the engine's.
disable_token_authorization=true
max_request_size=33554432
"""
HTTP_PORT, GRPC_PORT = 8080, 7070
START = "/opt/bundle/scripts/container_serve.sh"  # the serving image's start command (Containerfile)


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


def serving_runtime(name: str, image: str) -> dict:
    """A ServingRuntime running the serving image on the kserve engine over the mounted storage.
    Both ports are listed: KServe's raw deployment mode gives each a Service port (the gRPC one
    by its name); Knative's serverless mode takes one port per container."""
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": name},
        "spec": {
            "supportedModelFormats": [{"name": "pytorch", "version": "1", "autoSelect": False}],
            "protocolVersions": ["v1", "v2", "grpc-v2"],
            "multiModel": False,
            "containers": [
                {
                    "name": "kserve-container",  # the name KServe merges the predictor's model spec into
                    "image": image,
                    "args": [
                        *(START, "--engine", "kserve"),
                        *("--config", "/mnt/models/config/config.properties"),
                        *("--model-store", "/mnt/models/model-store"),
                    ],
                    "ports": [
                        {"containerPort": HTTP_PORT, "name": "http1", "protocol": "TCP"},
                        {"containerPort": GRPC_PORT, "name": "grpc", "protocol": "TCP"},
                    ],
                }
            ],
        },
    }


def for_runtime(isvc: dict, runtime: str) -> dict:
    """`isvc` served by the ServingRuntime `runtime`, in raw deployment mode (two ports)."""
    isvc = json.loads(json.dumps(isvc))
    isvc["metadata"]["annotations"] = {"serving.kserve.io/deploymentMode": "RawDeployment"}
    isvc["spec"]["predictor"]["model"]["runtime"] = runtime
    return isvc


def write_layout(
    out: Path,
    catalog: Catalog,
    versions: list[tuple[str, str]],
    protocol: str,
    defaults: dict[str, str],
    isvc: dict,
    force: bool = False,
    runtime: dict | None = None,
) -> None:
    """Check every archive, then write the layout in a staging folder and move it into place:
    for KServe's TorchServe runtime, or with `runtime` (a ServingRuntime) for the kserve engine."""
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
        if runtime is None:
            text = PROPERTIES.format(envelope=ENVELOPES[protocol])
            text += "model_snapshot=" + json.dumps(snapshot, separators=(",", ":")) + "\n"
        else:
            # The engine serves what the store's catalog lists, each archive checked against it.
            entries = {f"{n}/{v}": catalog.get(n, v) for n, v in versions}
            body = {"format_version": 1, "archives": dict(sorted(entries.items()))}
            (stage / "model-store" / CATALOG_FILE).write_text(json.dumps(body, indent=2) + "\n")
            text = ENGINE_PROPERTIES.format(http_port=HTTP_PORT, grpc_port=GRPC_PORT)
            (stage / "servingruntime.yaml").write_text(yaml.safe_dump(runtime, sort_keys=False))
        (stage / "config" / "config.properties").write_text(text)
        (stage / "inferenceservice.yaml").write_text(yaml.safe_dump(isvc, sort_keys=False))
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
        stage.mkdir()  # for TemporaryDirectory's clean-up


def layout_run_dir(layout: Path) -> Path:
    """Where a layout served on this host keeps its server's state: beside it, not in it."""
    layout = layout.resolve()
    return layout.parent / f".{layout.name}.serve"


def snapshot_versions(config: Path) -> list[str]:
    """ "name/version" of every model a layout's model_snapshot registers."""
    snapshot = json.loads(read_properties(config).get("model_snapshot", '{"models": {}}'))
    return [f"{name}/{version}" for name, versions in snapshot["models"].items() for version in versions]


def serve_layout(layout: Path, run_dir: Path, port: int | None = None, timeout: float = 240) -> TorchServe:
    """Start TorchServe from a layout scripts/kserve wrote, as KServe's runtime starts it (its
    config.properties: the envelope, the model_snapshot, no token), but on loopback ports: the
    inference API on `port` (default: a free one), every other API on a free one. Returns the
    running TorchServe once every version of the snapshot has a ready worker."""
    layout = layout.resolve()  # TorchServe reads a relative model store from the bundle's root
    config, store = layout / "config" / "config.properties", layout / "model-store"
    if not config.is_file() or not store.is_dir():
        raise UsageError(f"{layout} is not a layout scripts/kserve wrote (no config/config.properties, model-store/)")
    if (layout / "servingruntime.yaml").is_file():
        raise UsageError(
            f"{layout} is for the kserve engine (it has servingruntime.yaml); try its archives here with "
            f"scripts/serve --model-store {layout / 'model-store'} start --engine kserve"
        )
    if port is not None and not (1 <= port <= 65535 and port_is_free("127.0.0.1", port)):
        raise UsageError(f"--port {port} is not a free port on 127.0.0.1; give another, or none for a free one")
    ts = TorchServe(run_dir=run_dir, model_store=store, config=config, ports={"inference": port} if port else {})
    if ts.is_running():
        raise ServeError(f"a layout is already served from {ts.run_dir}; stop it with scripts/kserve stop {layout}")
    ts.start([], timeout=timeout)  # the layout's model_snapshot registers its models
    try:
        ts.wait_ready(snapshot_versions(config), timeout=timeout)
    except ServeError:
        ts.stop()
        raise
    return ts
