"""Shapes of known class painted on real photographs: exact ground truth for detection and
segmentation, written in the layouts people keep such data in.

    python -m training.shapes --out data/shapes_voc --layout voc --n 400 --size 320 --seed 0

Backgrounds are random crops of scikit-image's real photographs (nothing is downloaded).
On each one 1..--max-shapes rectangles, ellipses and triangles of random colour and size
are painted, never overlapping, so every box and mask is exact: a box is the pixel extent
of its painted shape. Layouts:

- voc:   root/JPEGImages/<id>.jpg, root/Annotations/<id>.xml (Pascal VOC: 1-based,
         inclusive pixel corners), root/ImageSets/Main/trainval.txt, root/classes.txt
- coco:  root/images/<id>.jpg, root/annotations.json (COCO: bbox = [x, y, w, h] in pixels,
         polygon segmentation, category ids from 1)
- masks: root/images/<id>.png, root/masks/<id>.png (uint8 class index, 0 = background),
         root/classes.txt (one name per line, index = line number: "background" first)

The same --seed gives the same files in every layout.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

CLASSES = ("rectangle", "ellipse", "triangle")
LAYOUTS = ("voc", "coco", "masks")
BACKGROUNDS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "grass",
    "gravel",
    "brick",
    "moon",
)


@dataclass
class Shape:
    label: int  # index into CLASSES
    polygon: list[tuple[float, float]]
    box: tuple[int, int, int, int]  # x1, y1, x2, y2: pixel extent, x2/y2 exclusive
    area: int  # painted pixels


def load_backgrounds() -> list[Image.Image]:
    from skimage import data

    images = []
    for name in BACKGROUNDS:
        arr = getattr(data, name)()
        images.append(Image.fromarray(arr).convert("RGB"))
    return images


def random_background(rng: np.random.Generator, backgrounds: list[Image.Image], width: int, height: int) -> Image.Image:
    """A random crop (30-100% of the photo's short side) resized to width x height."""
    photo = backgrounds[rng.integers(len(backgrounds))]
    pw, ph = photo.size
    side = rng.uniform(0.3, 1.0) * min(pw, ph)
    cw, ch = side * min(1.0, width / height), side * min(1.0, height / width)
    x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    crop = photo.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch)))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop.resize((width, height), Image.Resampling.BILINEAR)


def shape_polygon(
    label: int, cx: float, cy: float, w: float, h: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """The outline of one shape centred at (cx, cy) inside a w x h box."""
    name = CLASSES[label]
    if name == "rectangle":
        return [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    if name == "ellipse":
        return [
            (cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t))
            for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)
        ]
    # triangle: apex on one side of the box, base on the opposite side, in one of 4 directions
    apex = rng.uniform(-0.4, 0.4)
    direction = rng.integers(4)
    if direction == 0:  # apex up
        return [(cx + apex * w, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    if direction == 1:  # apex down
        return [(cx + apex * w, cy + h / 2), (cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2)]
    if direction == 2:  # apex left
        return [(cx - w / 2, cy + apex * h), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2)]
    return [(cx + w / 2, cy + apex * h), (cx - w / 2, cy + h / 2), (cx - w / 2, cy - h / 2)]


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def paint_image(
    rng: np.random.Generator,
    backgrounds: list[Image.Image],
    width: int,
    height: int,
    max_shapes: int,
    min_frac: float = 0.12,
    max_frac: float = 0.4,
) -> tuple[Image.Image, np.ndarray, list[Shape]]:
    """One image, its class-index mask (0 = background) and its shapes."""
    image = random_background(rng, backgrounds, width, height)
    mask = np.zeros((height, width), dtype=np.uint8)
    shapes: list[Shape] = []
    side = min(width, height)
    wanted = int(rng.integers(1, max_shapes + 1))
    for _ in range(wanted * 30):  # rejection sampling: shapes never overlap
        if len(shapes) == wanted:
            break
        label = int(rng.integers(len(CLASSES)))
        w = rng.uniform(min_frac, max_frac) * side
        h = float(np.clip(w * rng.uniform(0.6, 1.6), min_frac * side, max_frac * side))
        cx, cy = rng.uniform(w / 2 + 1, width - w / 2 - 1), rng.uniform(h / 2 + 1, height - h / 2 - 1)
        polygon = shape_polygon(label, cx, cy, w, h, rng)
        layer = Image.new("L", (width, height), 0)
        ImageDraw.Draw(layer).polygon(polygon, fill=1)
        painted = np.asarray(layer, dtype=bool)
        ys, xs = np.nonzero(painted)
        if len(xs) == 0:
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if any(_boxes_touch(box, s.box, margin=3) for s in shapes):
            continue
        ImageDraw.Draw(image).polygon(polygon, fill=random_colour(rng))
        mask[painted] = label + 1
        shapes.append(Shape(label, [(round(x, 2), round(y, 2)) for x, y in polygon], box, int(painted.sum())))
    # The image drawn with the same polygon covers exactly the mask's pixels.
    return image, mask, shapes


def _boxes_touch(a, b, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


# -- writers -----------------------------------------------------------------------------


def voc_xml(filename: str, width: int, height: int, shapes: list[Shape]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for s in shapes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASSES[s.label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = s.box  # VOC: 1-based inclusive pixel indices
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bnd, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def generate(
    out: Path,
    layout: str,
    n: int,
    size: int,
    seed: int,
    max_shapes: int = 4,
    aspect: float = 1.0,
    progress: bool = True,
    shape_size: tuple[float, float] = (0.12, 0.4),
) -> Path:
    """Write `n` images with their annotations under `out` in `layout`; returns `out`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    backgrounds = load_backgrounds()
    if layout == "voc":
        img_dir, ann_dir = out / "JPEGImages", out / "Annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    else:
        img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    if layout == "masks":
        (out / "masks").mkdir(exist_ok=True)

    coco = {
        "info": {"description": "shapes on scikit-image photographs", "version": "1.0"},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)],
    }
    ids = []
    for i in tqdm(range(n), desc=f"shapes ({layout})", unit="img", disable=not progress):
        width = height = size
        if aspect > 1.0:  # longer side = size, the other side up to `aspect` times shorter
            short = round(size / rng.uniform(1.0, aspect))
            width, height = (size, short) if rng.random() < 0.5 else (short, size)
        image, mask, shapes = paint_image(rng, backgrounds, width, height, max_shapes, *shape_size)
        stem = f"{i:05d}"
        ids.append(stem)
        if layout == "voc":
            image.save(img_dir / f"{stem}.jpg", quality=95)
            (ann_dir / f"{stem}.xml").write_bytes(voc_xml(f"{stem}.jpg", width, height, shapes))
        elif layout == "coco":
            image.save(img_dir / f"{stem}.jpg", quality=95)
            coco["images"].append({"id": i + 1, "file_name": f"{stem}.jpg", "width": width, "height": height})
            for s in shapes:
                x1, y1, x2, y2 = s.box
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": i + 1,
                        "category_id": s.label + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": s.area,
                        "iscrowd": 0,
                        "segmentation": [[v for xy in s.polygon for v in xy]],
                    }
                )
        else:
            image.save(img_dir / f"{stem}.png")
            Image.fromarray(mask, mode="L").save(out / "masks" / f"{stem}.png")
    if layout == "voc":
        (out / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
        (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    elif layout == "coco":
        (out / "annotations.json").write_text(json.dumps(coco) + "\n")
    else:
        (out / "classes.txt").write_text("\n".join(("background",) + CLASSES) + "\n")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder; must be empty or not exist unless --force (required)")
    p.add_argument("--layout", default="voc", choices=LAYOUTS, help="annotation layout to write (default: voc)")
    p.add_argument("--n", type=int, default=200, help="number of images (default: 200)")
    p.add_argument(
        "--size", type=int, default=256, help="image side in pixels (the longer side with --aspect) (default: 256)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images (default: 0)")
    p.add_argument(
        "--max-shapes", type=int, default=4, help="at most this many shapes per image, at least 1 (default: 4)"
    )
    p.add_argument(
        "--shape-size",
        type=float,
        nargs=2,
        default=(0.12, 0.4),
        metavar=("MIN", "MAX"),
        help="shape width range as shares of the image's shorter side (default: 0.12 0.4)",
    )
    p.add_argument(
        "--aspect",
        type=float,
        default=1.0,
        help="largest width/height (or height/width) ratio; 1.0 = square images (default: 1.0)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder (default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    problems = []
    if args.n < 1:
        problems.append(f"--n must be at least 1, got {args.n}")
    if args.size < 32:
        problems.append(f"--size must be at least 32 pixels, got {args.size}")
    if args.max_shapes < 1:
        problems.append(f"--max-shapes must be at least 1, got {args.max_shapes}")
    if not 0.02 <= args.shape_size[0] <= args.shape_size[1] <= 0.6:
        problems.append(
            f"--shape-size needs 0.02 <= MIN <= MAX <= 0.6, got {args.shape_size[0]:g} {args.shape_size[1]:g}"
        )
    if args.aspect < 1.0:
        problems.append(f"--aspect must be 1.0 or more, got {args.aspect}")
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} exists and is not a folder")
    elif out.is_dir() and any(out.iterdir()) and not args.force:
        problems.append(f"--out {out} is not empty (old files would mix with new ones); use --force to write anyway")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    generate(
        out,
        args.layout,
        args.n,
        args.size,
        args.seed,
        args.max_shapes,
        args.aspect,
        progress=not args.no_progress,
        shape_size=tuple(args.shape_size),
    )
    print(f"wrote {args.n} images ({args.layout} layout, classes: {', '.join(CLASSES)}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
