"""Embedding handler: one L2-normalized vector per image, `{"embedding": [floats]}`.

The image is prepared exactly as training's k-NN evaluation prepared it (the model's data
config through `eval_transform`); cosine similarity between two answers is their dot
product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handlers.vision import VisionHandler


class ImageEmbedder(VisionHandler):
    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.run(batch).float(), dim=1)

    def postprocess(self, embeddings: torch.Tensor) -> list[dict]:
        return [{"embedding": row} for row in embeddings.cpu().tolist()]
