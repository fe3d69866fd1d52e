"""Property: whatever sequence of archive, changed re-archive, --force, --remove, file
deletion or corruption, stray files and --verify [--repair] is run on a store, nothing is
replaced silently and --verify tells the truth.

Hypothesis draws the sequences; a small model of the store (what each name/version should
hold, which files were damaged behind the catalog's back) says what each step must do, and
after every step the real store is checked against it.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_defs import DataConfig, get_model
from model_defs.checkpoint import save_model_files
from scripts.cli import archive
from scripts.ops.catalog import Catalog, sha256_file

pytestmark = pytest.mark.unit

NAMES = ("a", "b")
VERSIONS = (None, "1.0", "2.0")  # None: <name>.mar holding 1.0, the same name/version as "1.0" in <name>-1.0.mar


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny untrained models with different weights: two different archive inputs."""
    out = {}
    cfg = DataConfig(input_size=16, resize_size=16, channels=1, mean=(0.5,), std=(0.5,))
    for i, name in enumerate(("r1", "r2")):
        torch.manual_seed(i)
        out[name] = tmp_path_factory.mktemp(name)
        save_model_files(
            out[name],
            get_model("small_cnn", num_classes=3, in_channels=1),
            {
                "arch": "small_cnn",
                "arch_args": {"num_classes": 3, "in_channels": 1},
                "task": "classification",
                "classes": ["x", "y", "z"],
                "preprocessing": cfg.to_dict(),
            },
        )
    return out


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = archive.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def snapshot(store: Path) -> dict[str, bytes]:
    return (
        {p.name: p.read_bytes() for p in store.iterdir() if p.is_file() and p.name != ".catalog.lock"}
        if store.exists()
        else {}
    )


step = st.one_of(
    st.tuples(
        st.just("archive"),
        st.sampled_from(NAMES),
        st.sampled_from(VERSIONS),
        st.sampled_from(("r1", "r2")),
        st.booleans(),
    ),
    st.tuples(st.just("remove"), st.sampled_from(NAMES), st.sampled_from(("1.0", "2.0"))),
    st.tuples(st.just("delete"), st.integers(0, 5)),
    st.tuples(st.just("corrupt"), st.integers(0, 5)),
    st.tuples(st.just("stray"), st.sampled_from(NAMES)),
    st.tuples(st.just("repair")),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=2, max_size=7))
def test_the_catalog_and_the_store_never_disagree_silently(runs, steps):
    root = Path(tempfile.mkdtemp(prefix="catalog_property_"))
    store, no_server = root / "store", root / "no_server"
    common = ["--model-store", store, "--run-dir", no_server]
    model: dict[str, dict] = {}  # name/version -> {"run", "file", "sha", "damaged"}
    strays: set[str] = set()
    try:
        for op in steps:
            before = snapshot(store)
            if op[0] == "archive":
                _, name, version, run, force = op
                key, file = f"{name}/{version or '1.0'}", f"{name}.mar" if version is None else f"{name}-{version}.mar"
                argv = [
                    runs[run],
                    "--name",
                    name,
                    *(["--version", version] if version else []),
                    *(["--force"] if force else []),
                ]
                code, out, err = cli(*argv, *common)
                known = model.get(key)
                if known and not force:
                    if known["run"] == run and known["file"] == file and not known["damaged"]:
                        assert code == 0 and "unchanged" in out, (op, err)
                    else:  # another run, another file name, or a damaged archive: never replaced silently
                        assert code == 1 and key in err and "--force" in err, (op, code, err)
                    assert snapshot(store) == before, op
                elif not known and file in strays and not force:
                    assert code == 1 and "not in the catalog" in err, (op, code, err)
                    assert snapshot(store) == before, op
                else:
                    assert code == 0, (op, err)
                    if known and known["file"] != file:
                        assert not (store / known["file"]).exists(), "the replaced version's old file is left behind"
                    model[key] = {"run": run, "file": file, "sha": sha256_file(store / file), "damaged": None}
                    strays.discard(file)
            elif op[0] == "remove":
                key = f"{op[1]}/{op[2]}"
                code, _, err = cli("--remove", op[1], op[2], *common)
                if key in model:
                    assert code == 0, err
                    assert not (store / model.pop(key)["file"]).exists()
                else:
                    assert code == 1 and key in err and snapshot(store) == before, (op, err)
            elif op[0] in ("delete", "corrupt") and model:
                entry = model[sorted(model)[op[1] % len(model)]]
                path = store / entry["file"]
                if op[0] == "delete" and path.exists():
                    path.unlink()
                    entry["damaged"] = "missing"
                elif op[0] == "corrupt" and path.exists():
                    with open(path, "ab") as f:
                        f.write(b"changed behind the catalog's back")
                    entry["damaged"] = "changed"
            elif op[0] == "stray":
                file = f"{op[1]}.mar"
                if not any(e["file"] == file for e in model.values()):
                    store.mkdir(parents=True, exist_ok=True)
                    (store / file).write_bytes(b"an archive nobody catalogued")
                    strays.add(file)
            elif op[0] == "repair":
                code, out, _ = cli("--verify", "--repair", *common)
                assert code == 0, out
                model = {k: e for k, e in model.items() if not e["damaged"]}
                strays.clear()

            # After every step: the catalog holds exactly the model's versions, each undamaged
            # archive holds what was built, and --verify names exactly what is wrong.
            entries = Catalog(store).load()
            assert sorted(entries) == sorted(model), (op, sorted(entries), sorted(model))
            for key, e in model.items():
                assert entries[key]["file"] == e["file"]
                if not e["damaged"]:
                    assert sha256_file(store / e["file"]) == e["sha"] == entries[key]["sha256"], (op, key)
            code, out, _ = cli("--verify", *common)
            wrong = {k for k, e in model.items() if e["damaged"]}
            reported = [line for line in out.splitlines() if line.startswith("mismatch: ")]
            assert code == (1 if wrong or strays else 0), (op, out)
            assert len(reported) == len(wrong) + len(strays), (op, out)
            for key in wrong:
                assert any(line.startswith(f"mismatch: {key}: ") for line in reported), (key, out)
            for file in strays:
                assert f"mismatch: {file}: not in the catalog" in reported, (file, out)
    finally:
        shutil.rmtree(root)
