"""Classification handler: `{label: probability}` for the top k, or every label over the
threshold for a multi-label model. `/explanations` answers with Integrated Gradients, or
with attention rollout for a Vision Transformer (handlers/explain.py).

model-config.yaml (`handler:` section) sets `topk` (default 5, clamped to the number of
classes) and, for multi-label models, `threshold` (default: the one in model.json).
"""

from __future__ import annotations

import logging

import torch

from handlers.explain import Explainer, explain_classification, refuse_bad_method
from handlers.vision import VisionHandler

logger = logging.getLogger(__name__)


class ImageClassifier(VisionHandler):
    def initialize(self, context):
        super().initialize(context)
        self.multi_label = bool(self.meta.get("multi_label", False))
        self.topk = max(1, min(int(self.handler_config.get("topk", 5)), len(self.classes)))
        self.threshold = float(self.handler_config.get("threshold", self.meta.get("threshold", 0.5)))
        self.explainer = Explainer(self.model, self.data_config, self.handler_config, self.device)
        refuse_bad_method(self.model, self.meta, self.explainer.cfg, logger)

    def explain_one(self, row) -> dict:
        return explain_classification(self, row)

    def postprocess(self, logits: torch.Tensor) -> list[dict[str, float]]:
        logits = logits.float().cpu()
        if self.multi_label:
            probs = torch.sigmoid(logits)
            answers = []
            for row in probs:
                keep = [(p, i) for i, p in enumerate(row.tolist()) if p >= self.threshold]
                answers.append({self.classes[i]: p for p, i in sorted(keep, reverse=True)})
            return answers
        probs = torch.softmax(logits, dim=1)
        top_p, top_i = probs.topk(self.topk, dim=1)
        return [{self.classes[i]: p for p, i in zip(ps, idx)} for ps, idx in zip(top_p.tolist(), top_i.tolist())]
