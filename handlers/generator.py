"""Generator handler: a seed (or latent vectors) in, PNG images out, base64 in JSON.

Request (JSON):  {"seed": 7, "n": 4}                  n images from seed 7 (n defaults to 1)
            or   {"latent": [[z_1 ... z_d], ...]}       your own latent vectors (d = latent size)
Answer:          {"images": ["<base64 PNG>", ...], "seed": 7, "n": 4, "latent_dim": d}

The same seed always gives the same images: the latent vectors come from
`model_defs.generative.latent_vectors(seed, n, d)`, the function training draws its sample
grids with, and each request runs through the generator on its own (batch mates never
change its images). `n` is bounded by the handler option `max_n` (default 64); a larger n,
a bad seed or malformed latents get a 400 for that request only.
"""

from __future__ import annotations

import base64
import math

import torch

from handlers.requests import Request, RequestError
from handlers.vision import VisionHandler
from model_defs.generative import latent_vectors
from model_defs.preprocessing import encode_png, tensor_to_images

MAX_SEED = 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ImageGenerator(VisionHandler):
    batched_images = False  # latent vectors, not images
    request_json = '{"seed": int, "n": int} or {"latent": [[...]]}'

    def initialize(self, context):
        super().initialize(context)
        self.latent_dim = int(self.meta["arch_args"].get("latent_dim", getattr(self.model, "latent_dim", 0)))
        self.max_n = max(1, int(self.handler_config.get("max_n", 64)))

    def prepare(self, request: Request) -> tuple[torch.Tensor, dict]:
        req = request.payload  # a JSON object: parse_request checked it is one
        if "latent" in req:
            z = req["latent"]
            if isinstance(z, list) and z and not isinstance(z[0], list):
                z = [z]  # a single vector
            if not (isinstance(z, list) and z and all(isinstance(v, list) for v in z)):
                raise RequestError(400, "InvalidLatent", '"latent" must be a list of vectors (lists of numbers)')
            if len(z) > self.max_n:
                raise RequestError(
                    400, "TooManyImages", f"{len(z)} latent vectors requested; at most {self.max_n} per request"
                )
            for i, v in enumerate(z):
                if len(v) != self.latent_dim or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
                ):
                    raise RequestError(
                        400, "InvalidLatent", f"latent vector {i} must hold {self.latent_dim} finite numbers"
                    )
            return torch.tensor(z, dtype=torch.float32), {"n": len(z), "latent_dim": self.latent_dim}
        seed, n = req.get("seed"), req.get("n", 1)
        if seed is None:
            raise RequestError(400, "MissingSeed", 'give "seed" (an integer) or "latent" (a list of vectors)')
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise RequestError(400, "InvalidSeed", f'"seed" must be an integer from 0 to {MAX_SEED}')
        if not _is_int(n) or n < 1:
            raise RequestError(400, "InvalidCount", '"n" must be a positive integer')
        if n > self.max_n:
            raise RequestError(400, "TooManyImages", f"n={n} images requested; at most {self.max_n} per request")
        return latent_vectors(seed, n, self.latent_dim), {"seed": seed, "n": n, "latent_dim": self.latent_dim}

    def collate(self, items: list) -> list:
        """Each request keeps its own latents, so its images never depend on its batch mates."""
        return items

    def inference(self, items):
        with torch.inference_mode():
            return [(self.model(z.to(self.device)), info) for z, info in items]

    def postprocess(self, outputs) -> list[dict]:
        answers = []
        for images, info in outputs:
            pngs = [base64.b64encode(encode_png(img)).decode() for img in tensor_to_images(images, self.data_config)]
            answers.append({"images": pngs, **info})
        return answers
