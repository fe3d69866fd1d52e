"""--pretrained and --pretrained-part: the detection and segmentation trainers' start from a
local weights file (model_defs.pretrained does the matching and loading), checked before
anything is written and recorded in model.json as the file's name and sha256."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from model_defs import get_entry
from model_defs.checkpoint import WEIGHTS_FILE
from model_defs.pretrained import PARTS, PretrainedError, load_pretrained
from model_defs.usage import UsageError
from training.engine import log


def add_pretrained_args(group) -> None:
    group.add_argument(
        "--pretrained",
        default=None,
        metavar="FILE",
        help="local state_dict to start from: a whole model of the same architecture (its class "
        "predictors are rebuilt for these classes) or its backbone alone, e.g. a torchvision "
        "ImageNet classifier's, or a training output folder (its model.pt); nothing is downloaded "
        "(default: none, random init)",
    )
    group.add_argument(
        "--pretrained-part",
        default="auto",
        choices=PARTS,
        help="what --pretrained fills: the whole model but its class predictors, or the backbone; "
        "auto = whole when the file holds weights beyond the backbone (default: auto)",
    )


def check_pretrained(args) -> None:
    """The flags alone, before anything is read."""
    if args.pretrained is None:
        if args.pretrained_part != "auto":
            raise UsageError(f"--pretrained-part {args.pretrained_part} needs --pretrained FILE")
        return
    path = Path(args.pretrained)
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        args.pretrained = str(path / WEIGHTS_FILE)
    elif not path.is_file():
        raise UsageError(f"--pretrained {path} is neither a file nor a training output folder holding {WEIGHTS_FILE}")


def start_from_pretrained(args, model: nn.Module, task: str) -> dict | None:
    """Load --pretrained into `model` (built from --model); model.json's record, or None."""
    if args.pretrained is None:
        return None
    try:
        record = load_pretrained(model, get_entry(args.model, task=task), args.pretrained, args.pretrained_part)
    except PretrainedError as e:
        hint = ": --pretrained-part backbone loads it" if e.backbone_fits else ""
        raise UsageError(f"--pretrained {e}{hint}") from None
    except ValueError as e:  # unreadable, not a state_dict, a model without a backbone entry
        raise UsageError(f"--pretrained {e}") from None
    if record["part"] == "whole":
        predictors = ", ".join(record["predictors_fresh"])
        rest = f"the whole model but its class predictors ({predictors}), built for these classes"
    else:
        rest = "the backbone; the rest starts from random weights"
    log(f"pretrained: {record['tensors_loaded']} tensors of {args.pretrained} fill {rest}")
    return record
