"""The one place images are decoded and turned into model input.

Training (its validation pass) and every handler call the same functions here, so a
served model sees exactly the tensor it saw when it was evaluated. This module ships
inside every `.mar` next to the registry.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2

from model_defs.registry import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# The most pixels (width x height) a served image may have unless the archive's handler
# section says otherwise (`--handler-option max_pixels=N`): a 40-megapixel RGB image
# already takes 120 MB decoded.
DEFAULT_MAX_PIXELS = 40_000_000
ORIENTATION_TAG = 0x0112  # EXIF orientation


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can decode; the message says why."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (a decompression bomb, or just too big)."""


def check_pixels(what: str, size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse an image of more than `max_pixels` (width x height), known from its header."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"max_pixels={max_pixels:,}; send a smaller image"
        )


def decode_image(source: bytes | bytearray | str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open image bytes or a file fully (so truncation is found here, not later).

    With `max_pixels`, an image whose width x height exceeds it is refused from its header,
    before any pixel is decoded (PIL opens lazily), so a small file that would decompress
    to gigabytes costs nothing.
    """
    what = str(source) if isinstance(source, (str, Path)) else "image data"
    if isinstance(source, (bytes, bytearray)) and len(source) == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    fp: io.BytesIO | str | Path = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(fp) as img:
            check_pixels(what, img.size, max_pixels)
            img.seek(0)  # animated GIF/WebP: the first frame
            img.load()
            return ImageOps.exif_transpose(img) or img.copy()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{what} is not an image format PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{what} is too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{what} could not be decoded ({e})") from None


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3).

    16-bit and 32-bit grey are scaled to 8 bits (PIL's own convert would clip them);
    transparency is composited over white, as an image viewer shows it.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8))
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img
    if target == "L" and img.mode not in ("1", "RGB"):
        img = img.convert("RGB")
    return img.convert(target)


def load_image(source: bytes | bytearray | str | Path, channels: int, max_pixels: int | None = None) -> Image.Image:
    """Decode and convert: what both training and serving do with every image."""
    return to_model_mode(decode_image(source, max_pixels), channels)


def fast_jpeg_mode(data: bytes | bytearray, channels: int, max_pixels: int | None = None) -> ImageReadMode | None:
    """The torchvision.io mode that decodes these bytes to the pixels `load_image` gives, or
    None when only PIL can: an upright RGB or grey JPEG qualifies. Reads the header only, and
    refuses an image over `max_pixels` from it (ImageTooLargeError)."""
    if bytes(data[:3]) != b"\xff\xd8\xff" or len(data) <= 3:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            size, mode, orientation = img.size, img.mode, img.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # let load_image word the error
    # An RGB JPEG asked for grey goes to PIL: its luma formula differs from libjpeg's Y.
    if orientation != 1 or not (mode == "L" or (mode == "RGB" and channels == 3)):
        return None
    check_pixels("image data", size, max_pixels)
    return ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB


def load_image_tensor(
    data: bytes | bytearray,
    channels: int,
    max_pixels: int | None = None,
    device: str | torch.device = "cpu",
    on_fallback: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Image bytes → uint8 tensor (C, H, W) with the pixels `load_image` gives, faster.

    What the handlers call on every request. An upright RGB or grey JPEG (most requests)
    is decoded by torchvision.io straight into a tensor: the same libjpeg-turbo pixels as
    PIL (tests/test_preprocessing.py checks they are equal) in about a third of the time,
    with no PIL image in between. Every other image (PNG, CMYK, EXIF-rotated, colour to
    grey, anything torchvision refuses) goes through `load_image`, which also words the
    errors. (torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec;
    they are pinned here and the PIL path remains if they go.)
    The pixel limit is checked from the header first in both cases. With a CUDA `device`
    the JPEG is decoded on the GPU (nvJPEG, whose pixels may differ from libjpeg-turbo's
    by a level or two); other images are decoded on the CPU and stay there.
    `on_fallback` is called for each image PIL decoded (the handlers count them).
    """
    mode = fast_jpeg_mode(data, channels, max_pixels)
    if mode is not None:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode, device=device)
        except RuntimeError:
            pass  # truncated or corrupt: load_image decides and says why
    image = v2.functional.pil_to_tensor(load_image(data, channels, max_pixels))
    if on_fallback is not None:
        on_fallback()
    return image


def load_image_tensors(
    datas: list[bytes],
    channels: int,
    max_pixels: int | None = None,
    device: str | torch.device = "cuda",
    on_fallback: Callable[[], None] | None = None,
) -> list[torch.Tensor | ImageDecodeError]:
    """Many requests' images at once, each as `load_image_tensor` gives it, or its error in its place.

    The upright JPEGs go to nvJPEG in one batched call on `device` (per image, a GPU worker
    spends more time decoding than inferring: scripts/bench/gpu.py); the others, and every
    JPEG of a batch the batched call refuses, are decoded one by one."""
    out: list = [None] * len(datas)
    fast = []
    for i, data in enumerate(datas):
        try:
            if fast_jpeg_mode(data, channels, max_pixels) is None:
                out[i] = load_image_tensor(data, channels, max_pixels, on_fallback=on_fallback)
            else:
                fast.append(i)
        except ImageDecodeError as e:
            out[i] = e
    if fast:
        try:
            decoded = decode_jpeg(
                [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in fast],
                mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB,
                device=device,
            )
        except RuntimeError:  # one corrupt JPEG fails the whole call: find it one by one
            decoded = [None] * len(fast)
        for i, tensor in zip(fast, decoded):
            if tensor is None:
                try:
                    tensor = load_image_tensor(datas[i], channels, max_pixels, device, on_fallback)
                except ImageDecodeError as e:
                    tensor = e
            out[i] = tensor
    return out


def _interpolation(cfg: DataConfig) -> InterpolationMode:
    return InterpolationMode(cfg.interpolation)


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """PIL image or uint8 tensor → normalized float tensor (C, H, W): resize the short side,
    center-crop.

    Resizing happens on uint8, before the conversion to float, which is both faster and
    what the training validation pass does.
    """
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(cfg.resize_size, interpolation=_interpolation(cfg), antialias=True),
            v2.CenterCrop(cfg.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


def train_transform(
    cfg: DataConfig,
    *,
    hflip_prob: float = 0.5,
    min_scale: float = 0.6,
    color_jitter: tuple[float, float, float, float] | None = None,
    rotation: float = 0.0,
) -> v2.Compose:
    """A classifier's training preset (torchvision's ClassificationPresetTrain): random resized
    crop, then, where asked, a random rotation of up to `rotation` degrees either way (the
    corners it uncovers are black), a horizontal flip and a colour jitter of (brightness,
    contrast, saturation, hue). Only the training images see it: evaluation and serving use
    `eval_transform` of the same DataConfig, so the augmentation never changes what a served
    model is given."""
    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(cfg.input_size, scale=(min_scale, 1.0), interpolation=_interpolation(cfg), antialias=True),
    ]
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation, interpolation=InterpolationMode.BILINEAR))
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    if color_jitter is not None and any(color_jitter):
        brightness, contrast, saturation, hue = color_jitter
        steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


# ==== Segmentation, generation and embedding ======================================================
# (training/train_segmentation.py, train_gan.py, train_simclr.py and handlers/segmenter.py,
# generator.py, embedder.py.) Embeddings use eval_transform above unchanged. A segmentation
# model sees the whole image squashed to input_size x input_size (no crop), so its mask
# covers the whole picture and is scaled back to the original size from the logits.


def segmentation_transform(cfg: DataConfig) -> v2.Compose:
    """PIL image → normalized float tensor (C, input_size, input_size): resize, no crop."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((cfg.input_size, cfg.input_size), interpolation=_interpolation(cfg), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


def segmentation_train_transform(cfg: DataConfig, *, hflip_prob: float = 0.5, min_scale: float = 1.0) -> v2.Compose:
    """Joint augmentation of (tv_tensors.Image, tv_tensors.Mask): the eval resize, then an
    optional square random crop scaled back (min_scale < 1) and a horizontal flip.
    Masks are resized with nearest-neighbour by torchvision, so class indices stay exact."""
    from torchvision import tv_tensors

    size = (cfg.input_size, cfg.input_size)
    steps = [v2.Resize(size, interpolation=_interpolation(cfg), antialias=True)]
    if min_scale < 1:
        steps.append(
            v2.RandomResizedCrop(
                size, scale=(min_scale, 1.0), ratio=(1.0, 1.0), interpolation=_interpolation(cfg), antialias=True
            )
        )
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(cfg.mean, cfg.std),
    ]
    return v2.Compose(steps)


def logits_to_mask(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(num_classes, h, w) logits → uint8 class-index mask of `size` (height, width).

    The logits, not the mask, are scaled (bilinearly) to the original size before the
    argmax, so class borders are smooth at any image size."""
    up = torch.nn.functional.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(0).to(torch.uint8).cpu().numpy()


def class_palette(num_classes: int) -> list[int]:
    """A flat PIL palette: background black, then well-separated colours (tab10, then hashed)."""
    base = [
        (0, 0, 0),
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ]
    colours = [base[i] if i < len(base) else ((i * 97) % 256, (i * 57) % 256, (i * 151) % 256) for i in range(256)]
    return [c for rgb in colours for c in rgb]


def mask_to_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """A palette ("P") image whose pixel values are the class indices: readable as indices
    (np.asarray) and viewable in colour."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), "L").convert("P")
    img.putpalette(class_palette(num_classes))
    return img


def tensor_to_images(x: torch.Tensor, cfg: DataConfig) -> list[Image.Image]:
    """Model-space images (N, C, H, W), e.g. a generator's output, → PIL images: undo the
    normalization, clamp to [0, 1] and round to 8 bits."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = ((x.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).numpy()
    if arrays.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], "L") for a in arrays]
    return [Image.fromarray(a, "RGB") for a in arrays]


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def simclr_view_transform(
    cfg: DataConfig, *, min_scale: float = 0.3, hflip_prob: float = 0.5, jitter: float = 0.4, rotation: float = 0.0
) -> v2.Compose:
    """One random SimCLR view of a PIL image: random resized crop, flip, colour jitter
    (brightness/contrast only on grey), random grey (RGB), optional small rotation."""
    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(cfg.input_size, scale=(min_scale, 1.0), interpolation=_interpolation(cfg), antialias=True),
    ]
    if rotation:
        steps.append(v2.RandomRotation(rotation))
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    if jitter > 0:
        colour = dict(saturation=jitter, hue=min(0.5, jitter / 4)) if cfg.channels == 3 else {}
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=jitter, contrast=jitter, **colour)], p=0.8))
    if cfg.channels == 3:
        steps.append(v2.RandomGrayscale(0.2))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


# ==== end of segmentation, generation and embedding section ====


# ==== detection (owned by the detection part: model_defs/detection.py, handlers/object_detector.py) ====
# A detector sees the image resized so its LONGER side is DataConfig.input_size (aspect ratio
# kept, no crop) as float [0, 1]; the torchvision model normalizes it inside. Its boxes are in
# that resized frame and go back to the original image with `boxes_to_original`.


def detection_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(new_width, new_height) with the longer side = max_size, the aspect ratio kept."""
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def detection_resize(img: Image.Image | torch.Tensor, max_size: int, boxes=None):
    """RGB PIL image or uint8 tensor (and its tv_tensors.BoundingBoxes) → the uint8 tensor
    resized so its longer side is max_size (and the boxes moved with it): the first step of
    every detection transform; an image already at that size is returned as it is."""
    height, width = v2.functional.get_size(img)
    new_w, new_h = detection_size(width, height, max_size)
    x = v2.functional.pil_to_tensor(img) if isinstance(img, Image.Image) else img
    x = v2.functional.resize(x, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return x if boxes is None else (x, v2.functional.resize(boxes, [new_h, new_w]))


def detection_input(img: Image.Image | torch.Tensor, max_size: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """RGB PIL image or uint8 tensor → (float tensor 3 x H' x W' in [0, 1], (scale_x, scale_y))."""
    height, width = v2.functional.get_size(img)
    x = detection_resize(img, max_size)
    return v2.functional.to_dtype(x, torch.float32, scale=True), (x.shape[-1] / width, x.shape[-2] / height)


def boxes_to_original(boxes: torch.Tensor, scale: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """Boxes [x1, y1, x2, y2] in the resized frame → pixels of the original `size` (w, h), clipped."""
    sx, sy = scale
    out = boxes.detach().float().cpu() / torch.tensor([sx, sy, sx, sy])
    out[:, 0::2] = out[:, 0::2].clamp(0, size[0])
    out[:, 1::2] = out[:, 1::2].clamp(0, size[1])
    return out


def detection_train_transform(max_size: int, hflip_prob: float = 0.5, vflip_prob: float = 0.0):
    """(PIL image or uint8 tensor, tv_tensors.BoundingBoxes) → (float tensor, boxes): the
    eval resize, flips and a mild colour jitter, moving the boxes with the image."""
    flips = []
    if hflip_prob > 0:
        flips.append(v2.RandomHorizontalFlip(hflip_prob))
    if vflip_prob > 0:
        flips.append(v2.RandomVerticalFlip(vflip_prob))
    flip, jitter = v2.Compose(flips), v2.ColorJitter(0.2, 0.2, 0.2, 0.02)

    def transform(img: Image.Image | torch.Tensor, boxes):
        x, boxes = flip(*detection_resize(img, max_size, boxes))
        return v2.functional.to_dtype(jitter(x), torch.float32, scale=True), boxes

    return transform


def detection_eval_transform(max_size: int):
    """The same (image, boxes) → (tensor, boxes) signature as training, with no augmentation."""

    def transform(img: Image.Image | torch.Tensor, boxes):
        x, boxes = detection_resize(img, max_size, boxes)
        return v2.functional.to_dtype(x, torch.float32, scale=True), boxes

    return transform


# ==== end of detection section ====
