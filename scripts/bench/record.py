"""The one writer of benchmark records: every figure the docs state comes from a file it wrote.

A record is one JSON file under benchmarks/results/, in one schema (benchmarks/results/schema.json):
what was run (`command`), when (`date`, UTC), where (`machine`: CPU model, cores, memory, GPU
and driver where there is one), with what (`versions` of Python and the packages that decide
the figures) and the raw `figures` the benchmark measured, in whatever shape that benchmark
has (its docstring says). The docs cite a figure by the record's file name.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from contextlib import suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = "bundle-record/1"
PACKAGES = ("torch", "torchvision", "torchserve", "pillow", "numpy", "onnxruntime", "kserve", "litserve")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return round(kib / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


def gpu() -> dict:
    """The GPU's name and driver from nvidia-smi; nulls on a machine without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        name, driver = out.stdout.strip().splitlines()[0].split(", ")
        return {"gpu": name, "driver": driver}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {"gpu": None, "driver": None}


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(), "os": platform.platform(), **gpu()}


def versions(extra: tuple[str, ...] = ()) -> dict:
    found = {"python": platform.python_version()}
    for package in (*PACKAGES, *extra):
        with suppress(PackageNotFoundError):
            # A loaded module's own version keeps its build label (torch 2.14.1+cu130).
            found[package] = str(getattr(sys.modules.get(package), "__version__", None) or version(package))
    return found


def write_record(
    name: str,
    figures: dict,
    *,
    command: str | None = None,
    extra_versions: tuple[str, ...] = (),
    path: Path | None = None,
) -> Path:
    """Write benchmarks/results/NAME.json, or `path` (a benchmark's --out), replacing a record of
    the same name, and return its path."""
    record = {
        "schema": SCHEMA,
        "name": name,
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(extra_versions),
        "figures": figures,
    }
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path
