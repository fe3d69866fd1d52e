"""The model store's catalog: what each archive is, where it came from, and its sha256.

`model_store/catalog.json` holds one entry per (name, version): the archive's file, size,
sha256, task and architecture, the training run it was built from (folder, dataset
fingerprint, metrics), the hash of every input that went into it, and when it was built.
Each archive carries the same metadata inside (`archive.json`), so either can be checked
against the other. Writers take a lock and replace the file atomically.

`problems()` lists every disagreement between the catalog and the store; `repair()` makes
them agree again: an entry whose archive is gone is dropped, and an archive that changed
or that the catalog does not know is moved to `.rejected/` in the store (kept, never
served). `remove()` drops one version and its file. This module imports no torch: the
serving commands read the catalog too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scripts.ops.names import atomic_write, check_name, check_version, inside

CATALOG_FILE = "catalog.json"
INNER_FILE = "archive.json"  # the metadata an archive carries about itself
REJECTED = ".rejected"  # where repair() sets aside archives the catalog cannot vouch for


class CatalogError(ValueError):
    """A catalog or archive problem; the message names the model, version or file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versioned_file_name(name: str, version: str) -> str:
    return f"{name}-{version}.mar"


def read_inner_metadata(mar: Path) -> dict:
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read(INNER_FILE))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as e:
        raise CatalogError(f"{mar.name} is not a readable bundle archive ({e})") from None


class Catalog:
    def __init__(self, model_store: Path):
        self.store = Path(model_store)
        self.path = self.store / CATALOG_FILE

    def load(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())["archives"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CatalogError(
                f"{self.path} is damaged ({e}); rebuild it with scripts/archive --manifest ... --force"
            ) from None

    @contextmanager
    def editing(self):
        """Hold the catalog's lock and yield its entries; they are written back on exit."""
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.store / ".catalog.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.load()
            yield entries
            body = {"format_version": 1, "archives": dict(sorted(entries.items()))}
            atomic_write(self.path, (json.dumps(body, indent=2) + "\n").encode())

    def record(self, entry: dict) -> None:
        with self.editing() as entries:
            entries[f"{entry['name']}/{entry['version']}"] = entry

    def get(self, name: str, version: str) -> dict:
        entries = self.load()
        key = f"{name}/{version}"
        if key not in entries:
            known = sorted(k for k in entries if k.startswith(f"{name}/")) or sorted(entries)
            raise CatalogError(f"{key} is not in {self.path} (catalogued: {', '.join(known) or 'nothing'})")
        return entries[key]

    def checked_archive(self, name: str, version: str) -> Path:
        """The archive of name/version, after checking its sha256 against the catalog."""
        entry = self.get(name, version)
        mar = self.store / entry["file"]
        if not mar.is_file():
            raise CatalogError(f"{name}/{version}: archive {mar} is missing")
        actual = sha256_file(mar)
        if actual != entry["sha256"]:
            raise CatalogError(
                f"{name}/{version}: {mar.name} has sha256 {actual[:12]}…, the catalog says "
                f"{entry['sha256'][:12]}…; the archive changed since it was built, refusing it"
            )
        return mar

    def problems(self) -> list[Problem]:
        """Every disagreement between the catalog, the archives on disk and their inner metadata."""
        problems = []
        entries = self.load()
        for key, entry in entries.items():
            mar = self.store / entry["file"]
            if not mar.is_file():
                problems.append(Problem(key, entry["file"], f"archive {entry['file']} is missing"))
                continue
            if sha256_file(mar) != entry["sha256"]:
                problems.append(Problem(key, entry["file"], f"{entry['file']} sha256 differs from the catalog"))
                continue
            try:
                inner = read_inner_metadata(mar)
            except CatalogError as e:
                problems.append(Problem(key, entry["file"], str(e)))
                continue
            fields = [
                f
                for f in sorted(set(inner) | (set(entry) - {"file", "sha256", "size"}))
                if inner.get(f) != entry.get(f)
            ]
            if fields:
                problems.append(
                    Problem(key, entry["file"], f"{fields[0]!r} inside {entry['file']} differs from the catalog")
                )
        catalogued = {e["file"] for e in entries.values()}
        for mar in sorted(self.store.glob("*.mar")):
            if mar.name not in catalogued:
                problems.append(Problem(None, mar.name, "not in the catalog"))
        return problems

    def verify(self) -> list[str]:
        return [str(p) for p in self.problems()]

    def repair(self, problems: list[Problem]) -> list[str]:
        """Make the catalog and the store agree; returns one line per action taken."""
        actions = []
        with self.editing() as entries:
            for p in problems:
                path = self.store / p.file
                if path.is_file():
                    aside = inside(self.store / REJECTED, p.file)
                    aside.parent.mkdir(exist_ok=True)
                    os.replace(path, aside)
                    actions.append(f"moved {p.file} to {aside.relative_to(self.store)}")
                if p.key and entries.pop(p.key, None) is not None:
                    actions.append(f"dropped {p.key} from the catalog")
        return actions

    def remove(self, name: str, version: str) -> dict:
        """Drop name/version from the catalog and delete its archive; returns the entry."""
        key = f"{check_name(name)}/{check_version(version)}"
        self.get(name, version)
        with self.editing() as entries:
            entry = entries.pop(key)
            inside(self.store, entry["file"]).unlink(missing_ok=True)
        return entry


@dataclass(frozen=True)
class Problem:
    key: str | None  # name/version, or None for an archive the catalog does not know
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else f"{self.file}: {self.message}"
