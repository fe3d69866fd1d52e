"""Mistakes an operator makes with scripts/archive, scripts/serve and scripts/models, one
table, one real TorchServe shared by every case.

For each case: the exit code (2 for a usage mistake, 1 for a runtime refusal), exactly one
line on stderr naming the argument or file and what is allowed, no traceback, and nothing
changed: the store (archives and catalog), the run folders (serving record, config, keys,
refused list) are byte-identical, and the management API serves the same models, versions,
defaults and worker counts as before. The table of docs/mistakes.md is taken from these cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from model_defs import DataConfig, get_model
from model_defs.checkpoint import save_model_files
from scripts.cli import archive, models, predict, serve
from scripts.ops.catalog import Catalog, sha256_file
from scripts.ops.serve import TorchServe, free_port
from tests.conftest import serving

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent


def tiny_run(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = DataConfig(input_size=16, resize_size=16, channels=1, mean=(0.5,), std=(0.5,))
    save_model_files(
        out,
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


def handmade(store: Path, source: str, name: str, edit: Callable[[dict], None]) -> None:
    """A copy of an archive with its model-config.yaml edited by hand (as another tool
    might), catalogued as name/1.0 so that scripts/models will register it."""
    target = store / f"{name}-1.0.mar"
    with zipfile.ZipFile(store / source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                edit(config)
                data = yaml.safe_dump(config).encode()
            zout.writestr(item, data)
    entry = {
        **Catalog(store).load()["digits/1.0"],
        "name": name,
        "version": "1.0",
        "file": target.name,
        "sha256": sha256_file(target),
        "size": target.stat().st_size,
    }
    Catalog(store).record(entry)


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_server):
    """A store with digits 1.0 (served, default), 2.0 (served), 3.0 (catalogued only) and
    two hand-made archives; the shared server; a config for a second, stopped server."""
    root = tmp_path_factory.mktemp("mistakes")
    r1, r2 = tiny_run(root / "r1", 1), tiny_run(root / "r2", 2)
    store, run_dir = shared_server.model_store, shared_server.run_dir
    for argv in (
        [r1, "--name", "digits"],
        [r2, "--name", "digits", "--version", "2.0"],
        [r1, "--name", "digits", "--version", "3.0", "--batch-size", "2"],
    ):
        assert archive.main([str(a) for a in argv] + ["--model-store", str(store), "--run-dir", str(run_dir)]) == 0
    handmade(store, "digits.mar", "badopt", lambda c: c["handler"].update(max_pixels="abc"))
    handmade(store, "digits.mar", "noworkers", lambda c: c.update(minWorkers=-2))
    with serving(shared_server, "digits") as ts:
        ts.register("digits", "digits-2.0.mar", timeout=240)
        other = root / "other.properties"  # a second server's config on free ports: it is never started
        props = (ROOT / "config.properties").read_text()
        for key, port in (
            ("8080", free_port()),
            ("8081", free_port()),
            ("8082", free_port()),
            ("7070", free_port()),
            ("7071", free_port()),
        ):
            props = props.replace(f":{key}", f":{port}").replace(f"port={key}", f"port={port}")
        other.write_text(props)
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        stale = root / "stale"  # a run folder whose pid file names a process that is not TorchServe
        (stale / "tmp").mkdir(parents=True)
        (stale / "tmp" / ".model_server.pid").write_text(str(sleeper.pid))
        yield {
            "root": root,
            "store": store,
            "run_dir": run_dir,
            "ts": ts,
            "r1": r1,
            "r2": r2,
            "other": other,
            "stale": stale,
            "sleeper": sleeper,
        }
        sleeper.kill()
        sleeper.wait()


@dataclass
class Case:
    id: str
    tool: str  # archive, serve or models
    argv: list  # with {store}, {run_dir}, {r1}, {r2}, {root}, {other}, {stale} filled in
    code: int
    words: list[str]
    setup: Callable | None = None  # (world) -> undo callable; runs before the "before" snapshot
    check: Callable | None = None  # (world) -> None, after
    readme: str = ""  # the row docs/mistakes.md's table shows for this case, if any


def manifest(world, doc: dict | str) -> Path:
    path = world["root"] / "manifest.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def manifest_case(id_, doc, words, readme=""):
    def setup(world):
        path = manifest(world, doc)
        return lambda: path.unlink(missing_ok=True)

    return Case(id_, "archive", ["--manifest", "{root}/manifest.yaml"], 2, words, setup=setup, readme=readme)


def entry(**extra):
    return {"name": "m", "version": "1.0", "run": "r1", **extra}


def tamper(file: str):
    def setup(world):
        path = world["store"] / file
        original = path.read_bytes()
        path.write_bytes(original + b"changed")
        return lambda: path.write_bytes(original)

    return setup


def wrong_keys(world):
    keys = world["ts"].key_file.read_text()
    world["ts"].key_file.write_text(json.dumps({k: {"key": "wrong"} for k in ("management", "inference", "API")}))
    return lambda: world["ts"].key_file.write_text(keys)


def recorded_before(world):
    """A stopped server's run folder with a serving record, which a failed start must keep."""
    second = world["root"] / "second"
    second.mkdir(exist_ok=True)
    shutil.copy(world["run_dir"] / "serving.json", second / "serving.json")
    return lambda: shutil.rmtree(second)


def sleeper_alive(world):
    assert world["sleeper"].poll() is None, "serve stop signalled a process that is not its TorchServe"


def files(*names: str):
    """Setup: real files under the world's root (a PNG of a photograph, labels.txt saying 'w'),
    removed after the case."""

    def setup(world):
        from skimage import data

        for name in names:
            path = world["root"] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".png":
                Image.fromarray(data.camera()).resize((16, 16)).save(path)
            else:
                path.write_text("a.png w\n" if path.name == "labels.txt" else "<annotation/>\n")
        world["predictions_before"] = predictions_logged(world)

        def undo():
            for top in {world["root"] / Path(n).parts[0] for n in names}:
                shutil.rmtree(top) if top.is_dir() else top.unlink(missing_ok=True)

        return undo

    return setup


def predictions_logged(world) -> int:
    log = world["run_dir"] / "logs" / "access_log.log"
    return log.read_text().count("/predictions/") if log.is_file() else 0


def no_prediction_sent(world):
    assert predictions_logged(world) == world["predictions_before"], "a request was sent before the refusal"


A, S, M, P = "archive", "serve", "models", "predict"
CASES = [
    # -- scripts/archive: names and versions -------------------------------------------------
    Case(
        "archive name with a slash",
        A,
        ["{r2}", "--name", "a/b"],
        2,
        ["model name 'a/b'", "letters, digits"],
        readme="`scripts/archive runs/x --name a/b`",
    ),
    Case("archive name with ..", A, ["{r2}", "--name", "zz..x"], 2, ["model name 'zz..x'", "no '..'"]),
    Case("archive name starting with -", A, ["{r2}", "--name=-x"], 2, ["model name '-x'"]),
    Case("archive name too long", A, ["{r2}", "--name", "n" * 65], 2, ["at most 64"]),
    Case(
        "archive version escaping the store",
        A,
        ["{r2}", "--name", "vt", "--version", "1/../../../x"],
        2,
        ["version '1/../../../x'"],
        readme="`--version '1/../../../x'` (or `''`)",
    ),
    Case("archive empty version", A, ["{r2}", "--name", "vt", "--version", ""], 2, ["version ''"]),
    # -- scripts/archive: options ---------------------------------------------------------------
    Case(
        "negative workers",
        A,
        ["{r2}", "--name", "n", "--workers", "-2"],
        2,
        ["--workers", "from 1 to 64", "-2"],
        readme="`--workers -2`",
    ),
    Case("zero workers", A, ["{r2}", "--name", "n", "--workers", "0"], 2, ["--workers"]),
    Case(
        "batch size 0",
        A,
        ["{r2}", "--name", "n", "--batch-size", "0"],
        2,
        ["--batch-size", "from 1"],
        readme="`--batch-size 0`",
    ),
    Case(
        "max workers below workers",
        A,
        ["{r2}", "--name", "n", "--workers", "3", "--max-workers", "1"],
        2,
        ["--max-workers (1)", "at least --workers (3)"],
        readme="`--workers 3 --max-workers 1`",
    ),
    Case("topk 0", A, ["{r2}", "--name", "n", "--topk", "0"], 2, ["--topk", "from 1"]),
    Case(
        "negative batch delay",
        A,
        ["{r2}", "--name", "n", "--max-batch-delay", "-5"],
        2,
        ["--max-batch-delay", "from 0"],
    ),
    Case("response timeout 0", A, ["{r2}", "--name", "n", "--response-timeout", "0"], 2, ["--response-timeout"]),
    Case(
        "workers not a number", A, ["{r2}", "--name", "n", "--workers", "x"], 2, ["--workers", "invalid int value: 'x'"]
    ),
    Case("unknown device", A, ["{r2}", "--name", "n", "--device", "tpu"], 2, ["--device", "invalid choice: 'tpu'"]),
    Case(
        "unknown runtime",
        A,
        ["{r2}", "--name", "n", "--runtime", "tensorrt"],
        2,
        ["unknown runtime 'tensorrt'", "onnx"],
    ),
    Case("int8 on a gpu", A, ["{r2}", "--name", "n", "--runtime", "int8", "--device", "gpu"], 2, ["int8", "CPU only"]),
    Case(
        "unknown handler option",
        A,
        ["{r2}", "--name", "n", "--handler-option", "bogus=1"],
        2,
        ["'bogus'", "known: topk"],
        readme="`--handler-option bogus=1`",
    ),
    Case(
        "misspelled handler option",
        A,
        ["{r2}", "--name", "n", "--handler-option", "max_pixel=100"],
        2,
        ["did you mean 'max_pixels'"],
    ),
    Case(
        "handler option of the wrong type",
        A,
        ["{r2}", "--name", "n", "--handler-option", "max_pixels=abc"],
        2,
        ["max_pixels", "whole number", "'abc'"],
        readme="`--handler-option max_pixels=abc`",
    ),
    Case(
        "handler option out of range",
        A,
        ["{r2}", "--name", "n", "--handler-option", "score_threshold=2"],
        2,
        ["score_threshold", "from 0 to 1"],
    ),
    Case(
        "handler option not a bool",
        A,
        ["{r2}", "--name", "n", "--handler-option", "gpu_decode=maybe"],
        2,
        ["gpu_decode", "true or false"],
    ),
    Case(
        "unknown autocast",
        A,
        ["{r2}", "--name", "n", "--handler-option", "autocast=fp8"],
        2,
        ["autocast", "bf16, fp16"],
    ),
    Case(
        "handler option without =", A, ["{r2}", "--name", "n", "--handler-option", "topk"], 2, ["KEY=VALUE", "'topk'"]
    ),
    # -- scripts/archive: folders, the store and the catalog -------------------------------------
    Case("missing training folder", A, ["{root}/nowhere", "--name", "n"], 2, ["nowhere", "does not exist"]),
    Case("nothing to do", A, [], 2, ["give a training output folder"]),
    Case(
        "existing version with other inputs",
        A,
        ["{r2}", "--name", "digits", "--version", "3.0"],
        1,
        ["digits/3.0 already exists", "--force"],
        readme="re-archiving an existing name and version",
    ),
    Case(
        "existing version under another file name",
        A,
        ["{r2}", "--name", "digits", "--version", "1.0"],
        1,
        ["digits/1.0 already exists", "--force"],
    ),
    Case(
        "--force on a served version",
        A,
        ["{r2}", "--name", "digits", "--version", "2.0", "--force"],
        1,
        ["digits/2.0 is served", "unregister"],
        readme="`--force` or `--remove` of a served version",
    ),
    Case(
        "--remove a served version",
        A,
        ["--remove", "digits", "1.0"],
        1,
        ["digits/1.0 is served", "scripts/models unregister"],
    ),
    Case("--remove an unknown version", A, ["--remove", "digits", "9.9"], 1, ["digits/9.9 is not in", "digits/3.0"]),
    Case("--remove a bad name", A, ["--remove", "a/b", "1.0"], 2, ["model name 'a/b'"]),
    Case("--repair alone", A, ["--repair"], 2, ["--repair goes with --verify"]),
    Case(
        "--verify --repair of a served archive",
        A,
        ["--verify", "--repair"],
        1,
        ["digits/2.0 is served", "refusing to repair"],
        setup=tamper("digits-2.0.mar"),
    ),
    # -- scripts/archive: manifests ----------------------------------------------------------------
    Case("missing manifest", A, ["--manifest", "{root}/nosuch.yaml"], 2, ["nosuch.yaml", "does not exist"]),
    manifest_case(
        "manifest: misspelled top-level key",
        {"defualts": {}, "models": [entry()]},
        ["'defualts'", "did you mean 'defaults'"],
        readme="manifest key `defualts:` (or `confg:`, `tsk:`, `batch_sise:`)",
    ),
    manifest_case(
        "manifest: misspelled entry key confg", {"models": [entry(confg={})]}, ["entry 1", "did you mean 'config'"]
    ),
    manifest_case(
        "manifest: misspelled entry key tsk",
        {"models": [entry(tsk="classification")]},
        ["entry 1", "did you mean 'task'"],
    ),
    manifest_case(
        "manifest: misspelled option",
        {"models": [entry(config={"batch_sise": 2})]},
        ["entry 1", "did you mean 'batch_size'"],
    ),
    manifest_case(
        "manifest: misspelled default", {"defaults": {"wokers": 2}, "models": [entry()]}, ["did you mean 'workers'"]
    ),
    manifest_case(
        "manifest: misspelled handler option",
        {"models": [entry(config={"handler": {"max_pixel": 5}})]},
        ["entry 1", "handler option", "did you mean 'max_pixels'"],
    ),
    manifest_case(
        "manifest: option out of range", {"models": [entry(config={"workers": -1})]}, ["entry 1", "workers", "-1"]
    ),
    manifest_case("manifest: bad name", {"models": [entry(name="../x")]}, ["entry 1", "name '../x'"]),
    manifest_case("manifest: bad version", {"models": [entry(version="")]}, ["entry 1", "has no version"]),
    manifest_case("manifest: a model twice", {"models": [entry(), entry()]}, ["entry 2", "m/1.0 is listed twice"]),
    manifest_case("manifest: not YAML", "models: [\n  - {name: x", ["not valid YAML"]),
    manifest_case("manifest: no models", {"defaults": {}}, ["non-empty 'models:' list"]),
    # -- scripts/serve -------------------------------------------------------------------------
    Case("start while running", S, ["start"], 1, ["already running", "scripts/serve stop"]),
    Case("start a model name with a slash", S, ["start", "--models", "a/b"], 2, ["model name 'a/b'"]),
    Case("start with no model named", S, ["start", "--models", ","], 2, ["--models", "names no model"]),
    Case(
        "start a model with no archive",
        S,
        ["--run-dir", "{root}/second", "--config", "{other}", "start", "--models", "typo"],
        1,
        ["no archive typo.mar", "digits"],
        setup=recorded_before,
        readme="`scripts/serve start --models typo`",
    ),
    Case(
        "start with a timeout that is not a number",
        S,
        ["start", "--timeout", "soon"],
        2,
        ["--timeout", "invalid float"],
    ),
    Case(
        "a config that does not exist",
        S,
        ["status", "--config", "{root}/nosuch.properties"],
        2,
        ["--config", "no such file"],
    ),
    Case("status of a run folder with no server", S, ["status", "--run-dir", "{root}/nothing"], 1, ["not running"]),
    Case(
        "stop with a stale pid file",
        S,
        ["stop", "--run-dir", "{stale}"],
        1,
        ["no TorchServe running", "left alone"],
        check=sleeper_alive,
        readme="`scripts/serve stop` with a stale pid file",
    ),
    Case("key of a run folder with no server", S, ["key", "--run-dir", "{root}/nothing"], 1, ["no token keys"]),
    Case("unknown key kind", S, ["key", "admin"], 2, ["invalid choice: 'admin'"]),
    Case("unknown serve command", S, ["restart"], 2, ["invalid choice: 'restart'"]),
    # -- scripts/models ------------------------------------------------------------------------
    Case(
        "unregister a path",
        M,
        ["unregister", "zz/../ml", "1.0"],
        2,
        ["model name 'zz/../ml'"],
        readme="`scripts/models unregister zz/../ml 1.0`",
    ),
    Case(
        "scale a path as version",
        M,
        ["scale", "digits", "../mine", "--min", "1", "--max", "2"],
        2,
        ["version '../mine'"],
        readme="`scripts/models scale photos ../mine ...`",
    ),
    Case("register a name with a space", M, ["register", "a b", "1.0"], 2, ["model name 'a b'"]),
    Case(
        "scale beyond the cores",
        M,
        ["scale", "digits", "--min", "1", "--max", "200"],
        2,
        ["--max 200", "cores"],
        readme="`scripts/models scale digits --max 200` on 2 cores",
    ),
    Case("scale min above max", M, ["scale", "digits", "--min", "2", "--max", "1"], 2, ["--min 2 --max 1"]),
    Case("scale negative min", M, ["scale", "digits", "--min", "-1", "--max", "1"], 2, ["--min -1"]),
    Case("scale without --max", M, ["scale", "digits", "--min", "1"], 2, ["--max"]),
    Case(
        "scale an unregistered version",
        M,
        ["scale", "digits", "3.0", "--min", "1", "--max", "1"],
        1,
        ["digits 3.0 is not registered"],
    ),
    Case("register a version not catalogued", M, ["register", "digits", "9.9"], 1, ["digits/9.9 is not in"]),
    Case("register a registered version", M, ["register", "digits", "1.0"], 1, ["TorchServe refused", "1.0"]),
    Case("register zero workers", M, ["register", "digits", "3.0", "--workers", "0"], 2, ["--workers", "0"]),
    Case(
        "register a changed archive",
        M,
        ["register", "digits", "3.0"],
        1,
        ["digits-3.0.mar", "sha256"],
        setup=tamper("digits-3.0.mar"),
        readme="an archive changed after it was catalogued",
    ),
    Case(
        "register an archive declaring -2 workers",
        M,
        ["register", "noworkers", "1.0"],
        1,
        ["minWorkers -2", "at least 1"],
        readme="an archive whose model-config says `minWorkers: -2`",
    ),
    Case("promote an unregistered version", M, ["promote", "digits", "9.9"], 1, ["digits 9.9 is not registered"]),
    Case("promote an unknown model", M, ["promote", "nosuch", "1.0"], 1, ["nosuch"]),
    Case(
        "promote --if-better without data",
        M,
        ["promote", "digits", "2.0", "--if-better"],
        2,
        ["--if-better needs --data"],
    ),
    Case(
        "promote with --data but no --if-better",
        M,
        ["promote", "digits", "2.0", "--data", "{root}"],
        2,
        ["--data is only read by --if-better"],
    ),
    Case("rollback with no history", M, ["rollback", "digits"], 1, ["no previous default"]),
    Case(
        "unregister the default",
        M,
        ["unregister", "digits", "1.0"],
        1,
        ["default version", "promote another version first"],
    ),
    Case("unregister an unregistered version", M, ["unregister", "digits", "9.9"], 1, ["digits 9.9 is not registered"]),
    Case(
        "compare on a missing folder",
        M,
        ["compare", "digits", "1.0", "2.0", "--data", "{root}/nowhere"],
        2,
        ["nowhere"],
    ),
    Case(
        "promote --if-better on unlabelled images",
        M,
        ["promote", "digits", "2.0", "--if-better", "--data", "{root}/plain"],
        2,
        ["--if-better needs labelled data", "plain holds no labels"],
        setup=files("plain/a.png"),
        check=no_prediction_sent,
    ),
    Case(
        "compare on a VOC folder",
        M,
        ["compare", "digits", "1.0", "2.0", "--data", "{root}/voc"],
        2,
        ["VOC detection dataset", "digits is a classification model"],
        setup=files("voc/Annotations/a.xml"),
        check=no_prediction_sent,
    ),
    # -- scripts/predict: input that does not fit the model, refused before any request --------
    Case(
        "predict a VOC folder with a classifier",
        P,
        ["--model", "digits", "{root}/voc"],
        2,
        ["voc is a VOC detection dataset", "digits is a classification model"],
        setup=files("voc/Annotations/a.xml"),
        check=no_prediction_sent,
    ),
    Case(
        "predict class folders the model does not know",
        P,
        ["--model", "digits", "{root}/pets"],
        2,
        ["pets/cat is not one of the training classes", "x, y, z"],
        setup=files("pets/cat/a.png", "pets/x/b.png"),
        check=no_prediction_sent,
    ),
    Case(
        "predict labels.txt with an unknown label",
        P,
        ["--model", "digits", "{root}/listed"],
        2,
        ["label 'w'", "3 classes"],
        setup=files("listed/images/a.png", "listed/labels.txt"),
        check=no_prediction_sent,
    ),
    Case("predict a missing file", P, ["--model", "digits", "{root}/nothing.png"], 2, ["nothing.png is not a file"]),
    Case(
        "predict to an --out of another kind",
        P,
        ["--model", "digits", "{root}/pets/x", "--out", "{root}/a.txt"],
        2,
        ["--out", ".json or .csv"],
        setup=files("pets/x/b.png"),
    ),
    Case("predict with an unserved model", P, ["--model", "nosuch", "{root}/x.png"], 1, ["nosuch"]),
    Case(
        "predict --split val on files",
        P,
        ["--model", "digits", "{root}/x.png", "--split", "val"],
        2,
        ["--split val"],
        setup=files("x.png"),
    ),
    Case("wrong token", M, ["status"], 1, ["Token Authorization failed"], setup=wrong_keys),
    Case("unknown models command", M, ["deploy", "digits"], 2, ["invalid choice: 'deploy'"]),
    Case("models of a run folder with no server", M, ["status", "--run-dir", "{root}/nothing"], 1, ["not running"]),
]


def fill(argv, world) -> list[str]:
    return [
        str(a).format(**{k: world[k] for k in ("store", "run_dir", "r1", "r2", "root", "other", "stale")}) for a in argv
    ]


def tree(folder: Path, skip=("logs", "tmp")) -> dict[str, bytes]:
    """Every file under `folder` (not TorchServe's own logs and temp files) and its bytes."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in skip and p.name != ".catalog.lock"
    }


def served(ts: TorchServe) -> list[tuple]:
    """What the management API serves: (model, version, default, min, max workers)."""
    out = []
    for name in sorted(ts.models()):
        default = ts.describe(name)[0]["modelVersion"]
        out += [
            (name, v["modelVersion"], v["modelVersion"] == default, v["minWorkers"], v["maxWorkers"])
            for v in ts.versions(name)
        ]
    return sorted(out)


def state(world) -> dict:
    return {
        "store": tree(world["store"]),
        "run_dir": tree(world["run_dir"]),
        "others": {d: tree(world["root"] / d) for d in ("second", "nothing", "stale")},
    }


def run_tool(tool: str, argv: list[str], world) -> tuple[int, str, str]:
    main = {"archive": archive.main, "serve": serve.main, "models": models.main, "predict": predict.main}[tool]
    common = ["--model-store", str(world["store"])] * (tool != "predict") + ["--run-dir", str(world["run_dir"])]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(common + argv)  # the command's own options come after: they win
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_at_least_fifty_cases_cover_the_four_tools():
    assert len(CASES) >= 50 and {c.tool for c in CASES} == {"archive", "serve", "models", "predict"}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_mistake_gets_one_line_and_changes_nothing(world, case):
    api_before = served(world["ts"])
    undo = case.setup(world) if case.setup else None
    try:
        before = state(world)
        code, _, err = run_tool(case.tool, fill(case.argv, world), world)
        lines = err.strip().splitlines()
        assert code == case.code, (code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "Traceback" not in err
        for word in case.words:
            assert word in lines[0], (word, lines[0])
        assert state(world) == before, "a mistake changed files"
        if case.check:
            case.check(world)
    finally:
        if undo:
            undo()
    assert served(world["ts"]) == api_before, "a mistake changed what is served"


def test_a_worker_refusing_an_option_fails_registration_at_once(world, capsys):
    """An archive whose handler section says max_pixels: abc (made by hand: scripts/archive
    refuses it): the worker logs one line and registration fails with it, instead of a
    crash loop that ends in a timeout. Nothing is left registered or recorded."""
    before, api_before = state(world), served(world["ts"])
    code = models.main(
        ["--run-dir", str(world["run_dir"]), "--model-store", str(world["store"]), "register", "badopt", "1.0"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "badopt/1.0 refused to load" in err and "max_pixels must be a whole number" in err and "'abc'" in err, err
    log = (world["run_dir"] / "logs" / "model_log.log").read_text()
    assert sum("refuses to load:" in line and "badopt_1.0" in line for line in log.splitlines()) >= 1
    assert state(world) == before and served(world["ts"]) == api_before


def test_the_command_line_wrappers_print_one_line_and_no_traceback(world):
    for tool, argv in (
        ("models", ["unregister", "zz/../ml", "1.0"]),
        ("serve", ["key", "admin"]),
        ("archive", ["--remove", "a/b", "1.0"]),
    ):
        out = subprocess.run(
            [
                str(ROOT / "scripts" / tool),
                "--run-dir",
                str(world["run_dir"]),
                "--model-store",
                str(world["store"]),
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")


WORKER_REFUSAL = "an archive whose handler section says `max_pixels: abc`"  # the test just above


def test_the_docs_table_is_taken_from_these_cases():
    section = (ROOT / "docs" / "mistakes.md").read_text()
    rows = dict(
        line.strip("|").split(" | ")[:2]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| mistake")
    )
    rows = {label.strip(): code.strip() for label, code in rows.items()}
    from_cases = {c.readme: str(c.code) for c in CASES if c.readme}
    assert rows == {**from_cases, WORKER_REFUSAL: "1"}
