"""The Kubernetes manifests (k8s/): each overlay rendered and every object validated against
the Kubernetes schemas offline (kubernetes-validate), and the probes' posture checked on a real
TorchServe started with the ConfigMap's config.properties. No cluster runs here: scheduling,
GPUs and the NetworkPolicy's enforcement are not tested."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from scripts.cli import archive
from scripts.ops.serve import ROOT, TorchServe, read_properties

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

K8S = ROOT / "k8s"
OVERLAYS = ["cpu", "gpu"]
K8S_VERSION = "1.37.0"
KINDS = {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}


def merge(target: dict, patch: dict) -> None:
    """A strategic merge patch as kustomize applies ours: maps merge, lists of named items
    merge by name, other lists are replaced."""
    for key, value in patch.items():
        old = target.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merge(old, value)
        elif (
            isinstance(old, list)
            and isinstance(value, list)
            and all(isinstance(x, dict) and "name" in x for x in old + value)
        ):
            by_name = {x["name"]: x for x in old}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    old.append(item)
        else:
            target[key] = value


def render(folder: Path) -> list[dict]:
    """kustomize build, in Python, for what k8s/ uses: resources, configMapGenerator, patches, images, labels."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects = []
    for resource in k.get("resources", []):
        path = folder / resource
        objects += render(path) if path.is_dir() else [o for o in yaml.safe_load_all(path.read_text()) if o]
    for generator in k.get("configMapGenerator", []):
        data = {Path(f).name: (folder / f).read_text() for f in generator["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for patch in k.get("patches", []):
        body = yaml.safe_load((folder / patch["path"]).read_text())
        target = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (body["kind"], body["metadata"]["name"])]
        assert len(target) == 1, f"patch {patch['path']} matches {len(target)} objects"
        merge(target[0], body)
    for image in k.get("images", []):
        for c in containers(objects):
            if c["image"].split(":")[0] == image["name"]:
                c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for label in k.get("labels", []):
        for o in objects:
            o["metadata"].setdefault("labels", {}).update(label["pairs"])
    return objects


def containers(objects: list[dict]) -> list[dict]:
    return [c for o in objects if o["kind"] == "Deployment" for c in o["spec"]["template"]["spec"]["containers"]]


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_kubernetes_schemas(overlay):
    objects = render(K8S / "overlays" / overlay)
    assert {o["kind"] for o in objects} == KINDS
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_a_wrong_field_fails_validation():
    deployment = by_kind(render(K8S / "overlays" / "cpu"))["Deployment"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo strict mode catches
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_overlays_differ_where_they_should():
    cpu, gpu = (by_kind(render(K8S / "overlays" / o)) for o in OVERLAYS)
    (cpu_c,), (gpu_c,) = (
        cpu["Deployment"]["spec"]["template"]["spec"]["containers"],
        gpu["Deployment"]["spec"]["template"]["spec"]["containers"],
    )
    assert "nvidia.com/gpu" not in cpu_c["resources"]["limits"]
    assert gpu_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_c["image"].endswith("-cuda") and cpu_c["image"].endswith("-cpu")
    # the patch merged into the base container, it did not replace its probes or mounts
    assert gpu_c["readinessProbe"] == cpu_c["readinessProbe"] and gpu_c["volumeMounts"] == cpu_c["volumeMounts"]
    assert gpu["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_refer_to_each_other(overlay):
    o = by_kind(render(K8S / "overlays" / overlay))
    deployment, pod = o["Deployment"], o["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (
        o["Service"]["spec"]["selector"],
        o["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        o["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert o["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert all(p["targetPort"] in ports for p in o["Service"]["spec"]["ports"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == o["ConfigMap"]["metadata"]["name"]
    # The probes ask /ping on TorchServe's inference port, which answers them without a key
    # only because token authorization is off in the ConfigMap (the documented posture).
    props = dict(
        line.split("=", 1)
        for line in o["ConfigMap"]["data"]["config.properties"].splitlines()
        if line and not line.startswith("#")
    )
    assert props["inference_address"].endswith(f":{ports['http']}")
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "false"
    assert props["management_address"].startswith("http://127.0.0.1")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "http"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here: the Python render stands alone")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_render_equals_kubectl_kustomize(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(render(K8S / "overlays" / overlay), key=key) == sorted(yaml.safe_load_all(out), key=key)


def test_probe_posture_on_a_real_torchserve(trained_digits, digits_dir, tmp_path):
    """TorchServe with the ConfigMap's config.properties (ports moved to free loopback ones, the
    image's metrics.yaml read from monitoring/): /ping and predictions answer without a key,
    registering a model is refused, and /metrics carries the handlers' metrics."""
    store = tmp_path / "models"
    assert archive.main([str(trained_digits), "--name", "digits", "--model-store", str(store)]) == 0
    config = tmp_path / "config.properties"
    text = by_kind(render(K8S / "base"))["ConfigMap"]["data"]["config.properties"]
    assert "metrics_config=/etc/torchserve/metrics.yaml" in text.splitlines()
    config.write_text(text.replace("/etc/torchserve/metrics.yaml", str(ROOT / "monitoring" / "metrics.yaml")))
    assert read_properties(config)["load_models"] == "all"
    ts = TorchServe(run_dir=tmp_path / "run", model_store=store, config=config, ports={})
    try:
        ts.start([], timeout=240)  # load_models=all registers the store's archives
        ts.wait_ready(["digits"], timeout=240)
        assert not ts.key_file.exists()
        r = requests.get(f"{ts.url('inference')}/ping", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "Healthy"
        image = next((digits_dir / "test").rglob("*.png")).read_bytes()
        r = requests.post(f"{ts.url('inference')}/predictions/digits", data=image, timeout=60)
        assert r.status_code == 200 and len(r.json()) == 5
        metrics = requests.get(f"{ts.url('metrics')}/metrics", timeout=30).text
        assert "handler_items_answered_total{" in metrics and 'model_name="digits"' in metrics
        r = requests.post(
            f"{ts.url('management')}/models", params={"url": "digits.mar", "model_name": "again"}, timeout=30
        )
        assert r.status_code >= 400
    finally:
        ts.stop()
