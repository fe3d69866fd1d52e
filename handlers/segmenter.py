"""Segmentation handler: the class mask as a base64 PNG at the original image size, and
the share of pixels per class.

The answer for each image:

    {"mask": "<base64 PNG>", "width": W, "height": H,
     "classes": ["background", ...], "fractions": {"background": 0.71, ...}}

The PNG is a palette image: its pixel values are the class indices (index 0 = the first
class, the background) and its palette colours them for viewing. That is a few kB, where
TorchServe's stock segmenter answers with H x W x [class, probability] JSON (megabytes).
The image is resized whole (no crop) to the model's input size; the logits are scaled back
to the original size before the argmax, one class at a time (`mask_at_size`): the same mask
as model_defs.preprocessing.logits_to_mask, in about 10 bytes a pixel whatever the number
of classes, where scaling every class at once takes 4 bytes a pixel per class plus the
argmax's 8 (scripts/bench/memory_peak.py measures both).
`/explanations` answers with Integrated Gradients of a class over its predicted region
(handlers/explain.py).
"""

from __future__ import annotations

import base64
import logging

import numpy as np
import torch
import torch.nn.functional as F

from handlers.explain import Explainer, explain_segmentation, refuse_bad_method
from handlers.requests import Request
from handlers.vision import VisionHandler
from model_defs.preprocessing import (
    encode_png,
    mask_to_image,
    segmentation_transform,
)


def mask_at_size(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(num_classes, h, w) logits → uint8 class mask of `size`: logits_to_mask's answer
    (bilinear logits, then the first index of the maximum), holding one scaled class plane
    at a time plus the running maximum, instead of every class plane and an int64 argmax."""
    label = torch.zeros(size, dtype=torch.uint8)
    best = F.interpolate(logits[None, :1].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    better = torch.empty(size, dtype=torch.bool)
    for c in range(1, logits.shape[0]):
        plane = F.interpolate(logits[None, c : c + 1].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        torch.gt(plane, best, out=better)  # strictly greater: a tie keeps the lower class, as argmax does
        label.masked_fill_(better, c)
        torch.maximum(best, plane, out=best)
        del plane
    return label.numpy()


logger = logging.getLogger(__name__)


class ImageSegmenter(VisionHandler):
    def initialize(self, context):
        super().initialize(context)
        self.transform = segmentation_transform(self.data_config)
        self.explainer = Explainer(self.model, self.data_config, self.handler_config, self.device)
        refuse_bad_method(self.model, self.meta, self.explainer.cfg, logger)

    def explain_one(self, row) -> dict:
        return explain_segmentation(self, row)

    def prepare(self, request: Request) -> tuple[torch.Tensor, tuple[int, int]]:
        image = self.read_image(request.image_bytes(self.max_bytes), self.data_config.channels)
        return self.transform(image), (image.shape[-2], image.shape[-1])

    def collate(self, items: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The resized images as one batch, and each original size to scale the mask back to."""
        return torch.stack([x for x, _ in items]).to(self.device), [size for _, size in items]

    def inference(self, batch):
        images, sizes = batch
        return self.run(images), sizes

    def postprocess(self, output) -> list[dict]:
        logits, sizes = output
        answers = []
        for item_logits, size in zip(logits.cpu(), sizes):
            mask = mask_at_size(item_logits, size)
            # torch counts the uint8 mask as it is; np.bincount would copy it to int64 first (8 bytes a pixel)
            counts = torch.bincount(torch.from_numpy(mask).view(-1), minlength=len(self.classes)).numpy()
            answers.append(
                {
                    "mask": base64.b64encode(encode_png(mask_to_image(mask, len(self.classes)))).decode(),
                    "width": size[1],
                    "height": size[0],
                    "classes": self.classes,
                    "fractions": {name: round(float(c) / mask.size, 6) for name, c in zip(self.classes, counts)},
                }
            )
        return answers
