"""scripts/kserve: KServe's storage layout from the catalog, and an InferenceService (with
--engine kserve, a ServingRuntime too) that KServe's own CRD schemas accept (checked offline
against trimmed copies in tests/schemas). The kserve engine serving such a layout, started as
the ServingRuntime starts it, is in test_modelserver_foreground.py.
A real TorchServe starting from such a layout is in test_kserve.py (the v2 server)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from scripts.cli import archive, kserve
from scripts.ops.catalog import Catalog, sha256_file
from scripts.ops.serve import ROOT, read_properties

pytestmark = pytest.mark.unit

SCHEMA = yaml.safe_load((Path(__file__).parent / "schemas" / "kserve_inferenceservice_schema.yaml").read_text())
RUNTIME_SCHEMA = yaml.safe_load((Path(__file__).parent / "schemas" / "kserve_servingruntime_schema.yaml").read_text())


@pytest.fixture(scope="module")
def store(digits_run, tmp_path_factory):
    store = tmp_path_factory.mktemp("layout_store")
    assert (
        archive.main(
            [
                str(digits_run),
                "--name",
                "digits",
                "--version",
                "1.0",
                "--model-store",
                str(store),
                "--workers",
                "2",
                "--batch-size",
                "4",
                "--max-batch-delay",
                "50",
            ]
        )
        == 0
    )
    assert (
        archive.main(
            [
                str(digits_run),
                "--name",
                "digits",
                "--version",
                "2.0",
                "--model-store",
                str(store),
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    return store


def test_layout_from_the_catalog(store, tmp_path):
    out = tmp_path / "kserve"
    assert (
        kserve.main(
            [
                "digits:1.0",
                "digits:2.0",
                "--default",
                "digits:2.0",
                "--out",
                str(out),
                "--model-store",
                str(store),
                "--protocol",
                "v1",
                "--gpus",
                "1",
                "--canary",
                "10",
            ]
        )
        == 0
    )
    props = read_properties(out / "config" / "config.properties")
    assert props["model_store"] == "/mnt/models/model-store" and props["service_envelope"] == "kserve"
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "true"
    snapshot = json.loads(props["model_snapshot"])
    versions = snapshot["models"]["digits"]
    assert snapshot["modelCount"] == 2 and set(versions) == {"1.0", "2.0"}
    assert versions["2.0"]["defaultVersion"] and not versions["1.0"]["defaultVersion"]
    assert (versions["1.0"]["minWorkers"], versions["1.0"]["batchSize"], versions["1.0"]["maxBatchDelay"]) == (2, 4, 50)
    assert versions["2.0"]["batchSize"] == 8
    catalog = Catalog(store)
    for version, info in versions.items():
        copied = out / "model-store" / info["marName"]
        assert sha256_file(copied) == catalog.get("digits", version)["sha256"]
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    jsonschema.validate(isvc, SCHEMA)
    predictor = isvc["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["model"]["protocolVersion"] == "v1" and predictor["model"]["modelFormat"]["name"] == "pytorch"
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_schema_catches_what_kserve_would_refuse_or_drop():
    isvc = kserve.inference_service(
        "digits", "v2", "pvc://x/y", gpus=0, cpu="1", memory="1Gi", canary=None, min_replicas=1, max_replicas=2
    )
    jsonschema.validate(isvc, SCHEMA)
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert "nvidia.com/gpu" not in isvc["spec"]["predictor"]["model"]["resources"]["limits"]
    for broken in (
        {**isvc, "metadata": {"name": "Digits_1"}},
        {**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "canaryTrafic": 5}}},
        {**isvc, "spec": {"predictor": {"model": {"protocolVersion": "v2"}, "minReplicas": "one"}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)


@pytest.mark.parametrize(
    "args, message",
    [
        (["digits"], "must be NAME:VERSION"),
        (["digits:9.9"], "digits/9.9 is not in"),
        (["digits:1.0", "--default", "digits:2.0"], "not among the versions listed"),
        (["digits:1.0", "--canary", "150"], "--canary must be"),
        (["digits:1.0", "--name", "Digits_v1"], "DNS-1035"),
        (["digits:1.0", "digits:2.0", "--engine", "kserve"], "one version per model"),
        (["digits:1.0", "--image", "registry.example.com/bundle:1"], "goes with --engine kserve"),
    ],
)
def test_mistakes_get_one_line_and_write_nothing(store, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert kserve.main([*args, "--out", str(out), "--model-store", str(store)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_a_changed_archive_is_refused(store, tmp_path, capsys):
    victim = tmp_path / "store"
    victim.mkdir()
    for f in store.iterdir():
        if f.is_file():
            (victim / f.name).write_bytes(f.read_bytes())
    mar = victim / Catalog(victim).get("digits", "2.0")["file"]
    mar.write_bytes(mar.read_bytes() + b"\0")
    out = tmp_path / "out"
    assert kserve.main(["digits:1.0", "digits:2.0", "--out", str(out), "--model-store", str(victim)]) == 1
    assert "sha256" in capsys.readouterr().err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no staging left behind


def test_serving_what_is_not_a_layout_or_stopping_what_is_not_served_is_one_line(tmp_path, capsys):
    assert kserve.main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a layout scripts/kserve wrote" in err and err.count("\n") == 1
    assert kserve.main(["stop", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is not being served" in err and err.count("\n") == 1
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.serve"))


def test_kserve_engine_layout_has_a_serving_runtime_and_an_inference_service_naming_it(store, tmp_path, capsys):
    out = tmp_path / "kserve"
    image = "registry.example.com/cv-bundle:1.4"
    args = ["digits:2.0", "--engine", "kserve", "--image", image, "--name", "digits-ms", "--protocol", "v1"]
    assert kserve.main([*args, "--out", str(out), "--model-store", str(store)]) == 0
    runtime = yaml.safe_load((out / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    jsonschema.validate(runtime, RUNTIME_SCHEMA)
    jsonschema.validate(isvc, SCHEMA)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] == "digits-ms-modelserver"
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["image"] == image
    # The image's own start command, the engine by one argument, the mounted storage's config and store.
    steps = [line.split(None, 1) for line in (ROOT / "Containerfile").read_text().splitlines() if line[:4] == "CMD "]
    assert container["args"][0] == json.loads(steps[-1][1])[0]
    flags = dict(zip(container["args"][1::2], container["args"][2::2]))
    props = read_properties(out / "config" / "config.properties")
    assert flags["--engine"] == "kserve" and flags["--config"] == "/mnt/models/config/config.properties"
    assert flags["--model-store"] == props["model_store"] == "/mnt/models/model-store"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert props["inference_address"] == f"http://0.0.0.0:{ports['http1']}"
    assert (props["grpc_inference_address"], int(props["grpc_inference_port"])) == ("0.0.0.0", ports["grpc"])
    assert props["disable_token_authorization"] == "true" and "model_snapshot" not in props
    # The engine serves what the store's catalog lists: the one version asked for, its archive unchanged.
    listed = Catalog(out / "model-store").load()
    assert list(listed) == ["digits/2.0"] and listed["digits/2.0"] == Catalog(store).get("digits", "2.0")
    assert sha256_file(out / "model-store" / listed["digits/2.0"]["file"]) == listed["digits/2.0"]["sha256"]
    assert kserve.main(["serve", str(out)]) == 2  # a TorchServe layout's command: one line naming the other
    assert "is for the kserve engine" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "model-store").iterdir()) == sorted(
        ["catalog.json", listed["digits/2.0"]["file"]]
    )


def test_runtime_schema_catches_what_kserve_would_refuse_or_drop():
    runtime = kserve.serving_runtime("digits-modelserver", "registry.example.com/cv-bundle:1.4")
    jsonschema.validate(runtime, RUNTIME_SCHEMA)
    (container,) = runtime["spec"]["containers"]
    for broken in (
        {**runtime, "metadata": {"name": "Digits_Runtime"}},
        {**runtime, "spec": {**runtime["spec"], "supportedModelFormat": [{"name": "pytorch"}]}},
        {**runtime, "spec": {**runtime["spec"], "multiModel": "no"}},
        {**runtime, "spec": {**runtime["spec"], "containers": [{**container, "arguments": ["x"]}]}},
        {**runtime, "spec": {**runtime["spec"], "containers": [{**container, "ports": [{"name": "http1"}]}]}},
        {**runtime, "spec": {"protocolVersions": ["v2"]}},  # no containers
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, RUNTIME_SCHEMA)
