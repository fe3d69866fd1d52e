"""The Containerfile and scripts/image, checked statically: the normal suite builds no image
(CI has no buildah and the torch install alone is 5.5 GB); tests/test_image.py builds and runs
it under `./scripts/test.sh --image`."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from scripts.ops.serve import ROOT, read_properties

pytestmark = pytest.mark.unit

pytestmark = pytest.mark.unit

CONTAINERFILE = (ROOT / "Containerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE)
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_base_is_a_build_argument_defaulting_to_python_slim():
    steps = instructions()
    assert steps[0] == ("ARG", "BASE=python:3.11-slim-bookworm") and steps[1] == ("FROM", "${BASE}")


def test_serving_pins_come_from_requirements():
    """The image installs the exact pins of requirements.txt its grep selects, torch among them."""
    (run,) = [arg for op, arg in instructions() if op == "RUN" and "pip install" in arg]
    pattern = re.search(r"grep -E '([^']+)'", run).group(1)
    picked = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if re.match(pattern, line)]
    names = {line.split("==")[0] for line in picked}
    assert {"torch", "torchvision", "torchserve", "pyyaml", "pillow"} <= names
    assert all(re.fullmatch(r"[\w.-]+==[\w.+]+", line) for line in picked)


def test_java_non_root_user_and_healthcheck_on_the_inference_port():
    steps = instructions()
    assert any(op == "RUN" and "openjdk-17-jre-headless" in arg for op, arg in steps)
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    ops = [op for op, _ in steps]
    assert ops.index("USER") < ops.index("CMD")
    (check,) = [arg for op, arg in steps if op == "HEALTHCHECK"]
    (copy,) = [arg for op, arg in steps if op == "COPY" and "config.properties" in arg]
    src, dest = copy.split()
    props = read_properties(ROOT / src)
    port = props["inference_address"].rsplit(":", 1)[1]
    assert props["inference_address"].startswith("http://0.0.0.0") and f"127.0.0.1:{port}/ping" in check
    assert props["disable_token_authorization"] == "true"  # /ping needs no key: the documented posture
    assert f"--ts-config {dest}" in " ".join(json.loads(dict(steps)["CMD"]))
    assert props["model_store"] == "/models" and any(op == "COPY" and arg.endswith(" /models/") for op, arg in steps)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["frob"], {}, "command must be base, build or run"),
        (["run", "--base", "x"], {}, "unknown option '--base' for run"),
        (["run", "--config", "/nonexistent.properties"], {}, "--config /nonexistent.properties: no such file"),
        (["build", "--store", "/nonexistent"], {}, "--store /nonexistent: no such folder"),
        (["build", "--bogus"], {}, "unknown option '--bogus'"),
        (["run", "--port", "http"], {}, "--port must be a number"),
        (["build"], {"IMAGE_TOOL": "kaniko"}, "is not docker, podman or buildah"),
    ],
)
def test_image_script_mistakes_get_one_line(args, env, message):
    r = subprocess.run(
        [str(ROOT / "scripts" / "image"), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=30
    )
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1
