"""Read detection and segmentation datasets in the layouts people keep them in, checking
every annotation before training starts.

- voc:   root/Annotations/*.xml (+ root/JPEGImages/<filename>), Pascal VOC boxes
         (1-based, inclusive corners); optional root/ImageSets/Main/<split>.txt
- coco:  a COCO instances JSON (root/annotations.json, or the one root/annotations/*.json,
         or the .json file itself) with images in root/images/ (or next to the JSON)
- masks: root/images/<stem>.<ext> + root/masks/<stem>.png (one uint8 class index per pixel,
         0 = background, 255 = ignore); root/classes.txt names the indices, background first

Boxes come out as [x1, y1, x2, y2] in pixels (x2/y2 exclusive: a box covering columns
10..19 is [10, 20]); detection classes exclude the background, labels index `classes`.
A bad annotation (box outside the image, x2 <= x1, unknown class, mask of the wrong size,
missing file) is a `DatasetError` naming the file, raised at read time, never mid-epoch.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from model_defs.preprocessing import IMAGE_EXTENSIONS, detection_resize, load_image
from training.cache import DecodeCache
from training.datasets import DatasetError, Skipped, fingerprint, read_class_names

DETECTION_LAYOUTS = ("auto", "voc", "coco")
IGNORE_INDEX = 255  # masks: pixels not scored (the VOC convention)
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in annotation tools); it is clipped


@dataclass
class DetSample:
    path: Path
    width: int
    height: int
    boxes: list[list[float]]  # [x1, y1, x2, y2] in pixels
    labels: list[int]  # indices into DetectionSpec.classes (background excluded)


@dataclass
class DetectionSpec:
    root: Path
    layout: str
    classes: list[str]
    samples: list[DetSample] = field(default_factory=list)
    annotation_files: list[Path] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over the images and annotation files (relative path and content), sorted."""
        return fingerprint(self.root, [s.path for s in self.samples] + self.annotation_files)

    def box_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for s in self.samples:
            for label in s.labels:
                counts[label] += 1
        return counts


@dataclass
class MaskSample:
    image: Path
    mask: Path


@dataclass
class SegmentationSpec:
    root: Path
    classes: list[str]  # index = class value in the masks; classes[0] is the background
    samples: list[MaskSample] = field(default_factory=list)
    layout = "masks"

    def fingerprint(self) -> str:
        return fingerprint(self.root, [p for s in self.samples for p in (s.image, s.mask)])


def _image_size(path: Path, where: str) -> tuple[int, int]:
    if not path.is_file():
        raise DatasetError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as e:
        raise DatasetError(f"{where}: image {path} is not readable ({e})") from None


def check_box(box: list[float], width: int, height: int, where: str) -> list[float]:
    """Refuse a degenerate box or one outside the image; clip one within BOX_TOLERANCE."""
    x1, y1, x2, y2 = box
    if not all(np.isfinite(box)):
        raise DatasetError(f"{where}: box {box} has a non-finite coordinate")
    if x2 <= x1:
        raise DatasetError(f"{where}: box {_fmt(box)} has x2 <= x1 (empty or inverted box)")
    if y2 <= y1:
        raise DatasetError(f"{where}: box {_fmt(box)} has y2 <= y1 (empty or inverted box)")
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise DatasetError(f"{where}: box {_fmt(box)} lies outside the {width}x{height} image")
    return [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


# -- detection ---------------------------------------------------------------------------


def detect_layout(root: Path) -> str:
    if root.is_file() and root.suffix == ".json":
        return "coco"
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "annotations.json").is_file() or (root / "annotations").is_dir():
        return "coco"
    raise DatasetError(
        f"cannot tell the layout of {root}: expected Annotations/ (VOC) or annotations.json / annotations/*.json (COCO)"
    )


def read_detection(root: str | Path, layout: str = "auto", classes: list[str] | None = None) -> DetectionSpec:
    """Read a detection dataset; `classes` (from the training set) fixes names for a validation set."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset {root} does not exist")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "voc":
        spec = read_voc(root, classes)
    elif layout == "coco":
        spec = read_coco(root, classes)
    else:
        raise DatasetError(f"unknown detection layout {layout!r}; choose one of {', '.join(DETECTION_LAYOUTS)}")
    if not spec.samples:
        raise DatasetError(f"no annotated images found in {root} (layout: {layout})")
    return spec


def read_voc(root: Path, classes: list[str] | None = None, split: str | None = None) -> DetectionSpec:
    root = Path(root)
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    if not ann_dir.is_dir():
        raise DatasetError(f"folder {ann_dir} does not exist (VOC layout: Annotations/ + JPEGImages/)")
    if split:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(f"split file {split_file} does not exist")
        xml_files = [ann_dir / f"{line.split()[0]}.xml" for line in split_file.read_text().splitlines() if line.strip()]
    else:
        xml_files = sorted(ann_dir.glob("*.xml"))
    parsed = []  # (xml, image path, width, height, [(name, box, where)])
    for xml in xml_files:
        if not xml.is_file():
            raise DatasetError(f"annotation file {xml} does not exist")
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise DatasetError(f"{xml} is not valid XML ({e})") from None
        filename = (tree.findtext("filename") or "").strip() or f"{xml.stem}.jpg"
        image = img_dir / filename
        if not image.is_file():  # some tools write another extension than the file has
            image = next(
                (p for p in img_dir.glob(f"{Path(filename).stem}.*") if p.suffix.lower() in IMAGE_EXTENSIONS), image
            )
        width, height = _image_size(image, str(xml))
        size = tree.find("size")
        if size is not None and size.findtext("width") and size.findtext("height"):
            try:
                declared = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
            except ValueError:
                raise DatasetError(f"{xml}: <size> width and height must be numbers") from None
            if declared != (width, height):
                raise DatasetError(
                    f"{xml}: <size> says {declared[0]}x{declared[1]} but image {image} is {width}x{height}"
                )
        objects = []
        for k, obj in enumerate(tree.findall("object"), start=1):
            where = f"{xml} object {k}"
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise DatasetError(f"{where}: no <name>")
            bnd = obj.find("bndbox")
            try:
                xmin, ymin, xmax, ymax = (float(bnd.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                raise DatasetError(f"{where}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from None
            objects.append((name, [xmin - 1, ymin - 1, xmax, ymax], where))  # 1-based inclusive -> pixel edges
        parsed.append((xml, image, width, height, objects))

    source = "classes.txt"
    if classes is None:
        classes = read_class_names(root / "classes.txt")
    if classes is None:
        classes, source = (
            sorted({name for *_, objs in parsed for name, _, _ in objs}),
            "the names found in Annotations/",
        )
    index = {c: i for i, c in enumerate(classes)}
    spec = DetectionSpec(root, "voc", list(classes), annotation_files=[p[0] for p in parsed])
    for _, image, width, height, objects in parsed:
        sample = DetSample(image, width, height, [], [])
        for name, box, where in objects:
            if name not in index:
                raise DatasetError(
                    f"{where}: class {name!r} is not one of the {len(classes)} classes ({source}): {', '.join(classes)}"
                )
            sample.boxes.append(check_box(box, width, height, where))
            sample.labels.append(index[name])
        spec.samples.append(sample)
    return spec


def _find_coco_json(root: Path) -> Path:
    if root.is_file():
        return root
    if (root / "annotations.json").is_file():
        return root / "annotations.json"
    found = sorted((root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DatasetError(f"{root / 'annotations'} holds {len(found)} JSON files; pass the one to use as --data")
    raise DatasetError(f"no COCO annotation file in {root} (expected annotations.json or annotations/*.json)")


def read_coco(root: Path, classes: list[str] | None = None) -> DetectionSpec:
    """COCO instances JSON. Crowd annotations (iscrowd=1) are left out, as COCO evaluation does."""
    path = _find_coco_json(Path(root))
    base = path.parent.parent if path.parent.name == "annotations" else path.parent
    img_dir = base / "images" if (base / "images").is_dir() else base
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path} has no {key!r} list (not a COCO instances file)")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = {c["id"]: c["name"] for c in categories}
    if classes is None:
        classes = [c["name"] for c in categories]
    index = {c: i for i, c in enumerate(classes)}
    for cid, name in names.items():
        if name not in index:
            raise DatasetError(
                f"{path}: category {cid} {name!r} is not one of the {len(classes)} training classes: "
                f"{', '.join(classes)}"
            )
    spec = DetectionSpec(base, "coco", list(classes), annotation_files=[path])
    by_id = {}
    for im in data["images"]:
        image = img_dir / im["file_name"]
        width, height = _image_size(image, f"{path} image id {im['id']}")
        if (im.get("width"), im.get("height")) != (width, height):
            raise DatasetError(
                f"{path} image id {im['id']}: declared {im.get('width')}x{im.get('height')} but {image} "
                f"is {width}x{height}"
            )
        by_id[im["id"]] = DetSample(image, width, height, [], [])
    for ann in data["annotations"]:
        where = f"{path} annotation id {ann.get('id')}"
        if ann.get("iscrowd", 0):
            continue
        sample = by_id.get(ann.get("image_id"))
        if sample is None:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')} is not in 'images'")
        if ann.get("category_id") not in names:
            raise DatasetError(
                f"{where} ({sample.path.name}): category_id {ann.get('category_id')} is not one of the "
                f"categories {sorted(names)}"
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError(f"{where} ({sample.path.name}): bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = bbox
        sample.boxes.append(
            check_box([x, y, x + w, y + h], sample.width, sample.height, f"{where} ({sample.path.name})")
        )
        sample.labels.append(index[names[ann["category_id"]]])
    spec.samples = list(by_id.values())
    return spec


# -- segmentation masks ------------------------------------------------------------------


def read_masks(root: str | Path, classes: list[str] | None = None, check_values: bool = True) -> SegmentationSpec:
    """root/images + root/masks (+ classes.txt). Masks must be single-channel, the image's
    size, and hold only known class indices (or 255 = ignore)."""
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DatasetError(f"folder {d} does not exist (masks layout: images/ + masks/ + classes.txt)")
    if classes is None:
        classes = read_class_names(root / "classes.txt")
        if classes is not None and classes[0].lower() not in ("background", "_background_", "bg"):
            classes = ["background", *classes]  # classes.txt without the background: its lines are 1, 2, ...
    images = sorted(
        p
        for p in img_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not images:
        raise DatasetError(f"no images in {img_dir}")
    samples, largest = [], 0
    for image in images:
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise DatasetError(f"image {image} has no mask {mask}")
        size = _image_size(image, str(image))
        try:
            with Image.open(mask) as m:
                mode, msize = m.mode, m.size
                values = np.unique(np.asarray(m)) if check_values and mode in ("L", "P") else None
        except (OSError, ValueError) as e:
            raise DatasetError(f"mask {mask} is not readable ({e})") from None
        if mode not in ("L", "P"):
            raise DatasetError(f"mask {mask} has mode {mode}; expected a single-channel uint8 PNG of class indices")
        if msize != size:
            raise DatasetError(f"mask {mask} is {msize[0]}x{msize[1]} but its image {image} is {size[0]}x{size[1]}")
        if values is not None:
            values = values[values != IGNORE_INDEX]
            if values.size:
                top = int(values.max())
                if classes is not None and top >= len(classes):
                    raise DatasetError(
                        f"mask {mask} holds class index {top} but classes.txt names {len(classes)} classes "
                        f"(0 = background, ..., {len(classes) - 1})"
                    )
                largest = max(largest, top)
        samples.append(MaskSample(image, mask))
    if classes is None:
        classes = ["background", *(str(i) for i in range(1, largest + 1))]
    return SegmentationSpec(root, list(classes), samples)


# -- torch datasets ----------------------------------------------------------------------


class DetectionDataset(Dataset):
    """DetSample → (image, target, index) for torchvision detectors: labels are 1-based (0 is
    the background), boxes in the pixel frame of the transformed image.

    `transform(image: uint8 tensor, boxes: tv_tensors.BoundingBoxes)` → (tensor, boxes); see
    model_defs.preprocessing.detection_train_transform. With a cache, the image and its boxes
    are kept resized to `size` (the transform's own first step). An unreadable image yields
    Skipped.
    """

    def __init__(self, samples: list[DetSample], transform, size: int = 0, cache: DecodeCache | None = None):
        self.samples, self.transform, self.size, self.cache = samples, transform, size, cache or DecodeCache()

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]

        def decode():
            return {
                "image": v2.functional.pil_to_tensor(load_image(s.path, 3)),
                "boxes": torch.tensor(s.boxes, dtype=torch.float32).reshape(-1, 4),
            }

        def shrink(item):
            image, boxes = detection_resize(item["image"], self.size, xyxy(item["boxes"], item["image"]))
            return {"image": image, "boxes": boxes.as_subclass(torch.Tensor)}

        return self.cache.get([s.path], f"detection {self.size} {s.boxes}", decode, shrink)

    def __getitem__(self, i: int):
        try:
            item = self.read(i)
        except (ValueError, OSError):
            return Skipped(self.samples[i].path)
        tensor, boxes = self.transform(item["image"], xyxy(item["boxes"], item["image"]))
        target = {
            "boxes": boxes.as_subclass(torch.Tensor),
            "labels": torch.tensor(self.samples[i].labels, dtype=torch.int64) + 1,
        }
        return tensor, target, i


def xyxy(boxes: torch.Tensor, image: torch.Tensor) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))


class SegmentationDataset(Dataset):
    """MaskSample → (image, mask): tv_tensors.Image (uint8, C x H x W) and tv_tensors.Mask
    (int64, H x W), passed through `transforms(image, mask)` when given (torchvision v2
    transforms move both together). With a cache (and `cfg`), the image is kept resized to
    the input square (the transforms' own first step), and the mask with it unless
    `full_masks` (validation scores masks at their original size). An unreadable file
    yields Skipped."""

    def __init__(
        self,
        samples: list[MaskSample],
        transforms=None,
        channels: int = 3,
        cfg=None,
        full_masks: bool = False,
        cache: DecodeCache | None = None,
    ):
        self.samples, self.transforms, self.channels = samples, transforms, channels
        self.cfg, self.full_masks, self.cache = cfg, full_masks, cache or DecodeCache()

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]

        def decode():
            image = v2.functional.pil_to_tensor(load_image(s.image, self.channels))
            with Image.open(s.mask) as m:
                mask = torch.from_numpy(np.asarray(m, dtype=np.uint8).copy())
            return {"image": image, "mask": mask}

        def shrink(item):
            size = (self.cfg.input_size, self.cfg.input_size)
            resize = v2.Resize(size, interpolation=v2.InterpolationMode(self.cfg.interpolation), antialias=True)
            image = resize(item["image"])
            mask = item["mask"] if self.full_masks else resize(tv_tensors.Mask(item["mask"])).as_subclass(torch.Tensor)
            return {"image": image, "mask": mask}

        recipe = f"segmentation {self.channels} {self.cfg and (self.cfg.input_size, self.cfg.interpolation)}"
        recipe += " full mask" if self.full_masks else ""
        return self.cache.get([s.image, s.mask], recipe, decode, shrink)

    def __getitem__(self, i: int):
        try:
            item = self.read(i)
        except (ValueError, OSError):
            return Skipped(self.samples[i].image)
        image, mask = tv_tensors.Image(item["image"]), tv_tensors.Mask(item["mask"])
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask.to(torch.int64)
