"""Batch archival, the catalog, and version operations against a real TorchServe."""

from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from scripts.cli import archive, models, serve
from scripts.ops.catalog import Catalog
from tests.conftest import classify_in_process, serving, train_cli_args
from training import train as train_mod

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def second_run(digits_dir, tmp_path_factory) -> Path:
    """The same architecture trained differently (one short epoch, another seed): version 2.0."""
    out = tmp_path_factory.mktemp("run_v2") / "digits_v2"
    assert train_mod.cli(train_cli_args(digits_dir / "train", out, "--epochs", "1", "--lr", "5e-4", "--seed", "3")) == 0
    return out


def write_manifest(path: Path, entries: list[dict], defaults: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({"defaults": defaults or {}, "models": entries}))
    return path


@pytest.fixture(scope="module")
def server(trained_digits, second_run, shared_server):
    """The shared TorchServe, its model store holding digits 1.0 and 2.0 (archived from a
    manifest, catalogued) and nothing registered yet."""
    manifest = write_manifest(
        second_run.parent / "models.yaml",
        [
            {"name": "digits", "version": "1.0", "run": str(trained_digits), "task": "classification"},
            {
                "name": "digits",
                "version": "2.0",
                "run": str(second_run),
                # torch_threads overrides the preset's (1 worker x 2 threads on 2 cores) so that 2.0 scales to 2
                "config": {"batch_size": 4, "preset": "balanced", "runtime": "eager", "torch_threads": 1},
            },
        ],
        defaults={"max_batch_delay": 20, "topk": 10, "device": "cpu"},
    )
    with serving(shared_server) as ts:
        assert archive.main(["--manifest", str(manifest), "--model-store", str(ts.model_store)]) == 0
        yield ts


@pytest.fixture(scope="module")
def store(server) -> Path:
    return server.model_store


def test_batch_archival_with_a_broken_entry(trained_digits, second_run, tmp_path, capsys):
    store = tmp_path / "store"
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "model.json").write_text((trained_digits / "model.json").read_text())
    (broken / "model.pt").write_bytes((trained_digits / "model.pt").read_bytes()[:500])  # truncated
    manifest = write_manifest(
        tmp_path / "models.yaml",
        [
            {"name": "digits", "version": "1.0", "run": str(trained_digits)},
            {"name": "broken", "version": "1.0", "run": "broken_run"},  # relative to the manifest
            {"name": "digits", "version": "2.0", "run": str(second_run), "config": {"workers": 2}},
        ],
    )
    assert archive.main(["--manifest", str(manifest), "--model-store", str(store), "--jobs", "2"]) == 1
    out, err = capsys.readouterr()
    table = {line.split()[0] + "/" + line.split()[1]: line for line in out.splitlines()[1:]}
    assert "failed: incomplete training output" in table["broken/1.0"] and "model.pt" in table["broken/1.0"]
    assert table["digits/1.0"].rstrip().endswith("built") and table["digits/2.0"].rstrip().endswith("built")
    assert "1 of 3" in err
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [
        "catalog.json",
        "digits-1.0.mar",
        "digits-2.0.mar",
    ]
    catalog = Catalog(store).load()
    assert sorted(catalog) == ["digits/1.0", "digits/2.0"]
    assert catalog["digits/2.0"]["source"]["run"] == str(second_run)
    assert catalog["digits/1.0"]["source"]["metrics"]["name"] == "accuracy"

    # Unchanged inputs are skipped; --force rebuilds.
    before = (store / "digits-1.0.mar").read_bytes()
    assert archive.main(["--manifest", str(manifest), "--model-store", str(store)]) == 1
    out = capsys.readouterr().out
    assert out.count("unchanged") == 2
    assert (store / "digits-1.0.mar").read_bytes() == before
    assert archive.main(["--manifest", str(manifest), "--model-store", str(store), "--force"]) == 1
    assert capsys.readouterr().out.count(" replaced") == 2


def test_archives_carry_their_catalog_metadata_and_verify_finds_mismatches(store, capsys):
    entries = Catalog(store).load()
    for entry in entries.values():
        with zipfile.ZipFile(store / entry["file"]) as z:
            inner = json.loads(z.read("archive.json"))
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert inner == {k: v for k, v in entry.items() if k not in ("file", "sha256", "size")}
        assert manifest["model"]["modelVersion"] == entry["version"]
    assert archive.main(["--verify", "--model-store", str(store)]) == 0
    capsys.readouterr()

    copy = store.parent / "verify_copy"
    copy.mkdir()
    for p in store.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    with open(copy / "digits-2.0.mar", "ab") as f:
        f.write(b"tampered")
    (copy / "stray.mar").write_bytes(b"not catalogued")
    assert archive.main(["--verify", "--model-store", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "digits/2.0: digits-2.0.mar sha256 differs" in out
    assert "stray.mar: not in the catalog" in out


def ops(server, *argv) -> int:
    return models.main(["--run-dir", str(server.run_dir), "--model-store", str(server.model_store), *argv])


def predict(server, data: bytes, version: str | None = None) -> requests.Response:
    url = f"{server.url('inference')}/predictions/digits" + (f"/{version}" if version else "")
    return requests.post(url, data=data, headers=server.headers("inference"), timeout=60)


def same_answer(a: dict, b: dict) -> bool:
    """Equal up to the float noise of being batched with other requests."""
    return list(a) == list(b) and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_each_version_serves_its_own_predictions(server, trained_digits, second_run, digits_dir, capsys):
    assert ops(server, "register", "digits", "1.0") == 0
    assert ops(server, "register", "digits", "2.0") == 0
    capsys.readouterr()
    differ = 0
    for f in sorted((digits_dir / "test").rglob("*.png"))[::30]:
        data = f.read_bytes()
        for version, run in (("1.0", trained_digits), ("2.0", second_run)):
            served = predict(server, data, version).json()
            probs = classify_in_process(run, data)
            assert all(abs(p - probs[int(k)].item()) < 1e-4 for k, p in served.items()), (f, version)
        differ += not same_answer(predict(server, data, "1.0").json(), predict(server, data, "2.0").json())
    assert differ > 0  # the two versions are really different models

    assert ops(server, "status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    served = {s["version"]: s for s in report["served"]}
    assert served["1.0"]["default"] and not served["2.0"]["default"]
    assert served["2.0"]["batch_size"] == 4 and served["1.0"]["device"] == "cpu"
    assert (served["1.0"]["preset"], served["2.0"]["preset"]) == (None, "balanced")  # from archive.json
    assert all(w["status"] == "READY" for s in served.values() for w in s["workers"])


def test_register_refuses_an_archive_that_no_longer_matches_the_catalog(server, store, capsys):
    entry = Catalog(store).get("digits", "2.0")
    original = (store / entry["file"]).read_bytes()
    try:
        with zipfile.ZipFile(store / entry["file"], "a") as z:
            z.writestr("extra.txt", "changed after archiving")
        assert ops(server, "register", "digits", "2.0") == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "sha256" in err and len(err.splitlines()) == 1
    finally:
        (store / entry["file"]).write_bytes(original)


def test_promote_and_rollback_drop_no_request(server, trained_digits, second_run, digits_dir, capsys):
    data = next((digits_dir / "test").rglob("*.png")).read_bytes()
    codes, errors, stop = [], [], threading.Event()

    def keep_sending():
        while not stop.is_set():
            try:
                codes.append(predict(server, data).status_code)
            except Exception as e:  # noqa: BLE001 - a dropped connection is a dropped request
                errors.append(repr(e))

    threads = [threading.Thread(target=keep_sending) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        assert ops(server, "promote", "digits", "2.0") == 0
        time.sleep(1)
        after_promote = predict(server, data).json()
        assert ops(server, "rollback", "digits") == 0
        time.sleep(1)
        after_rollback = predict(server, data).json()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert len(codes) > 20
    assert [c for c in codes if c != 200] == []
    assert same_answer(after_promote, predict(server, data, "2.0").json())
    assert same_answer(after_rollback, predict(server, data, "1.0").json())
    capsys.readouterr()
    assert ops(server, "rollback", "digits") == 1  # nothing left to roll back to
    assert "no previous default" in capsys.readouterr().err


def test_promote_if_better_refuses_a_worse_version(server, digits_dir, capsys):
    assert ops(server, "promote", "digits", "2.0", "--if-better", "--data", str(digits_dir / "test")) == 1
    err = capsys.readouterr().err
    assert "not promoting digits 2.0" in err
    assert ops(server, "status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["version"] for s in report["served"] if s["default"]] == ["1.0"]


def test_compare_reports_accuracy_agreement_and_latency(server, digits_dir, capsys):
    assert ops(server, "compare", "digits", "1.0", "2.0", "--data", str(digits_dir / "test"), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    v1, v2 = report["versions"]["1.0"], report["versions"]["2.0"]
    assert report["images"] == len(list((digits_dir / "test").rglob("*.png")))
    assert v1["accuracy"] > v2["accuracy"] and v1["errors"] == v2["errors"] == 0
    assert 0 < report["agreement"] < 1
    assert v1["p50_ms"] > 0 and v1["p99_ms"] >= v1["p50_ms"]


def test_unregister_refuses_the_default_while_others_exist(server, capsys):
    assert ops(server, "unregister", "digits", "1.0") == 1
    assert "promote another version first" in capsys.readouterr().err


def test_registered_versions_and_default_survive_a_restart(server, trained_digits, capsys):
    """One restart (of the shared server): what was served comes back, defaults and workers
    included, while a version whose archive changed during the downtime is refused alone."""
    assert ops(server, "promote", "digits", "2.0") == 0
    assert ops(server, "scale", "digits", "2.0", "--min", "1", "--max", "2") == 0
    store = ["--model-store", str(server.model_store)]
    assert archive.main([str(trained_digits), "--name", "spare", "--version", "1.0", *store]) == 0
    assert ops(server, "register", "spare", "1.0") == 0
    server.stop()
    assert ops(server, "status") == 1
    assert "not running" in capsys.readouterr().err
    mar = server.model_store / "spare-1.0.mar"
    original, record = mar.read_bytes(), server.state.path.read_bytes()
    mar.write_bytes(original + b"changed")  # an archive changed while the server was down
    try:
        # Naming an archive the record already holds adds nothing and erases nothing.
        refused = server.start(["digits-1.0"], timeout=240)
    finally:
        mar.write_bytes(original)
    # The other versions are served all the same.
    assert len(refused) == 1 and refused[0].startswith("spare 1.0:") and "sha256" in refused[0], refused
    assert server.models() == ["digits"] and server.refused() == refused
    assert server.state.path.read_bytes() == record  # the record keeps spare 1.0 for the next start
    assert serve.main(["status", "--run-dir", str(server.run_dir)]) == 0
    assert "refused at start: spare 1.0:" in capsys.readouterr().out
    assert ops(server, "status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["refused_at_start"] == refused
    served = {s["version"]: s for s in report["served"]}
    assert registered(server) == sorted(served) == ["1.0", "2.0"]
    assert served["2.0"]["default"] and served["2.0"]["max_workers"] == 2
    assert ops(server, "rollback", "digits") == 0  # the history survived too
    assert ops(server, "unregister", "digits", "2.0") == 0
    capsys.readouterr()
    assert ops(server, "status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["version"] for s in report["served"]] == ["1.0"]
    assert sorted((e["name"], e["version"]) for e in report["not_served"]) == [("digits", "2.0"), ("spare", "1.0")]


def registered(server) -> list[str]:
    return sorted(v["modelVersion"] for v in server.versions("digits"))


def test_server_failures_are_one_readable_line(server, capsys):
    for argv, words in ((["promote", "nosuch", "1.0"], "nosuch"), (["register", "digits", "9.9"], "not in")):
        assert ops(server, *argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and len(err.splitlines()) == 1, err
    keys = server.key_file.read_text()
    try:
        server.key_file.write_text(json.dumps({k: {"key": "wrong"} for k in ("management", "inference", "API")}))
        assert ops(server, "status") == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "Token" in err and len(err.splitlines()) == 1
    finally:
        server.key_file.write_text(keys)
