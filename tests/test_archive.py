"""scripts/archive: what a .mar holds, and refusals that leave model_store/ untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from model_defs import get_model
from scripts.cli import archive

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def store_listing(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def test_archive_holds_weights_metadata_code_labels_and_config(digits_run, tmp_path):
    store = tmp_path / "store"
    code = archive.main(
        [
            str(digits_run),
            "--name",
            "digits",
            "--model-store",
            str(store),
            "--batch-size",
            "4",
            "--max-batch-delay",
            "20",
            "--workers",
            "2",
            "--topk",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert store_listing(store) == [".catalog.lock", "catalog.json", "digits.mar"]  # no temporary files left
    with zipfile.ZipFile(store / "digits.mar") as z:
        names = set(z.namelist())
        assert {
            "model.pt",
            "model.json",
            "index_to_name.json",
            "model-config.yaml",
            "image_classifier.py",
            "handlers/vision.py",
            "model_defs/registry.py",
            "model_defs/preprocessing.py",
            "MAR-INF/MANIFEST.json",
        } <= names
        assert not any("__pycache__" in n for n in names)
        assert z.read("model.pt") == (digits_run / "model.pt").read_bytes()
        labels = json.loads(z.read("index_to_name.json"))
        assert labels == {str(i): str(i) for i in range(10)}
        cfg = yaml.safe_load(z.read("model-config.yaml"))
        assert cfg["batchSize"] == 4 and cfg["maxBatchDelay"] == 20 and cfg["minWorkers"] == 2
        assert cfg["deviceType"] == "cpu" and cfg["handler"]["topk"] == 3
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert manifest["model"]["handler"] == "image_classifier.py"
        assert manifest["model"]["serializedFile"] == "model.pt"


def test_unchanged_inputs_are_skipped_and_changed_ones_need_force(digits_run, tmp_path, capsys):
    store = tmp_path / "store"
    assert archive.main([str(digits_run), "--name", "d", "--model-store", str(store)]) == 0
    before = (store / "d.mar").read_bytes()
    assert archive.main([str(digits_run), "--name", "d", "--model-store", str(store)]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert (store / "d.mar").read_bytes() == before
    # Other inputs under the same name and version: refused (a conflict with the store: exit 1), the archive untouched.
    assert archive.main([str(digits_run), "--name", "d", "--model-store", str(store), "--batch-size", "2"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (store / "d.mar").read_bytes() == before
    assert (
        archive.main([str(digits_run), "--name", "d", "--model-store", str(store), "--batch-size", "2", "--force"]) == 0
    )
    assert (store / "d.mar").read_bytes() != before


def broken_outputs(trained: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Incomplete or inconsistent training outputs, each with the words its error must hold."""
    cases = {}

    def copy(name: str) -> Path:
        d = tmp / name
        shutil.copytree(trained, d)
        return d

    d = copy("no_weights")
    (d / "model.pt").unlink()
    cases["no_weights"] = (d, "model.pt is missing")
    d = copy("no_meta")
    (d / "model.json").unlink()
    cases["no_meta"] = (d, "model.json is missing")
    d = copy("truncated_weights")
    (d / "model.pt").write_bytes((trained / "model.pt").read_bytes()[:1000])
    cases["truncated_weights"] = (d, "not a readable PyTorch file")
    d = copy("wrong_arch")
    meta = json.loads((d / "model.json").read_text())
    meta["arch"] = "lenet5_bn"
    (d / "model.json").write_text(json.dumps(meta))
    cases["wrong_arch"] = (d, "does not match the architecture")
    d = copy("pickled_model")
    torch.save(get_model("small_cnn", num_classes=10, in_channels=1), d / "model.pt")
    cases["pickled_model"] = (d, "pickled")
    d = copy("bad_json")
    (d / "model.json").write_text("{not json")
    cases["bad_json"] = (d, "not valid JSON")
    cases["missing_folder"] = (tmp / "nowhere", "does not exist")
    return cases


def test_incomplete_training_output_is_refused_and_nothing_is_written(digits_run, tmp_path, capsys):
    store = tmp_path / "store"
    for name, (run_dir, words) in broken_outputs(digits_run, tmp_path).items():
        assert archive.main([str(run_dir), "--name", name, "--model-store", str(store)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err, (name, err)
        assert len(err.splitlines()) == 1, err
        assert store_listing(store) == [], name


def test_cli_wrapper_prints_one_line_no_traceback(tmp_path):
    out = subprocess.run(
        [str(ROOT / "scripts" / "archive"), str(tmp_path / "missing"), "--model-store", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "does not exist" in out.stderr


def test_a_failure_while_building_leaves_no_partial_archive(digits_run, tmp_path, monkeypatch):
    store = tmp_path / "store"

    def explode(config):
        (Path(config.export_path) / f"{config.model_name}.mar").write_bytes(b"half an archive")
        raise OSError("No space left on device")

    monkeypatch.setattr("model_archiver.model_packaging.generate_model_archive", explode)
    with pytest.raises(OSError):
        archive.build_archive(digits_run, "digits", store)
    assert store_listing(store) == []


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        archive.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--name",
        "--version",
        "--model-store",
        "--workers",
        "--batch-size",
        "--max-batch-delay",
        "--device",
        "--topk",
        "--force",
        "--torch-threads",
    ):
        assert flag in out


def test_dry_run_shows_what_would_be_built_and_writes_nothing(digits_run, tmp_path, capsys):
    store = tmp_path / "store"
    manifest = tmp_path / "models.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "defaults": {"batch_size": 4},
                "models": [{"name": "d", "version": "2.0", "run": str(digits_run), "config": {"workers": 2}}],
            }
        )
    )
    assert archive.main(["--manifest", str(manifest), "--model-store", str(store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would build" in out and '"minWorkers": 2' in out and '"batchSize": 4' in out and "d-2.0.mar" in out
    assert store_listing(store) == []
    assert archive.main([str(digits_run), "--name", "d", "--model-store", str(store), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"would build {store / 'd.mar'}")
    assert store_listing(store) == []


def test_a_batch_delay_of_0_is_written_as_1_only_where_torchserve_would_read_100():
    from scripts.ops.packaging import model_config

    assert model_config({"batch_size": 4, "max_batch_delay": 0})["maxBatchDelay"] == 1
    assert model_config({"batch_size": 1, "max_batch_delay": 0})["maxBatchDelay"] == 0
    assert model_config({"batch_size": 4, "max_batch_delay": 7})["maxBatchDelay"] == 7
