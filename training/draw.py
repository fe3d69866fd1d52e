"""Draw what a model answered: a detector's boxes with labels and scores, a segmenter's class
mask in colour over the image, a generator's samples as a grid. Training's pictures and
scripts/visualize share it."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class index (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_detections(image: Image.Image, detections: list[dict], classes: list[str] | None = None) -> Image.Image:
    """A copy of `image` with each {"label", "score", "box"} drawn (box in image pixels)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    width = max(2, round(max(out.size) / 250))
    names = list(classes or sorted({d["label"] for d in detections}))
    for d in detections:
        c = colour(names.index(d["label"]) if d["label"] in names else len(names))
        x1, y1, x2, y2 = d["box"]
        draw.rectangle([x1, y1, x2, y2], outline=c, width=width)
        text = f"{d['label']} {d['score']:.2f}" if "score" in d else str(d["label"])
        tx, ty = x1, max(0, y1 - 12)
        left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=c)
        draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
    return out


def enlarge_small(image: Image.Image, detections: list[dict], target: int = 320) -> tuple[Image.Image, list[dict]]:
    """An image whose longer side is under `target` enlarged to it, with its boxes, so that
    labels drawn on it stay readable."""
    zoom = target / max(image.size)
    if zoom <= 1:
        return image, detections
    image = image.resize((round(image.width * zoom), round(image.height * zoom)), Image.Resampling.BILINEAR)
    return image, [{**d, "box": [v * zoom for v in d["box"]]} for d in detections]


def draw_mask(image: Image.Image, mask: np.ndarray, classes: list[str], alpha: float = 0.5) -> Image.Image:
    """`image` with each non-background class of `mask` (H x W class indices, the image's
    size) blended in its colour, and a legend of the classes present."""
    out = image.convert("RGB")
    if mask.shape != (out.height, out.width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {out.width}x{out.height}")
    pixels = np.asarray(out, dtype=np.float32).copy()
    present = [int(k) for k in np.unique(mask) if k != 0 and k < len(classes)]
    for k in present:
        sel = mask == k
        pixels[sel] = (1 - alpha) * pixels[sel] + alpha * np.array(colour(k - 1), dtype=np.float32)
    out = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for row, k in enumerate(present):
        draw.rectangle([4, 4 + 14 * row, 14, 14 + 14 * row], fill=colour(k - 1))
        draw.text((18, 3 + 14 * row), classes[k], fill=(255, 255, 255))
    return out


def mask_row(image: Image.Image, truth: np.ndarray, pred: np.ndarray, classes: list[str], cell: int = 256) -> list:
    """One validation image's pictures: the predicted mask over the image, the true mask and the
    predicted one (255, ignored, shown as background), scaled up to `cell` pixels so that
    small images stay readable."""
    lut = np.array([(0, 0, 0)] + [colour(k - 1) for k in range(1, 256)], dtype=np.uint8)
    scale = max(1.0, cell / max(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    return [
        draw_mask(image, pred, classes).resize(size, Image.Resampling.BILINEAR),
        Image.fromarray(lut[np.where(truth == 255, 0, truth)]).resize(size, Image.Resampling.NEAREST),
        Image.fromarray(lut[pred]).resize(size, Image.Resampling.NEAREST),
    ]


def grid(images: list[Image.Image], columns: int = 4, cell: int = 320) -> Image.Image:
    """Images scaled to fit `cell` x `cell` and laid out in a grid (for a quick look)."""
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, max(1, rows) * cell), (32, 32, 32))
    for i, img in enumerate(images):
        img = img.copy()
        img.thumbnail((cell, cell))
        sheet.paste(img, ((i % columns) * cell, (i // columns) * cell))
    return sheet


def save_samples(images, cfg, path) -> None:
    """Generated images (normalized as the data config `cfg` says) as a square grid at `path`."""
    import torch
    import torchvision

    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (cfg.mean, cfg.std))
    nrow = max(1, round(len(images) ** 0.5))
    torchvision.utils.save_image(images * std + mean, path, nrow=nrow, padding=2, pad_value=1.0)
