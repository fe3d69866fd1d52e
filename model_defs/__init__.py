"""Model definitions and the one registry every other part of the bundle builds models from.

from model_defs import get_model, get_entry, list_models
model = get_model("small_cnn", num_classes=10, in_channels=1)

The registry (model_defs.registry) imports the architecture modules on its first lookup, and
this package imports the registry on first use of these names, so the light modules
(model_defs.usage, model_defs.files) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model_defs.registry import DataConfig, ModelEntry, get_entry, get_model, list_models, register_model

__all__ = ["DataConfig", "ModelEntry", "get_entry", "get_model", "list_models", "register_model"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("model_defs.registry"), name)
    raise AttributeError(f"module 'model_defs' has no attribute {name!r}")
