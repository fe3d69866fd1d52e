"""The fixed-cost bench's handler (scripts/bench/fixed_cost.py): the classifier's whole request
path with a model that does nothing.

Every request goes through the same parser (plain bodies, forms, KServe v1/v2 envelopes), the
same size check, the same per-item errors, metrics and answer shape (`{label: probability}` for
the top k) as handlers/image_classifier.py; only the image is never decoded and the model never
runs: each item's logits are zeros. What a served request costs beyond this handler's own
in-process time is the price of being served.
"""

from __future__ import annotations

import torch

from handlers.image_classifier import ImageClassifier


class NullClassifier(ImageClassifier):
    def prepare(self, request):
        request.image_bytes(self.max_bytes)  # parsed and size-checked as for a real model
        return None

    def collate(self, items: list) -> torch.Tensor:
        return torch.zeros(len(items), len(self.classes))

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        return batch
