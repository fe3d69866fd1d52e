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

CONTAINERFILE = (ROOT / "Containerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE)
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_base_is_a_build_argument_defaulting_to_python_slim():
    steps = instructions()
    assert steps[0] == ("ARG", "BASE=python:3.11-slim-bookworm") and steps[1] == ("FROM", "${BASE}")


def locked(path) -> dict[str, str]:
    return dict(re.findall(r"^([\w.-]+)==(\S+)", path.read_text(), flags=re.M))


def test_image_installs_the_serve_lock_whole():
    """The image installs requirements/serve.txt as it is (no pin picked out of it), and that lock
    holds every import a handler can make, explanations included, at the versions of the full lock."""
    (copy,) = [arg for op, arg in instructions() if op == "COPY" and "requirements/" in arg]
    (run,) = [arg for op, arg in instructions() if op == "RUN" and "pip install" in arg]
    assert copy.split()[0] == "requirements/serve.txt" and f"-r {copy.split()[1]}" in run and "grep" not in run
    serve, dev = locked(ROOT / "requirements" / "serve.txt"), locked(ROOT / "requirements" / "dev.txt")
    assert "torchserve" in serve and "kserve" in serve and {name: dev[name] for name in serve} == serve
    assert handler_distributions() <= {name.lower() for name in serve}


def handler_distributions() -> set[str]:
    """The distributions behind every module that code inside a .mar (handlers/, model_defs/)
    imports, at the top of a file or inside a function, the standard library and the bundle aside."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    found = set()
    for path in [*(ROOT / "handlers").glob("*.py"), *(ROOT / "model_defs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top not in ("handlers", "model_defs", "ts"):
                    found.update(d.lower() for d in owners[top])
    assert {"torch", "captum", "matplotlib"} <= found  # the walk sees imports inside functions too
    return found


def test_locks_follow_pyproject():
    """Every pin of pyproject.toml's groups is in the full lock at the same version (scripts/lock
    compiles it; a pin changed without a new lock fails here)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for group in project["optional-dependencies"].values() for d in group)]
    dev = {name.lower().replace("_", "-"): v for name, v in locked(ROOT / "requirements" / "dev.txt").items()}
    for requirement in declared:
        name, pin = re.match(r"([\w.-]+)(?:\[[\w,]+\])?==(\S+)", requirement).groups()
        assert dev.get(name.lower().replace("_", "-")) == pin, requirement


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
    (start,) = json.loads(dict(steps)["CMD"])
    assert start == "/opt/bundle/scripts/container_serve.sh"
    assert f"config={dest}" in (ROOT / "scripts" / "container_serve.sh").read_text()
    assert props["model_store"] == "/models" and any(op == "COPY" and arg.endswith(" /models/") for op, arg in steps)
    assert ("COPY", f"monitoring/metrics.yaml {props['metrics_config']}") in steps  # the handlers' metrics
    assert not props["metrics_config"].startswith("/config/")  # a mounted ConfigMap would hide it


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["frob"], {}, "command must be base, build or run"),
        (["run", "--base", "x"], {}, "unknown option '--base' for run"),
        (["run", "--config", "/nonexistent.properties"], {}, "--config /nonexistent.properties: no such file"),
        (["build", "--store", "/nonexistent"], {}, "--store /nonexistent: no such folder"),
        (["build", "--bogus"], {}, "unknown option '--bogus'"),
        (["run", "--port", "http"], {}, "--port must be a number"),
        (["run", "--engine", "triton"], {}, "--engine must be torchserve or kserve"),
        (["build"], {"IMAGE_TOOL": "kaniko"}, "is not docker, podman or buildah"),
    ],
)
def test_image_script_mistakes_get_one_line(args, env, message):
    r = subprocess.run(
        [str(ROOT / "scripts" / "image"), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=30
    )
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1


def test_the_image_carries_the_bundles_code_and_runs_either_engine_by_one_variable():
    """The kserve engine runs the bundle's own code (it checks each archive's handler code
    against it), so the image copies handlers/, model_defs/ and scripts/ beside the catalog; the
    start command picks the engine from ENGINE (default torchserve) or --engine."""
    steps = instructions()
    for package in ("handlers", "model_defs", "scripts"):
        assert ("COPY", f"{package}/ /opt/bundle/{package}/") in steps
    envs = " ".join(arg for op, arg in steps if op == "ENV")
    assert "PYTHONPATH=/opt/bundle" in envs and "ENGINE=torchserve" in envs
    assert any(op == "COPY" and arg.split()[-2:] == ["model_store/", "/models/"] for op, arg in steps)
    script = (ROOT / "scripts" / "image").read_text()
    assert '"$store/catalog.json"' in script and "for d in handlers model_defs scripts" in script
    start = (ROOT / "scripts" / "container_serve.sh").read_text()
    assert 'engine="${ENGINE:-torchserve}"' in start
    assert (
        "exec torchserve --start --foreground" in start and "start --engine kserve --foreground --models all" in start
    )


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {"ENGINE": "triton"}, "must be torchserve or kserve, got 'triton'"),
        (["--engine"], {}, "--engine needs torchserve or kserve"),
        (["--frob"], {}, "unknown option '--frob'"),
        (["--config", "/nonexistent.properties"], {}, "--config /nonexistent.properties: no such file"),
        (["--config", str(ROOT / "k8s/base/config.properties"), "--model-store", "/nonexistent"], {}, "no such folder"),
    ],
)
def test_the_start_command_mistakes_get_one_line(args, env, message):
    r = subprocess.run(
        ["sh", str(ROOT / "scripts" / "container_serve.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
    )
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1


def test_the_build_context_holds_the_store_with_its_catalog_and_the_code(tmp_path):
    """scripts/image build, with a stand-in `docker` on PATH that records the context it is
    given: the .mar files with catalog.json, the code packages without caches, the Containerfile."""
    bin_dir, store = tmp_path / "bin", tmp_path / "store"
    bin_dir.mkdir()
    store.mkdir()
    (store / "digits.mar").write_bytes(b"an archive")
    (store / "catalog.json").write_text('{"format_version": 1, "archives": {}}\n')
    listing = tmp_path / "context.txt"
    fake = bin_dir / "docker"
    fake.write_text(f'#!/bin/sh\nfor a; do ctx="$a"; done\ncd "$ctx" && find . -type f | sort > {listing}\n')
    fake.chmod(0o755)
    env = {**os.environ, "IMAGE_TOOL": "docker", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = subprocess.run(
        [str(ROOT / "scripts" / "image"), "build", "--store", str(store)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    files = set(listing.read_text().split())
    assert {"./model_store/digits.mar", "./model_store/catalog.json", "./Containerfile"} <= files
    assert {"./handlers/worker.py", "./model_defs/usage.py", "./scripts/container_serve.sh"} <= files
    assert not [f for f in files if "__pycache__" in f]
    (store / "catalog.json").unlink()
    r = subprocess.run(
        [str(ROOT / "scripts" / "image"), "build", "--store", str(store)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 1 and "no catalog.json in" in r.stderr and r.stderr.count("\n") == 1
