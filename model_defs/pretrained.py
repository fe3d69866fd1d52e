"""Start a detector or segmenter from a local weights file instead of random weights.

Two kinds of file fit (nothing is ever downloaded):

- a whole model's state_dict: the same architecture trained elsewhere, e.g. what
  `torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None)` holds once
  COCO's weights are loaded into it, or model.pt of an earlier training run. Every tensor is
  loaded except the entry's `predictors` (the layers shaped by the number of classes), which
  stay as built, for the dataset's classes;
- a backbone's: the entry's `backbone` modules alone, e.g. a torchvision ImageNet classifier's
  state_dict (its `fc` or `classifier` is left unused), or the backbone part of a whole file.

Files name their tensors differently: a classifier's MobileNetV3 trunk is `features.*` where
a detector's is `backbone.body.*`; a DDP save adds `module.`. So the file's keys are mapped
onto the model's by the pair of key prefixes (file, model) under which most of them land on
the part being filled; every tensor of that part must then be found with its shape, or the
file is refused in one line naming the missing and mismatched keys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from model_defs.checkpoint import load_state_dict
from model_defs.registry import ModelEntry
from model_defs.transfer import weight_for_in_channels

PARTS = ("auto", "whole", "backbone")
SHOWN = 3  # keys named in an error line; the rest are counted


class PretrainedError(ValueError):
    """A weights file that does not fit the model; the message starts with the file's path.
    `backbone_fits`: the whole model was asked for, and the file's backbone alone would fit."""

    def __init__(self, message: str, backbone_fits: bool = False):
        super().__init__(message)
        self.backbone_fits = backbone_fits


@dataclass
class Match:
    """How a file's tensors land on one part of a model."""

    part: str
    file_prefix: str
    model_prefix: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # model key -> tensor, shape checked
    missing: list[str] = field(default_factory=list)  # the part's keys the file lacks
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, file shape, model shape
    file_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the mismatched ones, as in the file
    unused: int = 0  # the file's tensors that fill nothing (a classifier's head, the predictors)

    def problems(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{_count(len(self.missing), 'missing key')} ({_first(self.missing)})")
        if self.mismatched:
            shown = [f"{k} file {_shape(a)} vs model {_shape(b)}" for k, a, b in self.mismatched[:SHOWN]]
            more = ", ..." if len(self.mismatched) > SHOWN else ""
            parts.append(f"{_count(len(self.mismatched), 'mismatched shape')} ({', '.join(shown)}{more})")
        return ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _under(key: str, modules: Iterable[str]) -> bool:
    return any(key.startswith(m + ".") for m in modules)


def _prefixes(keys: Iterable[str], depth: int = 3) -> set[str]:
    """ "" and every dotted prefix of `keys` up to `depth` names deep ("a.", "a.b.", ...)."""
    found = {""}
    for key in keys:
        names = key.split(".")[:-1]
        for i in range(1, min(depth, len(names)) + 1):
            found.add(".".join(names[:i]) + ".")
    return found


def _common_prefixes(keys: list[str]) -> list[str]:
    """ "" and each dotted prefix that every key of `keys` shares."""
    names = os.path.commonprefix([k.split(".")[:-1] for k in keys]) if keys else []
    return ["", *(".".join(names[:i]) + "." for i in range(1, len(names) + 1))]


def match(model_state: dict, file_state: dict, targets: list[str], part: str) -> Match:
    """The (file prefix, model prefix) pair that lands the most file tensors on `targets`, and
    what the file then lacks or holds in another shape. BatchNorm's num_batches_tracked may be
    absent (a frozen-BatchNorm save has none): it counts steps, it is not a weight."""
    wanted = set(targets)
    best = (-1, 0, "", "")
    for p in _prefixes(file_state):
        for q in _common_prefixes(targets):
            hits = sum(1 for k in file_state if k.startswith(p) and q + k[len(p) :] in wanted)
            best = max(best, (hits, -len(p) - len(q), p, q))
    _, _, p, q = best
    found = {q + k[len(p) :]: v for k, v in file_state.items() if k.startswith(p)}
    result = Match(part, p, q)
    for key in targets:
        if key not in found:
            if not key.endswith("num_batches_tracked"):
                result.missing.append(key)
        elif found[key].shape != model_state[key].shape:
            result.mismatched.append((key, tuple(found[key].shape), tuple(model_state[key].shape)))
            result.file_tensors[key] = found[key]
        else:
            result.tensors[key] = found[key]
    result.unused = len(file_state) - len(result.tensors) - len(result.mismatched)
    return result


def plan(model: nn.Module, entry: ModelEntry, file_state: dict, part: str = "auto") -> Match:
    """Which tensors of the file go where in `model` for `part` (auto: whole when the file holds
    weights beyond the backbone, such as a detector's FPN or heads, else backbone)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    if not entry.backbone:
        raise ValueError(f"model {entry.name} names no backbone in the registry: it cannot start from weights")
    state = model.state_dict()
    whole_keys = [k for k in state if not _under(k, entry.predictors)]
    backbone_keys = [k for k in state if _under(k, entry.backbone)]
    whole = match(state, file_state, whole_keys, "whole")
    if part == "whole":
        return whole
    beyond = [k for k in [*whole.tensors, *(m[0] for m in whole.mismatched)] if not _under(k, entry.backbone)]
    if part == "auto" and beyond:
        return whole
    return match(state, file_state, backbone_keys, "backbone")


def _adapt_stem(found: Match, entry: ModelEntry) -> int | None:
    """An RGB file for a grey model (or the reverse): the first conv's weight averaged over its
    inputs, as transfer learning does (model_defs.transfer); the input channels it now takes."""
    stem = f"{entry.stem}.weight"
    for i, (key, file_shape, model_shape) in enumerate(found.mismatched):
        if (
            key == stem
            and len(file_shape) == 4
            and file_shape[:1] + file_shape[2:] == model_shape[:1] + model_shape[2:]
        ):
            found.tensors[key] = weight_for_in_channels(found.file_tensors[key], model_shape[1])
            del found.mismatched[i]
            return model_shape[1]
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pretrained(model: nn.Module, entry: ModelEntry, path: str | Path, part: str = "auto") -> dict:
    """Fill `part` of `model` (built by `entry`) from the state_dict file at `path`, in place;
    returns model.json's record of it. A file that does not fit raises PretrainedError."""
    path = Path(path)
    file_state = load_state_dict(path)  # CheckpointError (a ValueError) names an unreadable file
    found = plan(model, entry, file_state, part)
    what = f"{entry.name}'s " + (
        f"backbone ({', '.join(entry.backbone)})" if found.part == "backbone" else "whole model"
    )
    adapted = _adapt_stem(found, entry)
    if not found.tensors and not found.mismatched:
        file_keys, model_keys = list(file_state)[:2], list(model.state_dict())[:2]
        raise PretrainedError(
            f"{path} shares no tensor with {what}: its keys look like {', '.join(file_keys)}, "
            f"the model's like {', '.join(model_keys)}"
        )
    if found.missing or found.mismatched:
        hint, fits = "", False
        if found.part == "whole":
            backbone = plan(model, entry, file_state, "backbone")
            fits = bool(backbone.tensors) and not backbone.problems()
            hint = f"; its backbone alone fits ({len(backbone.tensors)} tensors)" if fits else ""
        raise PretrainedError(f"{path} does not fit {what}: {found.problems()}{hint}", fits)
    model.load_state_dict(found.tensors, strict=False)
    return {
        "file": str(path),
        "sha256": sha256(path),
        "part": found.part,
        "tensors_loaded": len(found.tensors),
        "tensors_unused": found.unused,
        "key_prefixes": {"file": found.file_prefix, "model": found.model_prefix},
        "predictors_fresh": list(entry.predictors),
        "stem_averaged_to_channels": adapted,
    }
