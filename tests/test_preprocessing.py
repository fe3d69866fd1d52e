"""Decoding and preprocessing: every common format and mode, and training/serving parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from handlers.requests import extract_image_bytes
from model_defs import DataConfig
from model_defs.preprocessing import (
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    eval_transform,
    load_image,
    load_image_tensor,
    to_model_mode,
)
from tests.conftest import encode, image_variants
from training.datasets import ImageDataset, read_dataset

pytestmark = pytest.mark.unit

RGB_CONFIG = DataConfig(input_size=32, resize_size=36, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("channels", [1, 3])
def test_every_format_and_mode_decodes_to_the_model_mode(photos, channels):
    for name, data in image_variants(photos["chelsea"]).items():
        img = load_image(data, channels)
        assert img.mode == ("L" if channels == 1 else "RGB"), name
        tensor = eval_transform(RGB_CONFIG.replace(channels=channels))(img)
        assert tensor.shape == (channels, 32, 32), name
        assert torch.isfinite(tensor).all(), name


def test_16bit_grey_is_scaled_not_clipped(photos):
    grey8 = np.asarray(photos["camera"].resize((64, 64)))
    grey16 = Image.fromarray(grey8.astype(np.uint16) * 257)
    out = np.asarray(load_image(encode(grey16, "PNG"), 1))
    # PIL's own convert("L") would clip almost everything to 255.
    assert np.abs(out.astype(int) - grey8.astype(int)).max() <= 1


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    assert load_image(encode(rgba, "PNG"), 3).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_the_first_frame(photos):
    data = image_variants(photos["chelsea"])["gif_animated"]
    first = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(data, 3)), first)


def test_exif_orientation_is_applied(photos):
    img = photos["chelsea"].resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    out = load_image(encode(img, "JPEG", exif=exif), 3)
    assert out.size == (40, 60)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"hello, this is text", "not an image"),
        (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "not an image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "not an image"),
    ],
)
def test_non_images_raise_a_clear_error(data, words):
    with pytest.raises(ImageDecodeError, match=words):
        decode_image(data)


def test_truncated_images_raise_a_clear_error(photos):
    for fmt in ("JPEG", "PNG"):
        data = encode(photos["chelsea"], fmt)
        with pytest.raises(ImageDecodeError, match="could not be decoded|not an image"):
            decode_image(data[: len(data) // 2])


def test_to_model_mode_handles_cmyk_and_palette(photos):
    small = photos["coffee"].resize((16, 16))
    assert to_model_mode(small.convert("CMYK"), 3).mode == "RGB"
    assert to_model_mode(small.convert("P"), 1).mode == "L"


def test_request_payload_forms_give_the_same_bytes(photos):
    import base64

    data = encode(photos["chelsea"], "JPEG")
    b64 = base64.b64encode(data).decode()
    assert extract_image_bytes({"body": data}) == data
    assert extract_image_bytes({"data": bytearray(data)}) == data
    assert extract_image_bytes({"file": data}) == data  # multipart field under another name
    assert extract_image_bytes({"body": {"data": b64}}) == data  # JSON parsed by TorchServe
    assert extract_image_bytes({"body": f'{{"data": "{b64}"}}'.encode()}) == data


def test_training_validation_and_serving_give_the_same_tensor(digits_dir, photos, tmp_path):
    """The handler's preprocessing of the raw bytes equals training's validation tensor."""
    from handlers.image_classifier import ImageClassifier

    # Grey digits (class folders) and real photos in many formats (a labels.txt dataset).
    images = tmp_path / "photos" / "images"
    images.mkdir(parents=True)
    lines = []
    for name, data in image_variants(photos["chelsea"]).items():
        ext = {"jpeg": "jpg", "jpeg_cmyk": "jpg", "gif_animated": "gif"}.get(name, name.split("_")[0])
        (images / f"{name}.{ext}").write_bytes(data)
        lines.append(f"{name}.{ext} cat")
    (tmp_path / "photos" / "labels.txt").write_text("\n".join(lines) + "\n")

    for root, cfg in ((digits_dir / "test", RGB_CONFIG.replace(channels=1)), (tmp_path / "photos", RGB_CONFIG)):
        spec = read_dataset(root)
        val_set = ImageDataset(spec.samples, len(spec.classes), False, cfg.channels, eval_transform(cfg))
        handler = ImageClassifier()
        handler.data_config, handler.transform = cfg, eval_transform(cfg)
        for i, sample in enumerate(spec.samples[:25]):
            train_tensor, _ = val_set[i]
            served = handler.preprocess_one({"body": sample.path.read_bytes()})
            assert torch.equal(train_tensor, served), sample.path


def jpeg_variants(photos) -> dict[str, bytes]:
    rgb = photos["chelsea"]
    rotated = Image.Exif()
    rotated[0x0112] = 6
    return {
        "q95": encode(rgb, "JPEG", quality=95),
        "q50_444": encode(rgb, "JPEG", quality=50, subsampling=0),
        "progressive": encode(photos["coffee"], "JPEG", progressive=True),
        "grey": encode(photos["camera"], "JPEG"),
        "odd_size": encode(photos["astronaut"].resize((97, 31)), "JPEG"),
        "exif_rotated": encode(rgb.resize((60, 40)), "JPEG", exif=rotated),
        "cmyk": encode(rgb.convert("CMYK"), "JPEG"),
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_fast_jpeg_decode_gives_the_pixels_pil_gives(photos, channels):
    """Serving decodes JPEGs with torchvision.io; training with PIL: the tensors must be equal."""
    for name, data in jpeg_variants(photos).items():
        fast = load_image_tensor(data, channels)
        assert fast.dtype == torch.uint8 and fast.shape[0] == channels, name
        assert torch.equal(fast, v2.functional.pil_to_tensor(load_image(data, channels))), name


def test_upright_jpegs_skip_pil_and_the_rest_fall_back(photos, monkeypatch):
    import model_defs.preprocessing as pre

    variants = jpeg_variants(photos)
    monkeypatch.setattr(pre, "load_image", lambda *a, **k: pytest.fail("PIL decode used"))
    for name in ("q95", "progressive", "grey", "odd_size"):
        pre.load_image_tensor(variants[name], 3)
    for name in ("exif_rotated", "cmyk"):  # PIL's rotation and colour conversion
        with pytest.raises(pytest.fail.Exception):
            pre.load_image_tensor(variants[name], 3)


def test_fast_jpeg_path_keeps_the_pixel_limit_and_the_clear_errors(photos):
    data = encode(photos["chelsea"], "JPEG")
    with pytest.raises(ImageTooLargeError, match="451x300 = 135,300 pixels, over the limit of max_pixels=100,000"):
        load_image_tensor(data, 3, max_pixels=100_000)
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        load_image_tensor(data[: len(data) // 2], 3)
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image_tensor(b"\xff\xd8\xff" + b"\0" * 20, 3)
