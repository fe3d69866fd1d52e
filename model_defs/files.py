"""The one atomic write: the checkpoint's model.json, the catalog, the serving record and the
server's config all go through it. It needs no torch (scripts/serve's quick commands use it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a private (0600) temporary file in the same folder and a
    rename: readers see the old bytes or the new ones, never half, and the file never exists
    with a wider mode."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
