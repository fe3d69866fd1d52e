"""The shapes generator and the detection/segmentation readers: every layout, and every
bad annotation refused at read time with a message naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.measure import label as connected_components
from skimage.measure import regionprops
from torchvision import tv_tensors

from model_defs.preprocessing import detection_eval_transform, detection_train_transform
from training import shapes, train_detection
from training.datasets import DatasetError
from training.det_datasets import DetectionDataset, SegmentationDataset, read_coco, read_detection, read_masks, read_voc

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
N, SIZE = 6, 96


@pytest.fixture(scope="session")  # cheap data: each xdist worker makes its own
def generated(tmp_path_factory) -> dict[str, Path]:
    """The same seed in all three layouts."""
    root = tmp_path_factory.mktemp("shapes")
    return {
        layout: shapes.generate(root / layout, layout, N, SIZE, seed=3, progress=False) for layout in shapes.LAYOUTS
    }


@pytest.fixture
def voc(generated, tmp_path) -> Path:
    return Path(shutil.copytree(generated["voc"], tmp_path / "voc"))


@pytest.fixture
def coco(generated, tmp_path) -> Path:
    return Path(shutil.copytree(generated["coco"], tmp_path / "coco"))


@pytest.fixture
def masks(generated, tmp_path) -> Path:
    return Path(shutil.copytree(generated["masks"], tmp_path / "masks"))


def mask_objects(mask_path: Path) -> set[tuple[int, tuple[int, int, int, int]]]:
    """(class index, [x1, y1, x2, y2]) of each painted shape, from the mask alone."""
    mask = np.asarray(Image.open(mask_path))
    regions = regionprops(connected_components(mask > 0, connectivity=2), intensity_image=mask)
    return {(int(r.intensity_max), (r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2])) for r in regions}


# -- generator ----------------------------------------------------------------------------


def test_voc_and_coco_boxes_are_the_exact_extent_of_the_painted_masks(generated):
    voc_spec = read_detection(generated["voc"])
    coco_spec = read_detection(generated["coco"])
    mask_spec = read_masks(generated["masks"])
    assert voc_spec.layout == "voc" and coco_spec.layout == "coco"
    assert voc_spec.classes == coco_spec.classes == list(shapes.CLASSES)
    assert mask_spec.classes == ["background", *shapes.CLASSES]
    assert len(voc_spec.samples) == len(coco_spec.samples) == len(mask_spec.samples) == N
    for v, c, m in zip(voc_spec.samples, coco_spec.samples, mask_spec.samples):
        from_voc = {(label + 1, tuple(int(x) for x in box)) for label, box in zip(v.labels, v.boxes)}
        from_coco = {(label + 1, tuple(int(x) for x in box)) for label, box in zip(c.labels, c.boxes)}
        assert from_voc == from_coco == mask_objects(m.mask)
        assert 1 <= len(from_voc) <= 4
        assert (v.width, v.height) == (SIZE, SIZE)


def test_images_are_painted_with_the_masks_shapes(generated):
    image = np.asarray(Image.open(generated["masks"] / "images" / "00000.png"), dtype=np.int16)
    mask = np.asarray(Image.open(generated["masks"] / "masks" / "00000.png"))
    regions = connected_components(mask > 0, connectivity=2)
    for k in range(1, regions.max() + 1):
        pixels = image[regions == k]
        assert np.abs(pixels - pixels[0]).max() == 0  # one solid colour per shape


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = shapes.generate(tmp_path / "a", "masks", 2, 64, seed=5, progress=False)
    b = shapes.generate(tmp_path / "b", "masks", 2, 64, seed=5, progress=False)
    c = shapes.generate(tmp_path / "c", "masks", 2, 64, seed=6, progress=False)
    read = lambda root: (root / "masks" / "00001.png").read_bytes()  # noqa: E731
    assert read(a) == read(b) != read(c)


def test_aspect_option_gives_several_sizes_with_the_longer_side_fixed(tmp_path):
    spec = read_detection(shapes.generate(tmp_path / "v", "voc", 8, 120, seed=0, aspect=2.0, progress=False))
    sizes = {(s.width, s.height) for s in spec.samples}
    assert len(sizes) > 1
    assert all(max(size) == 120 and min(size) >= 60 for size in sizes)


def test_cli_help_and_bad_arguments(tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "training.shapes", *a], cwd=REPO, capture_output=True, text=True)

    help_text = run("--help")
    assert help_text.returncode == 0 and "(default: voc)" in help_text.stdout
    bad = run("--out", str(tmp_path / "x"), "--n", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --n must be at least 1, got 0"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    taken = run("--out", str(tmp_path / "full"), "--n", "1")
    assert taken.returncode == 2 and "is not empty" in taken.stderr


# -- VOC ----------------------------------------------------------------------------------


def edit_xml(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def first_box(xml: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    bnd = ET.parse(xml).getroot().find("object/bndbox")
    return {t: bnd.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")}


def test_voc_box_outside_the_image_names_the_file(voc):
    xml = voc / "Annotations" / "00002.xml"
    edit_xml(xml, f"<xmax>{first_box(xml)['xmax']}</xmax>", f"<xmax>{SIZE + 10}</xmax>")
    with pytest.raises(DatasetError, match=r"00002\.xml object 1: box .* lies outside the 96x96 image"):
        read_voc(voc)


def test_voc_box_one_pixel_over_the_edge_is_clipped_not_refused(voc):
    xml = voc / "Annotations" / "00002.xml"
    edit_xml(xml, f"<xmax>{first_box(xml)['xmax']}</xmax>", f"<xmax>{SIZE + 1}</xmax>")
    assert read_voc(voc).samples[2].boxes[0][2] == SIZE


def test_voc_inverted_box_names_the_file(voc):
    xml = voc / "Annotations" / "00001.xml"
    box = first_box(xml)
    edit_xml(xml, f"<xmin>{box['xmin']}</xmin>", f"<xmin>{int(box['xmax']) + 5}</xmin>")
    with pytest.raises(DatasetError, match=r"00001\.xml object 1: box .* has x2 <= x1"):
        read_voc(voc)


def test_voc_unknown_class_names_the_file(voc):
    xml = voc / "Annotations" / "00003.xml"
    name = next(c for c in shapes.CLASSES if f"<name>{c}</name>" in xml.read_text())
    edit_xml(xml, f"<name>{name}</name>", "<name>hexagon</name>")
    with pytest.raises(
        DatasetError, match=r"00003\.xml object \d+: class 'hexagon' is not one of the 3 classes \(classes\.txt\)"
    ):
        read_voc(voc)


def test_voc_validation_set_with_a_class_the_training_set_lacks(voc):
    with pytest.raises(DatasetError, match=r"\.xml object \d+: class '(ellipse|triangle)' is not one of the 2 classes"):
        read_detection(voc, classes=["rectangle", "circle"])


def test_voc_missing_image_names_it(voc):
    (voc / "JPEGImages" / "00004.jpg").unlink()
    with pytest.raises(DatasetError, match=r"00004\.xml: image .*00004\.jpg does not exist"):
        read_voc(voc)


def test_voc_size_mismatch_and_broken_xml(voc):
    edit_xml(voc / "Annotations" / "00000.xml", "<width>96</width>", "<width>200</width>")
    with pytest.raises(DatasetError, match=r"00000\.xml: <size> says 200x96 but image .* is 96x96"):
        read_voc(voc)
    (voc / "Annotations" / "00000.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"00000\.xml is not valid XML"):
        read_voc(voc)


def test_voc_split_file(voc):
    (voc / "ImageSets" / "Main" / "val.txt").write_text("00001\n00003\n")
    spec = read_voc(voc, split="val")
    assert [s.path.name for s in spec.samples] == ["00001.jpg", "00003.jpg"]


# -- COCO ---------------------------------------------------------------------------------


def edit_coco(root: Path, change) -> None:
    path = root / "annotations.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_coco_unknown_category_names_the_file_and_image(coco):
    edit_coco(coco, lambda d: d["annotations"][0].update(category_id=9))
    with pytest.raises(
        DatasetError,
        match=r"annotations\.json annotation id 1 \(00000\.jpg\): "
        r"category_id 9 is not one of the categories \[1, 2, 3\]",
    ):
        read_coco(coco)


def test_coco_negative_width_is_an_inverted_box(coco):
    edit_coco(coco, lambda d: d["annotations"][0]["bbox"].__setitem__(2, -4))
    with pytest.raises(DatasetError, match=r"annotation id 1 \(00000\.jpg\): box .* has x2 <= x1"):
        read_coco(coco)


def test_coco_box_outside_the_image(coco):
    edit_coco(coco, lambda d: d["annotations"][1]["bbox"].__setitem__(1, SIZE - 2))
    with pytest.raises(DatasetError, match=r"annotation id 2 .* lies outside the 96x96 image"):
        read_coco(coco)


def test_coco_missing_image_and_bad_json(coco):
    (coco / "images" / "00005.jpg").unlink()
    with pytest.raises(DatasetError, match=r"annotations\.json image id 6: image .*00005\.jpg does not exist"):
        read_coco(coco)
    (coco / "annotations.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"annotations\.json is not valid JSON"):
        read_coco(coco)


def test_coco_json_file_as_data_and_crowd_skipped(coco):
    full = sum(len(s.boxes) for s in read_detection(coco).samples)
    edit_coco(coco, lambda d: d["annotations"][0].update(iscrowd=1))
    spec = read_detection(coco / "annotations.json")
    assert spec.layout == "coco" and sum(len(s.boxes) for s in spec.samples) == full - 1


# -- masks --------------------------------------------------------------------------------


def test_masks_wrong_size_names_the_mask(masks):
    Image.open(masks / "masks" / "00001.png").resize((50, 40)).save(masks / "masks" / "00001.png")
    with pytest.raises(DatasetError, match=r"mask .*00001\.png is 50x40 but its image .*00001\.png is 96x96"):
        read_masks(masks)


def test_masks_missing_mask_names_the_image(masks):
    (masks / "masks" / "00002.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*00002\.png has no mask .*masks/00002\.png"):
        read_masks(masks)


def test_masks_unknown_class_index_and_rgb_mask(masks):
    arr = np.asarray(Image.open(masks / "masks" / "00003.png")).copy()
    arr[0, 0] = 7
    Image.fromarray(arr).save(masks / "masks" / "00003.png")
    with pytest.raises(DatasetError, match=r"mask .*00003\.png holds class index 7 but classes\.txt names 4 classes"):
        read_masks(masks)
    Image.fromarray(arr).convert("RGB").save(masks / "masks" / "00003.png")
    with pytest.raises(DatasetError, match=r"mask .*00003\.png has mode RGB"):
        read_masks(masks)


def test_masks_ignore_index_and_classes_without_background(masks):
    arr = np.asarray(Image.open(masks / "masks" / "00000.png")).copy()
    arr[:2] = 255
    Image.fromarray(arr).save(masks / "masks" / "00000.png")
    (masks / "classes.txt").write_text("rectangle\nellipse\ntriangle\n")
    spec = read_masks(masks)
    assert spec.classes == ["background", "rectangle", "ellipse", "triangle"]
    image, mask = SegmentationDataset(spec.samples)[0]
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
    assert image.shape == (3, SIZE, SIZE) and mask.shape == (SIZE, SIZE) and int(mask[0, 0]) == 255


# -- torch datasets -------------------------------------------------------------------------


def test_detection_dataset_scales_and_flips_boxes_with_the_image(generated):
    spec = read_detection(generated["voc"])
    x, target, _ = DetectionDataset(spec.samples, detection_eval_transform(192))[0]
    assert x.shape == (3, 192, 192) and x.dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor(spec.samples[0].boxes) * 2)
    assert target["labels"].tolist() == [k + 1 for k in spec.samples[0].labels]  # 0 is the background
    flipped, ftarget, _ = DetectionDataset(spec.samples, detection_train_transform(96, hflip_prob=1.0))[0]
    expected = torch.tensor(spec.samples[0].boxes)[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [SIZE, 0, SIZE, 0]
    )
    torch.testing.assert_close(ftarget["boxes"], expected)


def test_trainer_refuses_a_bad_annotation_with_one_line(voc, capsys):
    xml = voc / "Annotations" / "00001.xml"
    edit_xml(xml, f"<xmax>{first_box(xml)['xmax']}</xmax>", "<xmax>500</xmax>")
    assert train_detection.cli(["--data", str(voc), "--out", str(voc.parent / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "00001.xml object 1" in err[0]
    assert not (voc.parent / "run").exists()


def test_trainer_reads_the_coco_layout_end_to_end(coco, tmp_path):
    out = tmp_path / "run"
    assert (
        train_detection.cli(
            [
                "--data",
                str(coco),
                "--val-fraction",
                "0.34",
                "--model",
                "fcos_resnet",
                "--input-size",
                "96",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--workers",
                "0",
                "--pictures",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "detection" and meta["dataset"]["layout"] == "coco"
    assert meta["dataset"]["train_images"] + meta["dataset"]["val_images"] == N and meta["dataset"]["val_images"] == 2
    assert meta["arch_args"]["image_size"] == meta["preprocessing"]["input_size"] == 96
    assert 0.0 <= meta["metrics"]["map_50"] <= 1.0 and (out / "detections.png").is_file()
