"""The one model registry: training, archiving and the handlers build models only through it.

Each entry carries the model's task and its data config (how an image must be prepared
for it), so preprocessing comes from the model and never from the caller, and, for the
classifiers, the dotted names of its first conv (`stem`) and its classifier (`head`), so
tools that swap, freeze or inspect those layers read them here instead of hard-coding them.
Detectors and segmenters name their `backbone` (the modules a backbone-only weights file
fills) and their `predictors` (the layers shaped by the number of classes, built fresh for
the dataset's classes when a run starts from another model's weights). A checkpoint
stores the registered name and the constructor's keyword arguments; `get_model` rebuilds
the exact architecture from those alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

Builder = Callable[..., nn.Module]
TASKS = ("classification", "detection", "segmentation", "generation", "embedding")


@dataclass(frozen=True)
class DataConfig:
    """How an image is turned into the model's input tensor (at eval and serving time).

    The image is converted to `channels` (1 = grey "L", 3 = "RGB"), resized so its shorter
    side is `resize_size`, center-cropped to `input_size` x `input_size` and normalized.
    """

    input_size: int = 224
    resize_size: int = 256
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} value(s) each, got {self.mean} and {self.std}")
        if self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than input_size {self.input_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    def replace(self, **changes) -> DataConfig:
        """A copy with some fields changed; mean/std follow a change of channels."""
        changes = {k: v for k, v in changes.items() if v is not None}
        channels = changes.get("channels", self.channels)
        if channels != self.channels:
            changes.setdefault("mean", _stat_for_channels(self.mean, channels))
            changes.setdefault("std", _stat_for_channels(self.std, channels))
        if "input_size" in changes and "resize_size" not in changes:
            # Keep the model's crop ratio (e.g. 224/256) when only the crop size is changed.
            ratio = self.resize_size / self.input_size
            changes["resize_size"] = round(changes["input_size"] * ratio)
        return dataclasses.replace(self, **changes)


# The two data configs most models use.
IMAGENET = DataConfig(input_size=224, resize_size=256, channels=3)  # ImageNet mean/std
SMALL_IMAGE = DataConfig(input_size=32, resize_size=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _stat_for_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    mean = sum(values) / len(values)
    return (mean,) * channels


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: str
    builder: Builder
    data_config: DataConfig
    # Small keyword arguments for tests and quick runs (the registry test builds every model).
    test_kwargs: dict = field(default_factory=dict)
    stem: str | None = None  # the first nn.Conv2d's dotted name (a state_dict key prefix)
    head: str | None = None  # the classifier's: the nn.Linear that gives the class logits
    backbone: tuple[str, ...] = ()  # detectors, segmenters: the modules of the feature extractor
    predictors: tuple[str, ...] = ()  # their layers shaped by the number of classes

    @property
    def doc(self) -> str:
        return (self.builder.__doc__ or "").strip().splitlines()[0] if self.builder.__doc__ else ""


_REGISTRY: dict[str, ModelEntry] = {}
ARCHITECTURES = ("cnn", "convnext", "detection", "embedding", "generative", "resnet", "segmentation", "transfer", "vit")


def _registered() -> dict[str, ModelEntry]:
    """The registry, with every architecture module imported (each registers its builders on
    import). Imported on the first lookup, so that `model_defs`' light modules (usage, files)
    load without torchvision."""
    import importlib

    for module in ARCHITECTURES:
        importlib.import_module(f"model_defs.{module}")
    return _REGISTRY


def register_model(
    name: str | None = None,
    *,
    task: str,
    data_config: DataConfig = IMAGENET,
    test_kwargs: dict | None = None,
    stem: str | None = None,
    head: str | None = None,
    backbone: tuple[str, ...] = (),
    predictors: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Decorator: register a builder under `name` (default: the function's name)."""

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")

    def wrap(fn: Builder) -> Builder:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"a model named {key!r} is already registered")
        _REGISTRY[key] = ModelEntry(
            key, task, fn, data_config, dict(test_kwargs or {}), stem, head, tuple(backbone), tuple(predictors)
        )
        return fn

    return wrap


def get_entry(name: str, task: str | None = None) -> ModelEntry:
    """The registered entry of `name`; with `task`, a model of another task is refused."""
    try:
        entry = _registered()[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown model {name!r}; registered models: {known}") from None
    if task is not None and entry.task != task:
        raise ValueError(
            f"model {name} is a {entry.task} model, not a {task} model ({task} models: {', '.join(list_models(task))})"
        )
    return entry


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model from keyword arguments (the one public constructor)."""
    return get_entry(name).builder(**kwargs)


def list_models(task: str | None = None) -> list[str]:
    return sorted(n for n, e in _registered().items() if task is None or e.task == task)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """The model's parameters: all of them, and those training updates (requires_grad)."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}
