"""A LitServe server of a training run, for the serving bench's peer side (scripts/bench/serving.py).

    PYTHON -m scripts.bench.litserve_app --run RUN --port 8000 --workers 2 --max-batch-size 2 --batch-timeout 0.005

PYTHON is a Python with `litserve` (0.2.19 is what the bench was written against) and the
bundle's own dependencies; the bundle itself does not depend on LitServe. It serves the same
model class with the same weights (model_defs.checkpoint.load_trained), the same decode and
transforms (model_defs.preprocessing) and the same answer (`{label: probability}` for the top
k), with LitServe's own dynamic batching: `--workers` inference processes, each batching up to
`--max-batch-size` requests waiting at most `--batch-timeout` seconds, `--threads` torch threads
each. LitServe reads JSON bodies, so a request is `{"image": "<base64 bytes>"}` (what LitServe's
own image examples send); an image that does not decode is a 400.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import litserve as ls
import torch
from fastapi import HTTPException

from model_defs.checkpoint import data_config_from_meta, load_trained
from model_defs.preprocessing import eval_transform, load_image_tensor


class Classifier(ls.LitAPI):
    def __init__(self, run: str, threads: int, topk: int, **batching):
        super().__init__(**batching)
        self.run, self.threads, self.topk = run, threads, topk

    def setup(self, device):
        torch.set_num_threads(self.threads)
        self.model, meta = load_trained(Path(self.run), map_location=device)
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        self.classes = list(meta["classes"])
        self.cfg = data_config_from_meta(meta)
        self.transform = eval_transform(self.cfg)
        self.k = max(1, min(self.topk, len(self.classes)))

    def decode_request(self, request):
        try:
            data = base64.b64decode(request["image"], validate=True)
            return self.transform(load_image_tensor(data, self.cfg.channels))
        except (KeyError, TypeError, ValueError) as e:  # ImageDecodeError is a ValueError
            raise HTTPException(400, f"body must be {{'image': '<base64 image>'}}: {e}") from None

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x.to(self.device))

    def unbatch(self, output):
        return list(output)

    def encode_response(self, logits):
        top_p, top_i = torch.softmax(logits.float().cpu(), dim=0).topk(self.k)
        return {self.classes[i]: p for p, i in zip(top_p.tolist(), top_i.tolist())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training output folder (model.json, model.pt)")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default: 8000)")
    p.add_argument("--workers", type=int, default=1, help="inference processes (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    p.add_argument("--max-batch-size", type=int, default=1, help="LitServe's max_batch_size (default: 1)")
    p.add_argument("--batch-timeout", type=float, default=0.0, help="LitServe's batch_timeout in s (default: 0)")
    p.add_argument("--topk", type=int, default=5, help="labels in each answer (default: 5)")
    p.add_argument("--accelerator", default="cpu", help="LitServe's accelerator: cpu, cuda, auto (default: cpu)")
    args = p.parse_args(argv)
    api = Classifier(
        args.run, args.threads, args.topk, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
    )
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=args.workers, timeout=120)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
