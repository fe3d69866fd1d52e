"""The classifier's training preset (model_defs.preprocessing.train_transform): colour jitter
and rotation change the training tensors, on real photographs, and are nowhere in the eval
preset that validation and serving use."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from model_defs import DataConfig
from model_defs.preprocessing import eval_transform, train_transform

pytestmark = pytest.mark.unit

RGB = DataConfig(input_size=64, resize_size=72, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def kinds(transform: v2.Compose) -> list[type]:
    return [type(t) for t in transform.transforms]


def test_off_by_default_and_on_when_asked():
    assert v2.ColorJitter not in kinds(train_transform(RGB))
    assert v2.RandomRotation not in kinds(train_transform(RGB, color_jitter=(0, 0, 0, 0), rotation=0))
    steps = train_transform(RGB, color_jitter=(0.4, 0.3, 0.2, 0.1), rotation=15).transforms
    jitter = next(t for t in steps if isinstance(t, v2.ColorJitter))
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4),
        (0.7, 1.3),
        (0.8, 1.2),
        (-0.1, 0.1),
    )
    assert next(t for t in steps if isinstance(t, v2.RandomRotation)).degrees == [-15.0, 15.0]


@pytest.mark.parametrize(
    "augment", [{"color_jitter": (0.4, 0.4, 0.4, 0.1)}, {"rotation": 30.0}], ids=["color_jitter", "rotation"]
)
def test_each_augmentation_changes_the_training_tensor(photos, augment):
    image = photos["chelsea"]
    plain = train_transform(RGB, hflip_prob=0, min_scale=1.0)
    augmented = train_transform(RGB, hflip_prob=0, min_scale=1.0, **augment)
    torch.manual_seed(0)
    a = plain(image)
    torch.manual_seed(0)
    b = augmented(image)
    assert a.shape == b.shape == (3, 64, 64)
    assert (a - b).abs().mean() > 0.02


def test_grey_images_take_brightness_and_contrast(photos):
    grey = RGB.replace(channels=1)
    out = train_transform(grey, color_jitter=(0.4, 0.4, 0, 0), rotation=10)(photos["camera"])
    assert out.shape == (1, 64, 64) and torch.isfinite(out).all()


def test_the_eval_preset_takes_no_augmentation():
    # It has no parameter that could carry one: validation and serving build it from the DataConfig alone.
    import inspect

    assert list(inspect.signature(eval_transform).parameters) == ["cfg"]
    assert not {v2.ColorJitter, v2.RandomRotation, v2.RandomResizedCrop} & set(kinds(eval_transform(RGB)))
