"""How a worker runs the model: eager PyTorch, or an optimized form chosen at archive time.

The archive's model-config.yaml names the runtime in its handler section
(`runtime: eager`, the default). Every runtime is a callable taking the float batch
(N, C, H, W) the handler preprocessed and returning the model's output tensor on the
handler's device, so preprocessing and postprocessing never depend on the runtime.

`autocast: bf16|fp16` runs the eager model under torch.autocast (GPU mainly; bf16 also
works on CPU), and `channels_last: true` (the default on CPU) stores activations NHWC,
which oneDNN's convolutions prefer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

RUNTIMES = ("eager",)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RuntimeConfigError(ValueError):
    """The handler section names a runtime or option this bundle does not have."""


class EagerRunner:
    """The PyTorch module itself, under inference_mode (and autocast / channels_last if set)."""

    def __init__(self, model: nn.Module, device: torch.device, *, channels_last: bool = True,
                 autocast: str | None = None):
        if autocast and autocast not in AUTOCAST_DTYPES:
            raise RuntimeConfigError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {autocast!r}")
        self.device = device
        self.channels_last = channels_last
        self.autocast = AUTOCAST_DTYPES.get(autocast) if autocast else None
        self.model = model.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                                     enabled=self.autocast is not None):
            return self.model(batch)


def load_runtime(handler_config: dict, model_dir: Path, model: nn.Module, device: torch.device):
    """The runner the archive's handler section asks for (`runtime`, default eager)."""
    kind = str(handler_config.get("runtime") or "eager")
    if kind not in RUNTIMES:
        raise RuntimeConfigError(f"unknown runtime {kind!r}; this bundle has: {', '.join(RUNTIMES)}")
    channels_last = bool(handler_config.get("channels_last", device.type == "cpu"))
    return EagerRunner(model, device, channels_last=channels_last, autocast=handler_config.get("autocast"))
