"""Detectors and segmenters started from local weight files (model_defs.pretrained and the
trainers' --pretrained): every registered one takes its own architecture's state_dict with the
class predictors rebuilt, or a backbone alone (torchvision's classifier layouts included), and
a file that does not fit is refused in one line naming the keys."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torchvision
from torchvision.models import detection

from model_defs import get_entry, get_model, list_models
from model_defs.pretrained import PretrainedError, load_pretrained
from tests.test_registry import speed
from training import shapes, train_detection, train_segmentation

CLASSES = 3


def cases(*tasks: str) -> list:
    return [pytest.param(n, id=n, marks=speed(n)) for t in tasks for n in list_models(t)]


def built(name: str, num_classes: int = CLASSES, **extra) -> torch.nn.Module:
    return get_model(name, **{"num_classes": num_classes, **get_entry(name).test_kwargs, **extra})


def under(key: str, modules) -> bool:
    return any(key.startswith(m + ".") for m in modules)


def perturbed(model: torch.nn.Module, seed: int) -> dict:
    """The model's state_dict with every float tensor drawn anew, so a load is visible."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", cases("detection", "segmentation"))
def test_whole_file_loads_all_but_the_class_predictors(name, tmp_path):
    """A state_dict of the same architecture for other classes (5, not 3): every tensor but the
    predictors' is loaded; the predictors stay as built, shaped for this model's classes."""
    entry = get_entry(name)
    assert entry.backbone and entry.predictors
    source = perturbed(built(name, num_classes=5), seed=1)
    torch.save(source, tmp_path / "whole.pt")
    model = built(name)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if under(k, entry.predictors)}
    kept = {k: v for k, v in model.state_dict().items() if k not in fresh}
    assert fresh and all(source[k].shape == v.shape for k, v in kept.items())

    record = load_pretrained(model, entry, tmp_path / "whole.pt")

    assert record["part"] == "whole" and record["predictors_fresh"] == list(entry.predictors)
    assert record["tensors_loaded"] == len(model.state_dict()) - len(fresh)
    for key, value in model.state_dict().items():
        if key in fresh:
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, source[key]), key


@pytest.mark.parametrize("name", cases("detection", "segmentation"))
def test_backbone_part_fills_the_backbone_alone(name, tmp_path):
    entry = get_entry(name)
    source = perturbed(built(name), seed=2)
    torch.save(source, tmp_path / "whole.pt")
    model = built(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = load_pretrained(model, entry, tmp_path / "whole.pt", "backbone")
    assert record["part"] == "backbone"
    backbone = [k for k in before if under(k, entry.backbone)]
    assert record["tensors_loaded"] == len(backbone) and record["tensors_unused"] == len(before) - len(backbone)
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key] if key in backbone else before[key]), key


@pytest.mark.slow
def test_torchvision_coco_layout_and_imagenet_backbone(tmp_path):
    """The files people have: torchvision's whole Faster R-CNN MobileNetV3 (COCO's 91 classes)
    and its ImageNet MobileNetV3-Large classifier (features.* is the detector's backbone.body.*)."""
    coco = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    torch.save(coco.state_dict(), tmp_path / "coco.pth")
    entry = get_entry("fasterrcnn_mobilenet_320")
    # torchvision's box head is 1024 wide; the registered default is 256: refused, naming fc6
    with pytest.raises(PretrainedError) as refused:
        load_pretrained(built("fasterrcnn_mobilenet_320"), entry, tmp_path / "coco.pth")
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / "coco.pth") in message
    assert "4 mismatched shapes (roi_heads.box_head.fc6.weight file 1024x12544 vs model 256x12544" in message
    assert "its backbone alone fits (308 tensors)" in message and refused.value.backbone_fits

    model = built("fasterrcnn_mobilenet_320", representation_size=1024)
    record = load_pretrained(model, entry, tmp_path / "coco.pth")
    assert record["part"] == "whole" and record["tensors_unused"] == 4  # the 91-class predictor
    assert model.roi_heads.box_predictor.cls_score.out_features == CLASSES + 1
    assert torch.equal(model.rpn.head.cls_logits.weight, coco.rpn.head.cls_logits.weight)

    imagenet = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pth")
    model = built("fasterrcnn_mobilenet_320")
    record = load_pretrained(model, entry, tmp_path / "imagenet.pth")
    assert record["part"] == "backbone" and record["key_prefixes"] == {"file": "features.", "model": "backbone.body."}
    assert torch.equal(model.backbone.body["5"].block[0][0].weight, imagenet.features[5].block[0][0].weight)


@pytest.mark.unit
def test_files_that_do_not_fit_are_named_in_one_line(tmp_path):
    entry, model = get_entry("unet"), built("unet")
    state = model.state_dict()
    short = {k: v for k, v in state.items() if not k.startswith("up.")}
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(PretrainedError, match=r"short\.pt does not fit unet's whole model: \d+ missing keys \(up\.0\."):
        load_pretrained(model, entry, tmp_path / "short.pt", "whole")
    # auto with only the encoder's tensors: the backbone, and it fits
    encoder = {k: v for k, v in state.items() if k.startswith(("inc.", "down."))}
    torch.save(encoder, tmp_path / "encoder.pt")
    assert load_pretrained(model, entry, tmp_path / "encoder.pt")["part"] == "backbone"

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(PretrainedError, match="shares no tensor with unet's backbone .*conv1.weight"):
        load_pretrained(model, entry, tmp_path / "resnet18.pth")
    torch.save({"model": state, "epoch": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt is not a state_dict"):
        load_pretrained(model, entry, tmp_path / "checkpoint.pt")


# -- the trainers' flags, with weights saved from a model trained here ---------------------


@pytest.fixture(scope="module")
def shapes_b(tmp_path_factory):
    """A second shapes dataset (another seed) to fine-tune on."""
    return shapes.generate(
        tmp_path_factory.mktemp("b") / "voc", "voc", n=24, size=96, seed=7, max_shapes=1, progress=False
    )


DET_ARGS = ["--model", "fcos_resnet", "--input-size", "64", "--batch-size", "8", "--threads", "1"]
DET_ARGS += ["--workers", "0", "--pictures", "0", "--no-progress"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_detection_trainer_starts_from_a_trained_detector(shapes_detector, shapes_b, tmp_path):
    source = shapes_detector.run / "model.pt"
    out = tmp_path / "ft"
    argv = ["--data", str(shapes_b), "--out", str(out), *DET_ARGS, "--epochs", "1", "--lr", "1e-5"]
    assert train_detection.cli([*argv, "--pretrained", str(source)]) == 0
    meta = json.loads((out / "model.json").read_text())
    record = meta["pretrained"]
    assert record["file"] == str(source) and record["part"] == "whole"
    assert record["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["predictors_fresh"] == ["head.classification_head.cls_logits"]
    # one epoch at a tiny learning rate: the trunk is still the trained one, not a random init
    start = torch.load(source, weights_only=True)["backbone.body.stages.2.0.conv1.weight"]
    tuned = torch.load(out / "model.pt", weights_only=True)["backbone.body.stages.2.0.conv1.weight"]
    assert torch.nn.functional.cosine_similarity(start.flatten(), tuned.flatten(), dim=0) > 0.99

    assert train_detection.cli([*argv, "--force"]) == 0  # and without the flag, a random start is recorded
    assert json.loads((out / "model.json").read_text())["pretrained"] is None


@pytest.mark.unit
def test_detection_trainer_refuses_in_one_line(shapes_b, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--data", str(shapes_b), "--out", str(out), *DET_ARGS, "--epochs", "1"]
    assert train_detection.cli([*base, "--pretrained", str(tmp_path / "none.pt")]) == 2
    want = "is neither a file nor a training output folder holding model.pt"
    assert capsys.readouterr().err == f"error: --pretrained {tmp_path / 'none.pt'} {want}\n"
    assert train_detection.cli([*base, "--pretrained-part", "backbone"]) == 2
    assert capsys.readouterr().err == "error: --pretrained-part backbone needs --pretrained FILE\n"
    assert train_detection.cli([*base, "--pretrained", "x.pt", "--pretrained-part", "head"]) == 2
    assert "--pretrained-part: invalid choice: 'head'" in capsys.readouterr().err
    # an FCOS on a wider trunk: the same keys, other shapes
    torch.save(built("fcos_resnet", widths=(16, 32, 64, 128)).state_dict(), tmp_path / "narrow.pt")
    assert train_detection.cli([*base, "--pretrained", str(tmp_path / "narrow.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --pretrained {tmp_path / 'narrow.pt'} does not fit")
    assert "mismatched shapes (backbone.body.stem.0.weight file 16x3x7x7 vs model 32x3x7x7" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_segmentation_trainer_starts_from_a_trained_segmenter(tmp_path):
    """A U-Net trained here on one shapes dataset starts the next on another seed: whole, then
    its encoder alone; the record names the file and its sha256."""
    a = shapes.generate(tmp_path / "a", "masks", n=12, size=48, seed=3, progress=False)
    b = shapes.generate(tmp_path / "b", "masks", n=12, size=48, seed=4, progress=False)
    common = ["--model-arg", "depth=2", "--model-arg", "width=8", "--input-size", "32", "--epochs", "1"]
    common += ["--batch-size", "4", "--workers", "0", "--threads", "1", "--no-progress", "--pictures", "0"]
    assert train_segmentation.cli(["--data", str(a), "--out", str(tmp_path / "ra"), *common]) == 0
    source = tmp_path / "ra" / "model.pt"
    for part, loaded in (("whole", 64), ("backbone", 36)):
        out = tmp_path / f"rb_{part}"
        given = source.parent if part == "whole" else source  # the run's folder stands for its model.pt
        argv = ["--data", str(b), "--out", str(out), *common, "--pretrained", str(given), "--pretrained-part", part]
        assert train_segmentation.cli(argv) == 0
        record = json.loads((out / "model.json").read_text())["pretrained"]
        assert record["part"] == part and record["tensors_loaded"] == loaded and record["file"] == str(source)
        assert record["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


# -- the record that a pretrained start beats a random one: its bench, run short ------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pretrained_bench_writes_its_record(tmp_path, capsys):
    from scripts.bench import pretrained as bench

    out = tmp_path / "record.json"
    argv = ["--n-a", "20", "--n-b", "16", "--n-val", "8", "--pretrain-epochs", "1", "--finetune-epochs", "1"]
    argv += ["--finetune-seeds", "0", "--out", str(out), "--work", str(tmp_path / "work")]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["schema"] == "bundle-record/1" and record["name"] == "record"
    assert record["command"].endswith(" ".join(argv)) and record["date"].startswith("20")
    assert record["machine"]["cores"] > 0 and record["machine"]["cpu"]
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["torchvision"] == torchvision.__version__
    for task, metric in (("detection", "map_50"), ("segmentation", "miou")):
        result = record["figures"]["results"][task]
        assert result["metric"] == metric
        assert result["pretrained_record"]["part"] == "whole" and len(result["pretrained_record"]["sha256"]) == 64
        for arm in ("pretrained", "random"):
            (run,) = result["arms"][arm]
            assert 0 <= run["best"] <= 1 and len(run["per_epoch"]) == 1
    printed = capsys.readouterr().out
    assert "detection: map_50 pretrained" in printed and "segmentation: miou pretrained" in printed


@pytest.mark.unit
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seed-a", "3", "--seed-b", "3"], "--seed-a 3, --seed-b 3, --seed-val 2: the three datasets need three"),
        (["--finetune-epochs", "0"], "--finetune-epochs must be at least 1, got 0"),
        (["--tasks", "classification"], "--tasks: invalid choice: 'classification'"),
    ],
)
def test_pretrained_bench_refuses_bad_flags_in_one_line(argv, words, tmp_path, capsys):
    from scripts.bench import pretrained as bench

    assert bench.main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


@pytest.mark.unit
def test_an_rgb_file_starts_a_grey_segmenter(tmp_path):
    """The first conv's weight is averaged over its inputs (as transfer learning does), so a
    grey image acts as the RGB original would; everything else loads as it is."""
    entry = get_entry("unet")
    source = perturbed(built("unet"), seed=3)
    torch.save(source, tmp_path / "rgb.pt")
    grey = built("unet", in_channels=1)
    record = load_pretrained(grey, entry, tmp_path / "rgb.pt")
    assert record["stem_averaged_to_channels"] == 1
    torch.testing.assert_close(grey.inc[0].weight, source["inc.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(grey.up[0].conv[0].weight, source["up.0.conv.0.weight"])
