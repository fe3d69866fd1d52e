"""The one checkpoint format: a training output folder holding `model.pt` and `model.json`.

`model.pt` is a plain state_dict (loadable with `torch.load(weights_only=True)`, so no
pickled code ever runs); `model.json` says how to rebuild the model through the registry
(architecture name and keyword arguments), its task, classes and preprocessing. Training
writes these two files, the archiver packs them and the handlers load them, all here.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from model_defs.files import atomic_write
from model_defs.registry import DataConfig, get_model

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A training output folder that cannot be loaded; the message names the file."""


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DataParallel/DDP (`.module`) or torch.compile (`._orig_mod`)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_model_files(out_dir: Path, model: nn.Module, meta: dict) -> None:
    """Write model.pt (state_dict only) and model.json into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    atomic_torch_save(state, out_dir / WEIGHTS_FILE)
    meta = {"format_version": FORMAT_VERSION, **meta}
    atomic_write(out_dir / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())


def read_meta(model_dir: Path) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (a training output folder holds model.pt and model.json)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    for key in ("arch", "arch_args", "task", "classes", "preprocessing"):
        if key not in meta:
            raise CheckpointError(f"{path} has no {key!r} field")
    return meta


def load_state_dict(path: Path, map_location="cpu") -> dict:
    """Load a plain state_dict; a file holding pickled objects is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled Python objects, not a plain state_dict; refusing to load it "
            f"(torch.load weights_only=True: {str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch file: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state_dict (a dict of tensors)")
    return state


def build_from_meta(meta: dict) -> nn.Module:
    return get_model(meta["arch"], **meta["arch_args"])


def data_config_from_meta(meta: dict) -> DataConfig:
    return DataConfig.from_dict(meta["preprocessing"])


def load_trained(model_dir: Path, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a training output folder, load its weights, set eval mode."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    model = build_from_meta(meta)
    state = load_state_dict(model_dir / WEIGHTS_FILE, map_location=map_location)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{model_dir / WEIGHTS_FILE} does not match the architecture in {META_FILE} "
            f"({meta['arch']}): {str(e).splitlines()[0]}"
        ) from None
    return model.eval(), meta
