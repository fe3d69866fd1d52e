"""Model definitions and the one registry every other part of the bundle builds models from.

from model_defs import get_model, get_entry, list_models
model = get_model("small_cnn", num_classes=10, in_channels=1)
"""

# Importing the architecture modules registers their models.
from model_defs import (  # noqa: F401 - imported for their registrations
    cnn,
    convnext,
    detection,
    embedding,
    generative,
    resnet,
    segmentation,
    transfer,
    vit,
)
from model_defs.registry import DataConfig, ModelEntry, get_entry, get_model, list_models, register_model

__all__ = ["DataConfig", "ModelEntry", "get_entry", "get_model", "list_models", "register_model"]
