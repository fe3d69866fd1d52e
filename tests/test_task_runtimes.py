"""Optimized runtimes for the segmenter, the embedder and the detectors: built by the real
archive command, checked against eager with the task's own measure (mIoU of the masks,
cosine similarity of the embeddings, boxes with the same label) on the run's recorded
images, then loaded by the task's real handler from the unpacked archive and compared with
the eager handler on real images; and the one-line refusals of what a task cannot have."""

from __future__ import annotations

import json
import zipfile

import pytest
import requests
import torch
import torch.nn.functional as F
import yaml

from handlers import runtimes
from handlers.embedder import ImageEmbedder
from handlers.object_detector import ObjectDetector
from handlers.segmenter import ImageSegmenter
from model_defs import DataConfig, get_model
from model_defs.checkpoint import save_model_files
from scripts.cli import archive
from scripts.ops import runtime_checks
from tests.conftest import serving
from tests.test_handler import make_context
from tests.test_task_serving import _perturb_batchnorm
from training import shapes

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]

SHAPE_CLASSES = ["background", "rectangle", "ellipse", "triangle"]
RUNNERS = {"torchscript": runtimes.TorchScriptRunner, "onnx": runtimes.OnnxRunner}
DETECTORS = {"torchscript": runtimes.ScriptedDetector, "onnx": runtimes.OnnxDetector}


def save_run(out, model, arch, arch_args, task, classes, cfg, dataset):
    meta = {"arch": arch, "arch_args": arch_args, "task": task, "classes": classes, "preprocessing": cfg.to_dict()}
    save_model_files(out, model, {**meta, "dataset": dataset})
    return out


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """Shapes on photographs with their masks: 12 images, a quarter held out as training does."""
    return shapes.generate(
        tmp_path_factory.mktemp("masks") / "data", "masks", n=12, size=96, seed=5, aspect=1.4, progress=False
    )


@pytest.fixture(scope="module")
def segmenter(masks, tmp_path_factory):
    torch.manual_seed(0)
    args = {"num_classes": 4, "in_channels": 3, "depth": 2, "width": 8}
    model = get_model("unet", **args)
    _perturb_batchnorm(model)
    with torch.no_grad():  # an untrained head predicts background everywhere: make the masks vary
        model.head.weight.mul_(20)
    cfg = DataConfig(input_size=64, resize_size=64, channels=3)
    dataset = {"root": str(masks), "layout": "masks", "train_images": 9, "val_images": 3}
    dataset["val_source"] = "random 0.25 of --data (seed 0)"
    out = tmp_path_factory.mktemp("seg") / "run"
    return save_run(out, model, "unet", args, "segmentation", SHAPE_CLASSES, cfg, dataset)


@pytest.fixture(scope="module")
def embedder(masks, tmp_path_factory):
    torch.manual_seed(0)
    args = {"in_channels": 3, "widths": [8, 16, 32], "proj_hidden": 32, "proj_dim": 16}
    model = get_model("simclr", **args)
    _perturb_batchnorm(model)
    cfg = DataConfig(input_size=32, resize_size=36, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = masks / "images"
    dataset = {"root": str(images), "layout": "unlabeled images", "train_images": 12}
    out = tmp_path_factory.mktemp("emb") / "run"
    return save_run(out, model, "simclr", args, "embedding", [], cfg, dataset)


def archive_run(run_dir, store, name, *extra) -> int:
    return archive.main([str(run_dir), "--name", name, "--model-store", str(store), "--batch-size", "2", *extra])


def archived(store, name, tmp_path):
    """(the catalog's runtime record, model-config.yaml, the unpacked archive)."""
    record = json.loads((store / "catalog.json").read_text())["archives"][f"{name}/1.0"]["runtime"]
    with zipfile.ZipFile(store / f"{name}.mar") as z:
        assert json.loads(z.read("archive.json"))["runtime"] == record
        config = yaml.safe_load(z.read("model-config.yaml"))
        z.extractall(tmp_path / "unpacked")
    assert archive.main(["--verify", "--model-store", str(store)]) == 0
    return record, config, tmp_path / "unpacked"


def handler_answers(cls, model_dir, config, rows):
    handler = cls()
    handler.initialize(make_context(model_dir, 1, config))
    ctx = make_context(model_dir, len(rows), config)
    answers = handler.handle(rows, ctx)
    assert [ctx.get_response_status(i)[0] for i in range(len(rows))] == [200] * len(rows)
    return handler, answers


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_segmenter_runtime_is_checked_by_mask_agreement_and_served_like_eager(kind, segmenter, masks, tmp_path, capsys):
    store = tmp_path / "store"
    assert archive_run(segmenter, store, "seg", "--runtime", kind) == 0
    assert f"runtime {kind}: mIoU with eager's masks" in capsys.readouterr().out
    record, config, model_dir = archived(store, "seg", tmp_path)
    assert record["kind"] == kind and record["metric"] == "miou_agreement"
    assert record["images"] == 3 and record["agreement"] >= 99 and record["pixel_agreement"] >= 99
    assert "random 0.25 of --data" in record["validation"]

    rows = [{"body": p.read_bytes()} for p in sorted((masks / "images").glob("*.png"))[:3]]
    handler, got = handler_answers(ImageSegmenter, model_dir, config, rows)
    assert type(handler.runner) is RUNNERS[kind]
    _, want = handler_answers(ImageSegmenter, model_dir, {"handler": {}}, rows)
    for a, b in zip(got, want):
        assert (a["width"], a["height"]) == (b["width"], b["height"])
        assert max(abs(a["fractions"][c] - b["fractions"][c]) for c in SHAPE_CLASSES) < 0.01
    assert len({a["mask"] for a in want}) > 1  # the images really get different masks


@pytest.mark.parametrize("kind", ["onnx", "int8"])
def test_embedder_runtime_is_checked_by_cosine_similarity_and_served_like_eager(
    kind, embedder, masks, tmp_path, capsys
):
    store = tmp_path / "store"
    assert archive_run(embedder, store, "emb", "--runtime", kind, "--max-accuracy-drop", "5") == 0
    assert f"runtime {kind}: mean cosine similarity with eager's embeddings" in capsys.readouterr().out
    record, config, model_dir = archived(store, "emb", tmp_path)
    assert record["metric"] == "cosine" and record["images"] == 12
    assert record["agreement"] >= (95 if kind == "int8" else 99.99)
    if kind == "int8":
        assert record["calibration_images"] == 12

    rows = [{"body": p.read_bytes()} for p in sorted((masks / "images").glob("*.png"))[:4]]
    _, got = handler_answers(ImageEmbedder, model_dir, config, rows)
    _, want = handler_answers(ImageEmbedder, model_dir, {"handler": {}}, rows)
    cos = F.cosine_similarity(torch.tensor([a["embedding"] for a in got]), torch.tensor([b["embedding"] for b in want]))
    assert float(cos.min()) >= (0.9 if kind == "int8" else 0.9999)


def test_detector_onnx_takes_any_image_size_and_answers_eagers_boxes(shapes_detector, tmp_path, capsys):
    store = tmp_path / "store"
    assert archive_run(shapes_detector.run, store, "det", "--runtime", "onnx") == 0
    assert "runtime onnx: boxes agreeing with eager's" in capsys.readouterr().out
    record, config, model_dir = archived(store, "det", tmp_path)
    meta = json.loads((shapes_detector.run / "model.json").read_text())
    assert record["metric"] == "box_agreement" and record["images"] == meta["dataset"]["val_images"]
    assert record["eager_boxes"] > 0 and record["agreement"] >= 99

    # Real photographs of three shapes (the handler keeps each one's aspect ratio).
    files = sorted((shapes_detector.data / "JPEGImages").glob("*"))[:2]
    rows = [{"body": f.read_bytes()} for f in files]
    handler, got = handler_answers(ObjectDetector, model_dir, config, rows)
    assert type(handler.detect) is DETECTORS["onnx"]
    _, want = handler_answers(ObjectDetector, model_dir, {"handler": {}}, rows)
    assert sum(len(a) for a in want) > 0
    for a, b in zip(got, want):
        assert [d["label"] for d in a] == [d["label"] for d in b]
        for da, db in zip(a, b):
            assert max(abs(x - y) for x, y in zip(da["box"], db["box"])) < 0.5 and abs(da["score"] - db["score"]) < 1e-3


def test_a_scripted_faster_rcnn_answers_eagers_boxes(masks, tmp_path, capsys):
    """Untrained weights: the boxes are random, their agreement is what is tested (at a
    score threshold low enough that there are boxes to agree on)."""
    torch.manual_seed(0)
    args = {"num_classes": 3, "image_size": 128}
    model = get_model("fasterrcnn_mobilenet_320", **args)
    cfg = DataConfig(input_size=128, resize_size=128, channels=3)
    voc = shapes.generate(tmp_path / "voc", "voc", n=8, size=96, seed=1, max_shapes=1, progress=False)
    dataset = {"root": str(voc), "layout": "voc", "train_images": 6, "val_images": 2}
    dataset["val_source"] = "random 0.25 of --data (seed 0)"
    run_dir = save_run(
        tmp_path / "run", model, "fasterrcnn_mobilenet_320", args, "detection", SHAPE_CLASSES[1:], cfg, dataset
    )
    store = tmp_path / "store"
    threshold = ["--handler-option", "score_threshold=0.01"]
    assert archive_run(run_dir, store, "frcnn", "--runtime", "torchscript", *threshold) == 0
    record, config, model_dir = archived(store, "frcnn", tmp_path)
    assert record["eager_boxes"] > 0 and record["agreement"] >= 99

    rows = [{"body": p.read_bytes()} for p in sorted((voc / "JPEGImages").glob("*"))[:2]]
    handler, got = handler_answers(ObjectDetector, model_dir, config, rows)
    assert type(handler.detect) is DETECTORS["torchscript"]
    _, want = handler_answers(ObjectDetector, model_dir, {"handler": {"score_threshold": 0.01}}, rows)
    assert got == want and sum(len(a) for a in want) > 0


def refused(run_dir, tmp_path, capsys, *extra) -> str:
    store = tmp_path / "store"
    assert archive_run(run_dir, store, "refused", *extra) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not store.exists() or sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) in (
        [],
        ["catalog.json"],
    )
    return err


@pytest.mark.parametrize("kind", ["int8", "compile"])
def test_a_detector_is_refused_the_runtimes_it_cannot_have(kind, shapes_detector, tmp_path, capsys):
    err = refused(shapes_detector.run, tmp_path, capsys, "--runtime", kind)
    assert f"runtime {kind} cannot hold a detection model" in err and "eager, torchscript, onnx" in err


def test_a_detector_that_cannot_be_scripted_is_refused_in_one_line(shapes_detector, tmp_path, capsys):
    err = refused(shapes_detector.run, tmp_path, capsys, "--runtime", "torchscript")
    assert "building model.ts for fcos_resnet failed" in err and "another runtime" in err


def test_a_generator_gets_only_eager(tmp_path, capsys):
    args = {"latent_dim": 16, "channels": 1, "image_size": 32, "width": 8}
    cfg = DataConfig(input_size=32, resize_size=32, channels=1, mean=(0.5,), std=(0.5,))
    run_dir = save_run(tmp_path / "gan", get_model("dcgan", **args), "dcgan", args, "generation", [], cfg, {})
    err = refused(run_dir, tmp_path, capsys, "--runtime", "onnx")
    assert "runtime onnx cannot hold a generation model; a generation model can have: eager" in err


def test_an_agreement_under_the_bound_writes_nothing(embedder, tmp_path, capsys):
    err = refused(embedder, tmp_path, capsys, "--runtime", "int8", "--max-accuracy-drop", "0")
    assert "runtime int8 agrees with eager at" in err and "(cosine, embedding)" in err


def test_a_segmenter_that_cannot_be_quantized_is_refused_in_one_line(segmenter, tmp_path, capsys):
    err = refused(segmenter, tmp_path, capsys, "--runtime", "int8")
    assert "building model_int8.ts for unet failed" in err


def test_the_check_images_are_the_recorded_split(segmenter, embedder):
    meta = json.loads((segmenter / "model.json").read_text())
    train, val = runtime_checks.recorded_paths(meta)
    assert (len(train), len(val)) == (9, 3) and not set(train) & set(val)
    meta = json.loads((embedder / "model.json").read_text())
    images, calibration, source = runtime_checks.check_images(meta, "int8", None, 4, True)
    assert len(images) == 12 and len(calibration) == 4 and "training images" in source


def test_a_worker_refuses_a_runtime_its_task_cannot_have(tmp_path):
    """An archive made by hand or by another tool: the worker names the task and what it can have."""
    with pytest.raises(runtimes.RuntimeConfigError, match="runtime int8 cannot hold a detection model; a detection"):
        runtimes.load_detection_runtime({"runtime": "int8"}, tmp_path, torch.nn.Identity(), torch.device("cpu"))
    args = {"latent_dim": 16, "channels": 1, "image_size": 32, "width": 8}
    cfg = DataConfig(input_size=32, resize_size=32, channels=1, mean=(0.5,), std=(0.5,))
    run_dir = save_run(tmp_path / "gan", get_model("dcgan", **args), "dcgan", args, "generation", [], cfg, {})
    with pytest.raises(runtimes.RuntimeConfigError, match="generation model can have: eager"):
        runtimes.load_runtime({"runtime": "onnx"}, run_dir, torch.nn.Identity(), torch.device("cpu"))


def test_torchserve_serves_an_onnx_detector_and_segmenter(shapes_detector, segmenter, masks, shared_server):
    """Real .mar files, a real TorchServe, real image bytes over REST: the ONNX archives answer as
    the eager handlers do in-process."""
    store = shared_server.model_store
    assert archive_run(shapes_detector.run, store, "det", "--runtime", "onnx") == 0
    assert archive_run(segmenter, store, "seg", "--runtime", "onnx") == 0
    det_files = sorted((shapes_detector.data / "JPEGImages").glob("*"))[:3]
    seg_files = sorted((masks / "images").glob("*.png"))[:3]
    with serving(shared_server, "det", "seg") as ts:

        def post(model, f):
            url = f"{ts.url('inference')}/predictions/{model}"
            return requests.post(url, data=f.read_bytes(), headers=ts.headers("inference"), timeout=120)

        det = [post("det", f) for f in det_files]
        seg = [post("seg", f) for f in seg_files]
        # The shared server's log holds earlier modules' models too: count this module's workers' lines.
        ready = [line for line in ts.log_tail("model_log.log", 400).splitlines() if "runtime onnx ready" in line]
        assert {m for m in ("det", "seg") for line in ready if f"-{m}_1.0-" in line} == {"det", "seg"}
    eager_det = ObjectDetector()
    eager_det.initialize(make_context(shapes_detector.run, 1, {"handler": {}}))
    for r, f in zip(det, det_files):
        assert r.status_code == 200, r.text
        (want,), _ = run_eager(eager_det, shapes_detector.run, f)
        assert [d["label"] for d in r.json()] == [d["label"] for d in want]
        assert all(max(abs(x - y) for x, y in zip(a["box"], b["box"])) < 0.5 for a, b in zip(r.json(), want))
    eager_seg = ImageSegmenter()
    eager_seg.initialize(make_context(segmenter, 1, {"handler": {}}))
    for r, f in zip(seg, seg_files):
        assert r.status_code == 200, r.text
        (want,), _ = run_eager(eager_seg, segmenter, f)
        assert max(abs(r.json()["fractions"][c] - want["fractions"][c]) for c in SHAPE_CLASSES) < 0.01


def run_eager(handler, model_dir, f):
    ctx = make_context(model_dir, 1, {"handler": {}})
    return handler.handle([{"body": f.read_bytes()}], ctx), ctx
