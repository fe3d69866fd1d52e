"""The one rule for model names and versions, and the check that a written path stays in its folder.

The rule is TorchServe's own (model-archiver's `^[A-Za-z0-9][A-Za-z0-9_\\-.]*$`) plus "no
`..`": letters, digits, `_`, `.` and `-`, starting with a letter or digit. A name or
version that passes can be a file name and a management-URL segment, and can never walk
out of a folder or into another model's URL. scripts/archive (command line and manifest),
scripts/models and scripts/serve check every name and version here before any request or
write. It imports nothing heavy: the fast commands (`scripts/serve key`, `status`) use it.
"""

from __future__ import annotations

import re
from pathlib import Path

from model_defs.usage import UsageError

PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
MAX_LENGTH = 64
RULE = f"letters, digits, '_', '.' and '-', starting with a letter or digit, no '..', at most {MAX_LENGTH} characters"


def check_name(value, what: str = "model name") -> str:
    """`value` as a string if it follows the rule, else a UsageError naming it and the rule."""
    text = "" if value is None else str(value)
    if not PATTERN.fullmatch(text) or ".." in text or len(text) > MAX_LENGTH:
        raise UsageError(f"{what} {text!r} is not allowed: use {RULE}")
    return text


def check_version(value) -> str:
    return check_name(value, "version")


def inside(folder: Path, name: str | Path) -> Path:
    """folder/name, refused unless it resolves to a path inside `folder` (not the folder itself)."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise UsageError(f"{name} would be written outside {root}")
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """model_defs.files.atomic_write, imported at the first write: model_defs imports torch,
    which `scripts/serve key` and `status` never load."""
    from model_defs.files import atomic_write as write

    write(path, data)
